"""`label`: a critic ranks each prompt's K generations and labels pairs A / B / tie per VQ, MQ, TA.

IPO (ALGORITHMS.md §8): the critic scores every sample of a prompt pointwise; the best and the
worst by overall score (the mean of VQ, MQ and TA) form a pair, and the critic labels that pair
on each dimension (VideoAlign's VQ visual quality, MQ motion quality, TA text alignment).
`rank_by=mq_ta` orders by MQ, then TA, then VQ instead, so that the pair differs in motion quality
whenever the prompt's samples do.
`pairing` also offers every pair of a prompt, or every pair at least `margin` apart.

Critics (one interface, `Critic`: `score` pointwise, `compare` pairwise):
- `annotators`: simulated human raters of the embedded world (`models/annotators.py`): the physics
  judge's checklist as pointwise scores, a panel of noisy raters voting on each pair.
- `vlm`: a Qwen2-VL-class model (`models/vlm.py`) rates each video 1–5 and compares pairs with
  VideoAlign's rubric. An answer its strict parser cannot read is `invalid` (a rating: the video
  is not ranked), with the raw text kept; never a guess and never a crash.
- `reward_model`: a trained reward model (`models/reward_model.py`, z-normalised rewards); a pair
  is a tie on a dimension when |r_A − r_B| ≤ ε (`tie_margin`). Any scorer callable plugs in.

The `labels` manifest holds pairs only: in every row A is the pair's chosen video (the higher
overall score, or with `rank_by=mq_ta` the higher MQ, then TA, then VQ; the lower sample index among
equals), `video_a`/`video_b` are the paths as stored
in `generations`, `label_*` are the critic's verdicts and `score_*` the critic's pointwise margin
s(A) − s(B) per dimension (what VideoAlign's tie calibration thresholds; null when a side has no
score). Pointwise scores of every generation — unreadable ones included, with a reason — go to
`scores.parquet` in the stage folder (generation_id, prompt_id, prompt, video_path, score_vq/mq/ta,
overall, reason, critic, rationale, raw_response) rather than into `labels` as rows with a null
`video_b`: the stages after `label` read pairs, and a pointwise row would need a label it does
not have and a reason the contract has no column for.

Pointwise scores are in the critic's own units: [0, 1] shares of checks (annotators), 1–5
ratings (vlm), z-normalised rewards (reward_model). A prompt has no pair when fewer than two of
its videos are readable (for `best_worst` and `margin`: have a score); a prompt whose samples all
score the same still gives its best–worst pair (mostly ties: IPO keeps ties for the reward
model, finetune drops them) unless `keep_ties` is off.

Work runs in an actor pool (`CriticWorker`, one critic loaded per actor, `num_gpus` per actor
from `infra/resources.py`), the same pool for scoring and comparing; the simulated annotators
judge a clip in ~10 ms and run in this process unless `backend` says otherwise. Workers decode
the videos themselves, so frames never travel through Ray's object store; a video that cannot
be decoded is recorded with its reason and left out of pairs. A critic that cannot judge a
readable video at all (a non-square clip for the annotators, a clip slower than the reward
model's frame rate) raises: the run is misconfigured, and a label would be a guess.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, read_manifest, write_manifest
from data_contracts.lineage import atomic_write_bytes
from models.annotators import (
    DIMENSIONS,
    checklist_scores,
    failed_checks,
    majority,
    noise_free_label,
    pair_rng,
    rater_votes,
)
from models.vlm import VLMConfig
from tasks.common import StageConfig, StageResult

LABELS = ("A", "B", "tie", "invalid")
INVALID = "invalid"
SCORES_FILE = "scores.parquet"

# ---------------------------------------------------------------------------------------------
# 1. Config


class LabelConfig(StageConfig):
    critic: Literal["annotators", "vlm", "reward_model"] = Field(
        "annotators",
        description="who labels: simulated annotators (physics judge + rater noise; embedded world only), a VLM "
        "(`label.vlm`), or a trained reward model (`label.reward_model` or the `checkpoints` input)",
    )
    pairing: Literal["best_worst", "all_pairs", "margin"] = Field(
        "best_worst",
        description="IPO's best vs. worst of each prompt's K samples by overall score; `all_pairs`: every pair of a "
        "prompt; `margin`: every pair whose overall scores differ by at least `margin`",
    )
    rank_by: Literal["overall", "mq_ta"] = Field(
        "overall",
        description="`best_worst` order: overall (IPO: the mean of VQ, MQ and TA) or mq_ta (MQ first, then TA, then "
        "VQ: the best and worst differ in motion quality whenever the prompt's samples do, as `finetune.prefer=mq_ta` "
        "needs; by overall, 24 of 54 such pairs were undecided on MQ or had TA against MQ in one round-1 run)",
    )
    pairs_per_prompt: int = Field(
        1,
        ge=1,
        description="`best_worst`: pair the i-th best with the i-th worst for i < this (disjoint pairs, at most K/2; "
        "beyond the first, only pairs whose two samples rank apart)",
    )
    margin: float | None = Field(
        None, ge=0, description="`margin` pairing: least overall-score gap, in the critic's units; no default: the "
        "units differ by critic ([0, 1] annotators, 1–5 vlm, z reward model)",
    )
    keep_ties: bool = Field(
        True, description="`best_worst`: a prompt whose samples all score the same still gives a pair (IPO keeps "
        "ties for the reward model; finetune drops them)",
    )
    raters: int = Field(3, ge=1, description="simulated raters per pair: three is the smallest panel with a majority")
    label_noise: float = Field(
        0.1, ge=0, le=1, description="probability a rater flips a non-tie label (A ↔ B): 0.1 leaves a 3-rater "
        "majority wrong 2.8 % of the time (3p² − 2p³)",
    )
    tie_rate: float = Field(
        0.05, ge=0, le=1, description="probability a rater says tie whatever the videos show (an unsure rater)"
    )
    seed: int = Field(0, description="seeds the raters' noise; each pair draws from (seed, its two generation ids)")
    vlm: VLMConfig | None = Field(
        None, description="`vlm` critic: model (hub id in the local HF cache or a save_pretrained folder), "
        "sample_fps (2, VideoReward's), batch_size, trust_remote_code (off) …; no default model",
    )
    reward_model: str | None = Field(
        None, description="`reward_model` critic: a folder written by RewardModel.save_pretrained; None: the "
        "`reward_model` row of the `checkpoints` input (train_reward's output)",
    )
    tie_margin: float = Field(
        0.1, ge=0, description="`reward_model` critic: |r_A − r_B| ≤ ε on z-normalised rewards is a tie; 0.1 is a "
        "tenth of a held-out std; set it to the ε that train_reward's tie calibration reports",
    )
    backend: Literal["auto", "ray", "local"] = Field(
        "auto", description="`auto`: a Ray actor pool for model critics (vlm, reward_model), this process for the "
        "annotators (a judge call is ~10 ms, a Ray start several seconds); `ray` or `local` to force one",
    )
    batch_size: int | None = Field(
        None, ge=1, description="videos or pairs per call of a critic worker; None: the `label` row of "
        "infra/resources.py (8)",
    )
    actors: int | None = Field(None, ge=1, description="critic actors; None: the `label` row of infra/resources.py")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per actor; None: infra/resources.py (clamped to what exists)"
    )

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if self.critic == "vlm" and self.vlm is None:
            raise ValueError(
                "label.critic is `vlm` but label.vlm is not set; give label.vlm.model (a hub id already in the "
                "local HF cache, e.g. Qwen/Qwen2-VL-2B-Instruct, or a folder written by save_pretrained)"
            )
        if self.pairs_per_prompt > 1 and self.pairing != "best_worst":
            raise ValueError(
                f"label.pairs_per_prompt={self.pairs_per_prompt} applies to the best_worst pairing only; label.pairing is "
                f"{self.pairing!r}: set label.pairing=best_worst or label.pairs_per_prompt=1"
            )
        if self.rank_by != "overall" and self.pairing != "best_worst":
            raise ValueError(
                f"label.rank_by={self.rank_by} orders the best_worst pairing only; label.pairing is {self.pairing!r}, "
                "which pairs by overall score: set label.pairing=best_worst or label.rank_by=overall"
            )
        if self.pairing == "margin" and self.margin is None:
            raise ValueError(
                "label.pairing is `margin` but label.margin is not set; give the least overall-score gap in the "
                "critic's units ([0, 1] annotators, 1–5 vlm, z-scores reward model)"
            )
        return self


# ---------------------------------------------------------------------------------------------
# 2. The pure core: ranking and pairing


@dataclass(frozen=True)
class Sample:
    """One generation as the pairing sees it: where it is, and the critic's pointwise scores."""

    generation_id: str
    prompt_id: str
    prompt: str
    sample_index: int
    video_path: str  # as stored in `generations`
    readable: bool
    scores: tuple[float, float, float] | None  # VQ, MQ, TA; None when unreadable or unscored

    @property
    def overall(self) -> float | None:
        """Mean of the three dimensions (ALGORITHMS.md §5); None unless all three are known."""
        if self.scores is None or not all(np.isfinite(self.scores)):
            return None
        return float(np.mean(self.scores))


