"""Pairwise accuracy of a reward model or critic against human labels (VideoAlign's protocol).

For each pair, the model signal is m = s(A) − s(B) and the human label is h = 1 (A wins),
0 (tie) or −1 (B wins); NaN marks an invalid label, excluded everywhere (ALGORITHMS.md §6).

- w/o ties: drop h = 0; accuracy = concordant / (concordant + discordant); m = 0 is discordant.
- w/ ties (tie calibration, Deutsch et al. 2023, "Ties Matter"): the model predicts a tie when
  |m| ≤ ε; acc(ε) = (C + T_hm) / (C + D + T_h + T_m + T_hm), maximised over ε ∈ {every |m_i|}
  ∪ {−1: the model never ties}.

Both are reported per dimension and overall beside a random-score baseline; tie calibration
picks ε on the evaluated pairs, so the baseline shows how much of the w/ ties number that buys.
VideoReward on VideoGen-RewardBench: 61.26 w/ ties, 73.59 w/o ties (Liu et al. 2025).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.btt import INVALID, TIE, A, B

NEVER_TIE = -1.0  # the ε at which no |m| ≤ ε, i.e. the model never predicts a tie
RANDOM_BASELINE_DRAWS = 200  # w/ ties baseline's standard error ≈ 0.001 at a few hundred pairs


@dataclass(frozen=True)
class AccuracyWithoutTies:
    accuracy: float  # NaN when no pair has a decisive human label
    n: int  # concordant + discordant
    concordant: int
    discordant: int


@dataclass(frozen=True)
class TieCalibration:
    accuracy: float  # best acc(ε); NaN when there is no valid pair
    epsilon: float  # the smallest ε reaching it; NEVER_TIE when ties never help; NaN when empty
    n: int  # valid pairs = C + D + T_h + T_m + T_hm
    concordant: int  # counts at the best ε
    discordant: int
    human_tie_only: int  # T_h
    model_tie_only: int  # T_m
    both_tie: int  # T_hm
    curve_epsilons: tuple[float, ...]  # ascending: NEVER_TIE and the distinct |m|, or the given ε
    curve_accuracies: tuple[float, ...]


@dataclass(frozen=True)
class RandomBaseline:
    acc_wo_ties: float  # mean over draws; NaN when there is nothing to score
    acc_w_ties: float
    n_draws: int


def signs_from_labels(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Turn `models.btt` label codes into the protocol's h: A → 1, B → −1, TIE → 0, INVALID → NaN."""
    codes = _as_numpy(labels, "labels")
    known = np.isin(codes, (A, B, TIE, INVALID))
    if not known.all():
        index = tuple(int(i) for i in np.argwhere(~known)[0])
        raise ValueError(f"labels{list(index)} = {float(codes[index])!r}: codes must be A=0, B=1, TIE=2 or INVALID=3")
    h = np.full(codes.shape, np.nan)
    h[codes == A] = 1.0
    h[codes == B] = -1.0
    h[codes == TIE] = 0.0
    return h


def _as_numpy(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name}: expected numbers (numpy array, torch tensor or list), got {type(x).__name__}"
        ) from err


