"""Bradley-Terry with ties (Rao & Kupper 1967), the reward model's pairwise loss.

VideoReward (Liu et al. 2025, arXiv 2501.13918) trains each reward dimension (VQ, MQ, TA) on
human A / B / tie labels with this model and θ = 5 (ALGORITHMS.md §5). With d = r_A − r_B:

    P(A ≻ B) = σ(d − log θ)
    P(B ≻ A) = σ(−d − log θ)
    P(tie)   = (θ² − 1) · σ(d − log θ) · σ(−d − log θ)
    loss     = −log P(observed label)

θ > 1 opens a band around d = 0 where a tie is the likeliest outcome; at d = 0 the tie has
probability (θ − 1) / (θ + 1), i.e. 2/3 for θ = 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Label codes, in the order of `LABELS`; INVALID marks a pair the rater could not judge (masked).
A, B, TIE, INVALID = 0, 1, 2, 3
LABELS = ("A", "B", "tie", "invalid")
VIDEOREWARD_THETA = 5.0


def encode_labels(strings: Sequence) -> torch.Tensor:
    """Map label strings ("A", "B", "tie", "invalid") to their codes, keeping the nesting:
    a list gives (N,), a list of per-dimension lists gives (N, D). Unknown strings raise."""
    arr = np.asarray(strings, dtype=object)
    codes = np.empty(arr.shape, dtype=np.int64)
    for index, value in np.ndenumerate(arr):
        if not isinstance(value, str) or value not in LABELS:
            raise ValueError(
                f"label {value!r} at index {index if arr.ndim > 1 else index[0]}: unknown preference label; "
                f"use one of {LABELS} (case-sensitive)"
            )
        codes[index] = LABELS.index(value)
    return torch.from_numpy(codes)


def _check_theta(theta: float) -> None:
    if not (math.isfinite(theta) and theta > 1.0):
        raise ValueError(
            f"theta={theta!r}: Rao–Kupper needs a finite θ > 1 (θ = 1 makes ties impossible, θ < 1 gives a "
            f"negative tie probability); VideoReward uses θ = {VIDEOREWARD_THETA}"
        )


def _log_probabilities(d: torch.Tensor, theta: float) -> torch.Tensor:
    """log P(A ≻ B), log P(B ≻ A), log P(tie) stacked on a new last axis, in that label order.

    Computed with logsigmoid so that |d| in the thousands stays finite:
    log P(tie) = log(θ² − 1) + logσ(d − log θ) + logσ(−d − log θ).
    """
    _check_theta(theta)
    log_theta = math.log(theta)
    log_p_a = F.logsigmoid(d - log_theta)
    log_p_b = F.logsigmoid(-d - log_theta)
    log_p_tie = math.log(theta * theta - 1.0) + log_p_a + log_p_b
    return torch.stack([log_p_a, log_p_b, log_p_tie], dim=-1)


def btt_probabilities(
    d: torch.Tensor | float, theta: float = VIDEOREWARD_THETA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P(A ≻ B), P(B ≻ A), P(tie)) for reward differences d = r_A − r_B.

    The three sum to 1. With x = e^d, σ(d − log θ) = x / (x + θ) and σ(−d − log θ) = 1 / (1 + θx), so
        x(1 + θx) + (x + θ) + (θ² − 1)x = θx² + x + θ²x + θ = (x + θ)(1 + θx),
    which is the common denominator.
    """
    d = torch.as_tensor(d, dtype=torch.get_default_dtype()) if not isinstance(d, torch.Tensor) else d
    p = _log_probabilities(d, theta).exp()
    return p[..., A], p[..., B], p[..., TIE]


def btt_loss(
    r_a: torch.Tensor, r_b: torch.Tensor, labels: torch.Tensor, theta: float = VIDEOREWARD_THETA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean Rao–Kupper negative log-likelihood over the valid (pair, dimension) entries.

    r_a, r_b: (N, D) rewards of the two videos for D dimensions (VQ, MQ, TA).
    labels:   (N, D) integer codes A=0, B=1, TIE=2, INVALID=3 (see `encode_labels`).
    Returns (loss, nll): loss = Σ_valid −log P(label) / #valid, and nll (N, D) with 0 at INVALID
    entries, which get no gradient. With no valid entry the loss is 0 and still backpropagates
    (zero gradients), so a batch of unjudgeable pairs does not break a training step.
    """
    # 1. check inputs
    if r_a.shape != r_b.shape or r_a.shape != labels.shape:
        raise ValueError(
            f"btt_loss: r_a {tuple(r_a.shape)}, r_b {tuple(r_b.shape)} and labels {tuple(labels.shape)} "
            "must have the same shape (pairs, dimensions)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"btt_loss: labels have dtype {labels.dtype}; pass integer codes A=0, B=1, TIE=2, INVALID=3 "
            "(models.btt.encode_labels makes them from strings)"
        )
    bad = (labels < A) | (labels > INVALID)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"btt_loss: labels{list(index)} = {int(labels[index])}: codes must be A=0, B=1, TIE=2 or INVALID=3"
        )
    labels = labels.long()

    # 2. −log P(observed label); INVALID entries read the A column and are then zeroed by `where`,
    #    which passes no gradient to the branch it does not select
    log_p = _log_probabilities(r_a - r_b, theta)
    valid = labels != INVALID
    picked = log_p.gather(-1, torch.where(valid, labels, A).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, -picked, torch.zeros_like(picked))

    # 3. mean over valid entries; with none, nll.sum() is a zero that still carries the graph
    loss = nll.sum() / valid.sum().clamp_min(1)
    return loss, nll