@dataclass(frozen=True)
class PromptOutcome:
    pairs: int
    all_equal: bool  # at least two scored samples and all score the same
    too_few: bool  # fewer than two readable (or, to rank, scored) samples


RANK_ORDERS = {"overall": ("overall",), "mq_ta": ("MQ", "TA", "VQ")}


def rank_scores(sample: Sample, by: str = "overall") -> tuple[float, ...] | None:
    """What `rank` orders a sample by (higher is better): its overall score, or MQ, TA, VQ in that order;
    None when the sample has no overall score."""
    if sample.overall is None:
        return None
    if by not in RANK_ORDERS:
        raise ValueError(f"unknown rank order {by!r}; use one of {sorted(RANK_ORDERS)}")
    named = {"overall": sample.overall, **dict(zip(DIMENSIONS, sample.scores, strict=True))}
    return tuple(float(named[k]) for k in RANK_ORDERS[by])


def rank(samples: Sequence[Sample], by: str = "overall") -> list[Sample]:
    """Best first by `rank_scores` (overall score, or MQ then TA then VQ); unscored last; the lower
    sample index first among equals."""

    def key(s: Sample):
        scores = rank_scores(s, by)
        return (scores is None, tuple(-x for x in scores or ()), s.sample_index, s.generation_id)

    return sorted(samples, key=key)