def _valid_labels(h: object, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """h as a float64 vector and its validity mask (NaN = invalid); raise on any other value."""
    h_arr = _as_numpy(h, f"{where}h")
    if h_arr.ndim != 1:
        raise ValueError(f"{where}h {h_arr.shape}: expected a vector with one label per pair")
    valid = ~np.isnan(h_arr)
    bad = valid & ~np.isin(h_arr, (-1.0, 0.0, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{where}h[{i}] = {float(h_arr[i])!r}: human labels must be 1 (A wins), 0 (tie), -1 (B wins) or NaN (invalid); "
            "models.reward_metrics.signs_from_labels converts label codes"
        )
    return h_arr, valid


def _valid_pairs(m: object, h: object, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """m and h as float64 vectors with the invalid (NaN) labels dropped; raise on anything else odd."""
    h_arr, valid = _valid_labels(h, where)
    m_arr = _as_numpy(m, f"{where}m")
    if m_arr.shape != h_arr.shape:
        raise ValueError(f"{where}m {m_arr.shape} and h {h_arr.shape}: expected one model signal per label")
    bad = valid & ~np.isfinite(m_arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{where}m[{i}] = {float(m_arr[i])!r}: the model signal must be finite where the label is valid"
        )
    return m_arr[valid], h_arr[valid]


def accuracy_without_ties(m: object, h: object) -> AccuracyWithoutTies:
    """Share of decisive human labels (h = ±1) whose sign the model signal m matches; m = 0 misses."""
    m, h = _valid_pairs(m, h)
    decisive = h != 0
    concordant = int((np.sign(m[decisive]) == h[decisive]).sum())
    n = int(decisive.sum())
    return AccuracyWithoutTies(
        accuracy=concordant / n if n else math.nan, n=n, concordant=concordant, discordant=n - concordant
    )


def _tie_counts(m: np.ndarray, h: np.ndarray, epsilon: float) -> tuple[int, int, int, int, int]:
    """(C, D, T_h, T_m, T_hm) when the model predicts a tie for |m| ≤ ε."""
    model_tie = np.abs(m) <= epsilon
    human_tie = h == 0
    decisive = ~model_tie & ~human_tie
    concordant = int((decisive & (np.sign(m) == h)).sum())
    return (
        concordant,
        int(decisive.sum()) - concordant,
        int((human_tie & ~model_tie).sum()),
        int((model_tie & ~human_tie).sum()),
        int((model_tie & human_tie).sum()),
    )


def _tie_curve(m: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ε candidates, correct counts C + T_hm at each); O(n log n).

    Every valid pair lands in exactly one of C, D, T_h, T_m, T_hm, so the denominator is n and
    only C + T_hm moves with ε. Raising ε past |m_i| turns pair i into a model tie: it gains 1 if
    h_i = 0 and loses 1 if it was concordant. Sorting by |m| turns the sweep into a cumulative sum.
    """
    # 1. each pair's contribution as a model non-tie and as a model tie
    right_untied = ((h != 0) & (np.sign(m) == h)).astype(np.int64)
    right_tied = (h == 0).astype(np.int64)
    # 2. sweep ε upwards over the sorted |m|; correct[k] = correct count with the k smallest tied
    order = np.argsort(np.abs(m), kind="stable")
    size = np.abs(m)[order]
    correct = right_untied.sum() + np.concatenate([[0], np.cumsum(right_tied[order] - right_untied[order])])
    # 3. equal |m| tie together: keep only the end of each run of equal values
    run_end = np.flatnonzero(np.append(size[1:] != size[:-1], True))
    epsilons = np.concatenate([[NEVER_TIE], size[run_end]])
    return epsilons, correct[np.concatenate([[0], run_end + 1])]


def accuracy_with_ties(m: object, h: object, epsilons: Sequence[float] | None = None) -> TieCalibration:
    """Tie-calibrated accuracy: max over ε of (C + T_hm) / (C + D + T_h + T_m + T_hm), where the
    model predicts a tie when |m| ≤ ε (Deutsch et al. 2023).

    ε ranges over NEVER_TIE and every distinct |m_i| (each step of acc(ε) happens at one of them);
    pass `epsilons` to score a fixed set instead, e.g. an ε calibrated on held-out pairs. The
    smallest ε wins among equal accuracies. O(n log n) for the sweep.
    """
    m, h = _valid_pairs(m, h)
    n = len(m)
    if n == 0:
        return TieCalibration(math.nan, math.nan, 0, 0, 0, 0, 0, 0, (), ())
    sweep_eps, sweep_correct = _tie_curve(m, h)
    if epsilons is None:
        eps, correct = sweep_eps, sweep_correct
    else:
        eps = np.unique(np.asarray(epsilons, dtype=np.float64))
        if len(eps) == 0 or not np.isfinite(eps).all():
            raise ValueError(f"epsilons={epsilons!r}: give a non-empty list of finite thresholds, or None to sweep")
        # no |m| lies between a given ε and the largest swept ε below it, so both tie the same pairs
        correct = sweep_correct[np.maximum(np.searchsorted(sweep_eps, eps, side="right") - 1, 0)]
    best = int(np.argmax(correct))  # first maximum = smallest ε
    counts = _tie_counts(m, h, float(eps[best]))
    return TieCalibration(
        accuracy=float(correct[best]) / n,
        epsilon=float(eps[best]),
        n=n,
        concordant=counts[0],
        discordant=counts[1],
        human_tie_only=counts[2],
        model_tie_only=counts[3],
        both_tie=counts[4],
        curve_epsilons=tuple(float(e) for e in eps),
        curve_accuracies=tuple(float(c) / n for c in correct),
    )


def random_baseline(h: object, seed: int, n_draws: int = RANDOM_BASELINE_DRAWS) -> RandomBaseline:
    """Expected accuracies of a model whose scores are random, by simulation with a fixed seed.

    Each draw gives every valid pair m ~ N(0, 1) (the difference of two i.i.d. scores); both
    accuracies depend only on the signs of m and the order of |m|, so any continuous symmetric
    score distribution gives the same numbers. w/o ties is 0.5 in expectation. w/ ties is at least
    the share of human ties ("always tie" is one of the ε tried) and the best of many ε picked on
    the same pairs; a real model's w/ ties number contains the same optimism.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws={n_draws}: need at least one draw")
    h_arr, valid = _valid_labels(h)
    h_valid = h_arr[valid]
    if len(h_valid) == 0:
        return RandomBaseline(math.nan, math.nan, n_draws)
    rng = np.random.default_rng(seed)
    wo, w = [], []
    for _ in range(n_draws):
        m = rng.standard_normal(len(h_valid))
        wo.append(accuracy_without_ties(m, h_valid).accuracy)
        w.append(accuracy_with_ties(m, h_valid).accuracy)
    # with only human ties, w/o ties has nothing to score in any draw
    return RandomBaseline(float(np.mean(wo)) if (h_valid != 0).any() else math.nan, float(np.mean(w)), n_draws)


def _report_row(name: str, m: np.ndarray, h: np.ndarray, seed: int, n_draws: int) -> dict:
    wo = accuracy_without_ties(m, h)
    w = accuracy_with_ties(m, h)
    rand = random_baseline(h, seed, n_draws)
    return {
        "dimension": name,
        "n": w.n,
        "n_wo_ties": wo.n,
        "acc_wo_ties": wo.accuracy,
        "acc_w_ties": w.accuracy,
        "epsilon": w.epsilon,
        "random_wo_ties": rand.acc_wo_ties,
        "random_w_ties": rand.acc_w_ties,
    }


def per_dimension_report(
    m: object,
    h: object,
    names: Sequence[str] = ("VQ", "MQ", "TA"),
    h_overall: object | None = None,
    seed: int = 0,
    n_draws: int = RANDOM_BASELINE_DRAWS,
) -> list[dict]:
    """One row per dimension, plus an "overall" row when `h_overall` is given.

    m: (N, D) model signals s(A) − s(B) per dimension, z-normalised so that dimensions are
    comparable; h: (N, D) human labels (1, 0, −1, NaN = invalid). The overall signal is the mean
    of the D signals (overall reward = mean of normalised dimensions, ALGORITHMS.md §5); the overall
    label is the caller's (N,) `h_overall`, e.g. the raters' overall verdict. Each row holds
    dimension, n (valid pairs), n_wo_ties (pairs without a human tie), acc_wo_ties, acc_w_ties,
    epsilon (the calibrated tie threshold), random_wo_ties and random_w_ties.
    """
    m_arr, h_arr = _as_numpy(m, "m"), _as_numpy(h, "h")
    if m_arr.ndim != 2 or m_arr.shape != h_arr.shape or m_arr.shape[1] != len(names):
        raise ValueError(
            f"per_dimension_report: m {m_arr.shape} and h {h_arr.shape} must both be (pairs, {len(names)}) "
            f"for names {tuple(names)}"
        )
    rows = [_report_row(name, m_arr[:, j], h_arr[:, j], seed, n_draws) for j, name in enumerate(names)]
    if h_overall is not None:
        rows.append(_report_row("overall", m_arr.mean(axis=1), _as_numpy(h_overall, "h_overall"), seed, n_draws))
    return rows