def pair_prompt(
    samples: Sequence[Sample],
    pairing: str,
    margin: float | None,
    keep_ties: bool,
    rank_by: str = "overall",
    per_prompt: int = 1,
) -> tuple[list[tuple[Sample, Sample]], PromptOutcome]:
    """The pairs of one prompt's samples, each ordered (chosen, rejected), and what happened;
    `rank_by` orders `best_worst` (the other pairings go by overall score), which pairs the i-th
    best with the i-th worst for i < `per_prompt` (beyond the first, only samples that rank apart)."""
    by = rank_by if pairing == "best_worst" else "overall"
    ranked = rank([s for s in samples if s.overall is not None], by)
    all_equal = len(ranked) >= 2 and rank_scores(ranked[0], by) == rank_scores(ranked[-1], by)
    if pairing == "all_pairs":
        candidates = rank([s for s in samples if s.readable])
        pairs = list(itertools.combinations(candidates, 2))
        return pairs, PromptOutcome(len(pairs), all_equal, len(candidates) < 2)
    if len(ranked) < 2:
        return [], PromptOutcome(0, False, True)
    if pairing == "best_worst":
        pairs = [] if all_equal and not keep_ties else [(ranked[0], ranked[-1])]
        for i in range(1, min(per_prompt, len(ranked) // 2)):
            if rank_scores(ranked[i], rank_by) != rank_scores(ranked[-1 - i], rank_by):
                pairs.append((ranked[i], ranked[-1 - i]))
    elif pairing == "margin":
        # a small slack so that a gap of exactly `margin` survives float rounding of the means
        pairs = [(a, b) for a, b in itertools.combinations(ranked, 2) if a.overall - b.overall >= margin - 1e-12]
    else:
        raise ValueError(f"unknown pairing {pairing!r}; use best_worst, all_pairs or margin")
    return pairs, PromptOutcome(len(pairs), all_equal, False)


def plan_pairs(
    samples: Sequence[Sample], cfg: LabelConfig
) -> tuple[list[tuple[Sample, Sample]], dict[str, PromptOutcome]]:
    """Pairs of every prompt (prompts in manifest order) and each prompt's outcome."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.prompt_id].append(s)
    pairs, outcomes = [], {}
    for prompt_id, group in groups.items():
        found, outcomes[prompt_id] = pair_prompt(group, cfg.pairing, cfg.margin, cfg.keep_ties, cfg.rank_by, cfg.pairs_per_prompt)
        pairs.extend(found)
    return pairs, outcomes


def pair_id(a: Sample, b: Sample) -> str:
    return f"{a.generation_id}-vs-{b.generation_id}"


def margins(a: Sample, b: Sample) -> list[float | None]:
    """s(A) − s(B) per dimension; None where either side has no score."""
    if a.scores is None or b.scores is None:
        return [None] * len(DIMENSIONS)
    return [float(x - y) if np.isfinite(x - y) else None for x, y in zip(a.scores, b.scores, strict=True)]


# ---------------------------------------------------------------------------------------------
# 3. Critics


@dataclass(frozen=True, eq=False)
class Video:
    """A decoded video: uint8 RGB frames (F, H, W, 3) at `fps`, and its generation id."""

    id: str
    frames: np.ndarray
    fps: float


@dataclass(frozen=True, eq=False)
class PointScores:
    """Pointwise verdicts of N videos: scores (N, 3) for VQ, MQ, TA (NaN: unreadable answer)."""

    scores: np.ndarray
    rationales: list[str | None]
    raws: list[str | None]


@dataclass(frozen=True)
class PairVerdict:
    """One pair's labels per dimension (A, B, tie or invalid), why, and the critic's raw answer."""

    labels: dict[str, str]
    rationale: str | None
    raw: str | None


class Critic(Protocol):
    """What the stage asks of a critic. Lists go in and out together so that a model critic
    answers a batch in one call."""

    name: str

    def score(self, videos: Sequence[Video], prompts: Sequence[str]) -> PointScores: ...

    def compare(
        self, videos_a: Sequence[Video], videos_b: Sequence[Video], prompts: Sequence[str]
    ) -> list[PairVerdict]: ...


class AnnotatorCritic:
    """Simulated raters of the embedded world: the physics judge's checklist as scores, a panel of
    `raters` noisy raters voting on each pair (`models/annotators.py`)."""

    name = "annotators"

    def __init__(self, raters: int, label_noise: float, tie_rate: float, seed: int) -> None:
        self.raters, self.label_noise, self.tie_rate, self.seed = raters, label_noise, tie_rate, seed
        self._judges: dict[tuple[int, int, float], Any] = {}

    def verdict(self, video: Video, prompt: str):
        """The judge's verdict, with a judge built for the clip's size, length and rate."""
        from models.physics_judge import PhysicsJudge
        from models.physics_world import WorldSpec

        frames, height, width = len(video.frames), video.frames.shape[1], video.frames.shape[2]
        if height != width:
            raise ValueError(
                f"label: video {video.id} is {width}x{height}; the simulated annotators judge the embedded world's "
                "square clips only; set label.critic=vlm or reward_model for other videos"
            )
        # the judge refuses nothing for being short (its `enough_frames` check does), the world does
        key = (height, max(frames, 4), float(video.fps))
        if key not in self._judges:
            self._judges[key] = PhysicsJudge(WorldSpec(size=key[0], frames=key[1], fps=key[2]))
        return self._judges[key].judge(video.frames, prompt)

    def score(self, videos: Sequence[Video], prompts: Sequence[str]) -> PointScores:
        verdicts = [self.verdict(v, p) for v, p in zip(videos, prompts, strict=True)]
        scores = np.array([checklist_scores(v.checks) for v in verdicts], dtype=np.float64).reshape(-1, 3)
        rationales = [_judge_summary(v) for v in verdicts]
        raws = [json.dumps({"reason": v.reason, "checks": v.checks}, sort_keys=True) for v in verdicts]
        return PointScores(scores, rationales, raws)

    def compare(
        self, videos_a: Sequence[Video], videos_b: Sequence[Video], prompts: Sequence[str]
    ) -> list[PairVerdict]:
        out = []
        for a, b, prompt in zip(videos_a, videos_b, prompts, strict=True):
            # 1. what the videos really are, by the judge
            va, vb = self.verdict(a, prompt), self.verdict(b, prompt)
            sa, sb = checklist_scores(va.checks), checklist_scores(vb.checks)
            truth = {d: noise_free_label(x, y) for d, x, y in zip(DIMENSIONS, sa, sb, strict=True)}
            # 2. what a panel of noisy raters says, one generator per pair
            rng = pair_rng(self.seed, a.id, b.id)
            votes = {d: rater_votes(truth[d], self.raters, self.label_noise, self.tie_rate, rng) for d in DIMENSIONS}
            labels = {d: majority(votes[d]) for d in DIMENSIONS}
            panel = "; ".join(f"{d} {'/'.join(votes[d])} -> {labels[d]}" for d in DIMENSIONS)
            rationale = f"{self.raters} raters: {panel}. A: {_judge_summary(va)}. B: {_judge_summary(vb)}."
            raw = json.dumps({"truth": truth, "votes": votes}, sort_keys=True)
            out.append(PairVerdict(labels, rationale, raw))
        return out


def _judge_summary(verdict) -> str:
    """A rater's one-line account of a clip: what moves wrongly, what the caption gets wrong."""
    motion = "plausible" if verdict.plausible else f"implausible ({', '.join(failed_checks(verdict.checks, 'MQ'))})"
    caption = "matches the prompt" if verdict.caption_agreement else (
        f"differs from the prompt ({', '.join(failed_checks(verdict.checks, 'TA'))})"
    )
    return f"{motion}, {caption}"


class VisionLanguageCritic:
    """A VLM (`models/vlm.py`) that rates videos 1–5 and compares pairs with VideoAlign's rubric."""

    name = "vlm"

    def __init__(self, cfg: VLMConfig) -> None:
        from models.vlm import VLMCritic

        self.vlm = VLMCritic(cfg)

    def score(self, videos: Sequence[Video], prompts: Sequence[str]) -> PointScores:
        if not videos:
            return PointScores(np.zeros((0, 3)), [], [])
        judgements = self.vlm.rate([v.frames for v in videos], list(prompts), [v.fps for v in videos])
        scores = np.array(
            [[np.nan if j.scores[d] is None else float(j.scores[d]) for d in DIMENSIONS] for j in judgements],
            dtype=np.float64,
        )
        return PointScores(scores, [j.rationale for j in judgements], [j.raw for j in judgements])

    def compare(
        self, videos_a: Sequence[Video], videos_b: Sequence[Video], prompts: Sequence[str]
    ) -> list[PairVerdict]:
        if not videos_a:
            return []
        judgements = self.vlm.compare(
            [v.frames for v in videos_a], [v.frames for v in videos_b], list(prompts),
            fps_a=[v.fps for v in videos_a], fps_b=[v.fps for v in videos_b],
        )
        return [PairVerdict(dict(j.labels), j.rationale, j.raw) for j in judgements]


# (frames (N, F, H, W, 3) uint8, prompts, fps) -> (N, 3) z-normalised rewards for VQ, MQ, TA. The
# frame rate goes along because a reward model reads videos at the rate it was trained at.
RewardScorer = Callable[[np.ndarray, Sequence[str], float], np.ndarray]


class RewardModelCritic:
    """Labels by a reward model's normalised rewards: per dimension A or B by the sign of
    r_A − r_B, a tie when |r_A − r_B| ≤ ε (VideoAlign's tie calibration), invalid when not finite."""

    name = "reward_model"

    def __init__(self, scorer: RewardScorer, tie_margin: float) -> None:
        if not tie_margin >= 0:
            raise ValueError(f"RewardModelCritic: tie_margin must be >= 0, got {tie_margin}")
        self.scorer, self.tie_margin = scorer, float(tie_margin)

    def score(self, videos: Sequence[Video], prompts: Sequence[str]) -> PointScores:
        scores = np.full((len(videos), len(DIMENSIONS)), np.nan)
        # clips stack only when they share a shape, and a scorer call reads one frame rate
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, v in enumerate(videos):
            groups[(v.frames.shape, float(v.fps))].append(i)
        for (_, fps), idx in groups.items():
            rewards = np.asarray(self.scorer(np.stack([videos[i].frames for i in idx]), [prompts[i] for i in idx], fps))
            if rewards.shape != (len(idx), len(DIMENSIONS)):
                raise ValueError(
                    f"reward scorer returned shape {rewards.shape} for {len(idx)} videos; it must return "
                    f"(videos, {len(DIMENSIONS)}) rewards for {DIMENSIONS}"
                )
            scores[idx] = rewards.astype(np.float64)
        return PointScores(scores, [None] * len(videos), [None] * len(videos))

    def compare(
        self, videos_a: Sequence[Video], videos_b: Sequence[Video], prompts: Sequence[str]
    ) -> list[PairVerdict]:
        n = len(videos_a)
        rewards = self.score([*videos_a, *videos_b], [*prompts, *prompts]).scores
        out = []
        for d_row in rewards[:n] - rewards[n:]:
            labels = {dim: self.label(float(d)) for dim, d in zip(DIMENSIONS, d_row, strict=True)}
            parts = ", ".join(f"{dim} {d:+.3f}" for dim, d in zip(DIMENSIONS, d_row, strict=True))
            out.append(PairVerdict(labels, f"r_A - r_B: {parts} (tie within {self.tie_margin:g})", None))
        return out

    def label(self, d: float) -> str:
        if not np.isfinite(d):
            return INVALID
        if abs(d) <= self.tie_margin:
            return "tie"
        return "A" if d > 0 else "B"


def load_reward_scorer(folder: str | Path, device: str | None = None) -> RewardScorer:
    """A scorer from a `RewardModel.save_pretrained` folder: z-normalised rewards at the clips' fps."""
    from models.reward_model import RewardModel

    model = RewardModel.from_pretrained(folder, device=device)

    def scorer(frames: np.ndarray, prompts: Sequence[str], fps: float) -> np.ndarray:
        return model.score(frames, list(prompts), fps=fps, normalise=True).cpu().numpy()

    return scorer


def build_critic(cfg: LabelConfig, reward_folder: str | None = None, device: str | None = None) -> Critic:
    """The critic `cfg` names; `device` (from the actor's GPU share) replaces an `auto` device."""
    if cfg.critic == "annotators":
        return AnnotatorCritic(cfg.raters, cfg.label_noise, cfg.tie_rate, cfg.seed)
    if cfg.critic == "vlm":
        vlm = cfg.vlm
        if device is not None and vlm.device == "auto":
            vlm = vlm.model_copy(update={"device": device})
        return VisionLanguageCritic(vlm)
    if reward_folder is None:
        raise ValueError("build_critic: the reward_model critic needs a checkpoint folder")
    return RewardModelCritic(load_reward_scorer(reward_folder, device), cfg.tie_margin)


# ---------------------------------------------------------------------------------------------
# 4. Workers: decode, then ask the critic (a Ray actor, or this process)


@dataclass(frozen=True)
class VideoRef:
    generation_id: str
    path: str  # absolute
    prompt: str


@dataclass(frozen=True)
class ScoreJob:
    index: int
    videos: tuple[VideoRef, ...]


@dataclass(frozen=True)
class CompareJob:
    index: int
    pairs: tuple[tuple[str, VideoRef, VideoRef], ...]  # (pair_id, A, B)


def load_video(ref: VideoRef) -> Video | str:
    """The decoded video, or the reason it cannot be used (a file problem never raises)."""
    from tasks.video_io import VideoReadError, probe_video, read_video

    probe = probe_video(ref.path)
    if not probe.readable:
        return probe.reason or "unreadable"
    if not probe.fps or not np.isfinite(probe.fps) or probe.fps <= 0:
        return "unknown_fps"
    try:
        return Video(ref.generation_id, read_video(ref.path), float(probe.fps))
    except VideoReadError as err:
        return err.reason


class CriticWorker:
    """One critic, loaded once; scores and compares job after job."""

    def __init__(self, cfg: dict, reward_folder: str | None, device: str | None) -> None:
        self.critic = build_critic(LabelConfig.model_validate(cfg), reward_folder, device)

    def score_job(self, job: ScoreJob) -> list[dict[str, Any]]:
        """Per video: scores (3 floats, None for an unreadable answer), rationale, raw, reason."""
        loaded = {ref.generation_id: load_video(ref) for ref in job.videos}
        ok = [ref for ref in job.videos if isinstance(loaded[ref.generation_id], Video)]
        result = self.critic.score([loaded[r.generation_id] for r in ok], [r.prompt for r in ok])
        answers = {
            ref.generation_id: (row, why, raw)
            for ref, row, why, raw in zip(ok, result.scores, result.rationales, result.raws, strict=True)
        }
        out = []
        for ref in job.videos:
            if ref.generation_id not in answers:
                out.append({"generation_id": ref.generation_id, "scores": None, "rationale": None, "raw": None,
                            "reason": loaded[ref.generation_id]})
                continue
            row, why, raw = answers[ref.generation_id]
            scores = [None if not np.isfinite(x) else float(x) for x in row]
            reason = None if all(x is not None for x in scores) else "unreadable_answer"
            out.append({"generation_id": ref.generation_id, "scores": scores, "rationale": why, "raw": raw,
                        "reason": reason})
        return out

    def compare_job(self, job: CompareJob) -> list[dict[str, Any]]:
        """Per pair: labels per dimension, rationale, raw; a side that no longer decodes is invalid."""
        loaded = {ref.generation_id: load_video(ref) for _, a, b in job.pairs for ref in (a, b)}
        ok = [p for p in job.pairs if all(isinstance(loaded[r.generation_id], Video) for r in p[1:])]
        verdicts = self.critic.compare(
            [loaded[a.generation_id] for _, a, _ in ok],
            [loaded[b.generation_id] for _, _, b in ok],
            [a.prompt for _, a, _ in ok],
        )
        answers = {pid: v for (pid, _, _), v in zip(ok, verdicts, strict=True)}
        out = []
        for pid, a, b in job.pairs:
            verdict = answers.get(pid)
            if verdict is None:
                why = "; ".join(f"video {side} unreadable ({loaded[r.generation_id]})"
                                for side, r in (("A", a), ("B", b)) if not isinstance(loaded[r.generation_id], Video))
                verdict = PairVerdict({d: INVALID for d in DIMENSIONS}, why, None)
            out.append({"pair_id": pid, "labels": verdict.labels, "rationale": verdict.rationale, "raw": verdict.raw})
        return out


JobRunner = Callable[[str, Sequence[Any]], list[Any]]


@contextlib.contextmanager
def critic_pool(
    cfg: LabelConfig,
    reward_folder: str | None,
    address: str | None,
    worker_cls: type,
    videos: int,
    progress: Callable[[int, int], None] | None,
) -> Iterator[tuple[JobRunner, int]]:
    """(run jobs of a worker method in order, videos or pairs per job): a Ray actor pool, or one
    worker in this process; the same workers serve every call inside the block."""
    use_ray = cfg.backend == "ray" or (cfg.backend == "auto" and cfg.critic != "annotators")
    overrides = {k: v for k, v in {"actors": cfg.actors, "num_gpus": cfg.num_gpus, "batch_size": cfg.batch_size}.items()
                 if v is not None}
    if not use_ray:
        from infra.resources import resources_for, torch_device

        # the annotators need no torch: do not import it to count GPUs
        gpus = 0.0 if cfg.critic == "annotators" else None
        res = resources_for("label", overrides, gpus_available=gpus)
        device = None if cfg.critic == "annotators" else torch_device(res.num_gpus)
        worker = worker_cls(cfg.model_dump(mode="json"), reward_folder, device)

        def run_local(method: str, jobs: Sequence[Any]) -> list[Any]:
            results = []
            for done, job in enumerate(jobs, start=1):
                results.append(getattr(worker, method)(job))
                if progress is not None:
                    progress(done, len(jobs))
            return results

        yield run_local, res.batch_size
        return
    import ray

    from infra.ray_cluster import ray_session
    from infra.resources import resources_for, torch_device

    with ray_session(address=address):
        res = resources_for("label", overrides, gpus_available=ray.cluster_resources().get("GPU", 0.0))
        device = None if cfg.critic == "annotators" else torch_device(res.num_gpus)
        remote = ray.remote(worker_cls).options(max_restarts=3, max_task_retries=3, **res.ray_options())
        actors = [remote.remote(cfg.model_dump(mode="json"), reward_folder, device)
                  for _ in range(max(1, min(res.actors, -(-videos // res.batch_size))))]
        try:
            yield (lambda method, jobs: _run_on_actors(actors, method, jobs, progress)), res.batch_size
        finally:
            for actor in actors:
                ray.kill(actor)


def _run_on_actors(actors: Sequence[Any], method: str, jobs: Sequence[Any], progress) -> list[Any]:
    """Each job's result, in job order; an idle actor takes the next job. A dead actor is
    restarted by Ray and its job retried."""
    import ray

    results: list[Any] = [None] * len(jobs)
    queue = list(enumerate(jobs))
    running = {}
    for actor in actors:
        if queue:
            i, job = queue.pop(0)
            running[getattr(actor, method).remote(job)] = (actor, i)
    done = 0
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, i = running.pop(ready[0])
        results[i] = ray.get(ready[0])
        done += 1
        if progress is not None:
            progress(done, len(jobs))
        if queue:
            j, job = queue.pop(0)
            running[getattr(actor, method).remote(job)] = (actor, j)
    return results


# ---------------------------------------------------------------------------------------------
# 5. The edge


def resolve_critic(inputs: Mapping[str, ManifestRef], cfg: LabelConfig, layout: RunLayout) -> tuple[str | None, str]:
    """(reward model folder or None, the critic's name for the `critic` column)."""
    if cfg.critic == "annotators":
        return None, "annotators"
    if cfg.critic == "vlm":
        return None, f"vlm:{cfg.vlm.model}"
    if cfg.reward_model is not None:
        folder = Path(cfg.reward_model)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"label.reward_model={cfg.reward_model!r} is not a folder; give a folder written by "
                "RewardModel.save_pretrained (the train_reward stage's checkpoint)"
            )
        return str(folder), f"reward_model:{folder.name}"
    if "checkpoints" not in inputs:
        raise ValueError(
            "label.critic is `reward_model` but neither label.reward_model nor a `checkpoints` input names a "
            "checkpoint; run train_reward first, or set label.reward_model to a RewardModel.save_pretrained folder"
        )
    ckpt = read_manifest(inputs["checkpoints"].path, "checkpoints", layout)
    rows = [r for r in ckpt.rows() if r["kind"] == "reward_model"]
    if len(rows) != 1:
        raise ValueError(
            f"`{inputs['checkpoints'].path}`: expected one `reward_model` row, found {len(rows)}; pass train_reward's "
            "checkpoints manifest, or set label.reward_model to a folder"
        )
    return str(layout.resolve(rows[0]["path"])), f"reward_model:{rows[0]['checkpoint_id']}"


def chunks(items: Sequence[Any], size: int) -> list[tuple[Any, ...]]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def run(
    inputs: Mapping[str, ManifestRef],
    cfg: LabelConfig,
    layout: RunLayout,
    out: StageDir,
    lineage: Lineage,
    *,
    round: int = 1,
    ray_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    worker_cls: type | None = None,
) -> StageResult:
    """`generations` → pointwise scores of every video → pairs → the `labels` manifest."""
    # 1. check inputs: the generations and the critic
    gens = read_manifest(inputs["generations"].path, "generations", layout).rows()
    reward_folder, critic_id = resolve_critic(inputs, cfg, layout)
    refs = [VideoRef(r["generation_id"], str(layout.resolve(r["video_path"])), r["prompt"]) for r in gens]
    scored: dict[str, dict] = {}
    verdicts: dict[str, dict] = {}
    pairs: list[tuple[Sample, Sample]] = []
    outcomes: dict[str, PromptOutcome] = {}
    seconds = {"score_seconds": 0.0, "compare_seconds": 0.0}
    out.path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        run_jobs, size = (None, 1) if not refs else stack.enter_context(
            critic_pool(cfg, reward_folder, ray_address, worker_cls or CriticWorker, len(refs), progress)
        )
        # 2. pointwise scores of every video (unreadable ones keep their reason)
        t0 = time.perf_counter()
        if refs:
            jobs = [ScoreJob(i, batch) for i, batch in enumerate(chunks(refs, size))]
            scored = {r["generation_id"]: r for result in run_jobs("score_job", jobs) for r in result}
        seconds["score_seconds"] = time.perf_counter() - t0
        samples = [
            Sample(
                r["generation_id"], r["prompt_id"], r["prompt"], r["sample_index"], r["video_path"],
                readable=scored[r["generation_id"]]["scores"] is not None,
                scores=_scores_tuple(scored[r["generation_id"]]["scores"]),
            )
            for r in gens
        ]
        # 3. pairs by the pairing rule, labelled by the critic
        pairs, outcomes = plan_pairs(samples, cfg)
        t0 = time.perf_counter()
        if pairs:
            by_id = {ref.generation_id: ref for ref in refs}
            items = [(pair_id(a, b), by_id[a.generation_id], by_id[b.generation_id]) for a, b in pairs]
            jobs = [CompareJob(i, batch) for i, batch in enumerate(chunks(items, size))]
            verdicts = {v["pair_id"]: v for result in run_jobs("compare_job", jobs) for v in result}
        seconds["compare_seconds"] = time.perf_counter() - t0
    # 4. the side table of pointwise scores, then the manifest, then the counts
    write_scores(out.path / SCORES_FILE, gens, scored, critic_id, lineage)
    rows = []
    for a, b in pairs:
        v = verdicts[pair_id(a, b)]
        rows.append({
            "pair_id": pair_id(a, b), "prompt": a.prompt, "video_a": a.video_path, "video_b": b.video_path,
            **{f"label_{d.lower()}": v["labels"][d] for d in DIMENSIONS},
            **{f"score_{d.lower()}": m for d, m in zip(DIMENSIONS, margins(a, b), strict=True)},
            "critic": critic_id, "rationale": v["rationale"], "raw_response": v["raw"], "round": round,
        })
    ref = write_manifest(rows, "labels", out.manifest_path, layout, lineage)
    metrics = {**seconds, "compute_s": seconds["score_seconds"] + seconds["compare_seconds"]}
    return StageResult(ref, counts=summarize(scored.values(), rows, outcomes), metrics=metrics)


def _scores_tuple(scores: list[float | None] | None) -> tuple[float, float, float] | None:
    if scores is None:
        return None
    return tuple(np.nan if x is None else float(x) for x in scores)


def summarize(scored: Iterable[dict], rows: Sequence[dict], outcomes: Mapping[str, PromptOutcome]) -> dict[str, int]:
    """Counts for the UI: videos (unreadable by reason, unscored), prompts, pairs, ties and invalid per dimension."""
    scored = list(scored)
    unreadable = Counter(s["reason"] for s in scored if s["scores"] is None)
    counts = {
        "videos": len(scored),
        "unreadable_videos": sum(unreadable.values()),
        **{f"unreadable_{reason}": n for reason, n in sorted(unreadable.items())},
        "unscored_videos": sum(1 for s in scored if s["reason"] == "unreadable_answer"),
        "prompts": len(outcomes),
        "prompts_paired": sum(1 for o in outcomes.values() if o.pairs),
        "prompts_without_pair": sum(1 for o in outcomes.values() if not o.pairs),
        "prompts_all_equal": sum(1 for o in outcomes.values() if o.all_equal),
        "prompts_too_few_videos": sum(1 for o in outcomes.values() if o.too_few),
        "pairs": len(rows),
    }
    for d in DIMENSIONS:
        column = f"label_{d.lower()}"
        counts[f"ties_{d.lower()}"] = sum(1 for r in rows if r[column] == "tie")
        counts[f"invalid_{d.lower()}"] = sum(1 for r in rows if r[column] == INVALID)
    return counts


SCORES_SCHEMA = pa.schema(
    [
        pa.field("generation_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        *[pa.field(f"score_{d.lower()}", pa.float64()) for d in DIMENSIONS],
        pa.field("overall", pa.float64()),
        pa.field("reason", pa.string()),
        pa.field("critic", pa.string(), nullable=False),
        pa.field("rationale", pa.string()),
        pa.field("raw_response", pa.string()),
    ]
)


def write_scores(path: Path, gens: Sequence[Mapping[str, Any]], scored: Mapping[str, dict], critic_id: str,
                 lineage: Lineage) -> None:
    """Every generation's pointwise scores (null where unreadable, with the reason), atomically."""
    rows = []
    for g in gens:
        s = scored[g["generation_id"]]
        values = s["scores"] or [None] * len(DIMENSIONS)
        overall = float(np.mean(values)) if all(v is not None for v in values) else None
        rows.append({
            "generation_id": g["generation_id"], "prompt_id": g["prompt_id"], "prompt": g["prompt"],
            "video_path": g["video_path"], **{f"score_{d.lower()}": v for d, v in zip(DIMENSIONS, values, strict=True)},
            "overall": overall, "reason": s["reason"], "critic": critic_id, "rationale": s["rationale"],
            "raw_response": s["raw"],
        })
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA).replace_schema_metadata(
        {b"prefloop.cache_key": lineage.cache_key.encode(), b"prefloop.lineage": lineage.to_json().encode()}
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue())


def read_scores(path: Path) -> pa.Table:
    """The stage's `scores.parquet`, read with its explicit schema."""
    return pq.read_table(path, schema=SCORES_SCHEMA)
