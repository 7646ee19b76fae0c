"""Simulated human raters for the embedded world: the physics judge's checklist read as VQ/MQ/TA
scores, and a panel of noisy raters whose majority vote labels a pair.

In the embedded world the first labels of the loop come from "people" whose ground truth is the
physics judge (DESIGN.md): each rater sees what the judge sees, but slips now and then, and is
sometimes unsure. That makes the labels as noisy as human labels are, with a truth that is known.

Pointwise scores: the judge's verdict is a checklist; each dimension is the share of its checks
that pass, in [0, 1], so one failed check lowers a score without zeroing it.

- VQ (visual quality: what the frames show, not how things move, VideoAlign's rubric):
  `balls_tracked` (one or two balls of the palette clearly visible in the first frame),
  `stays_visible` (no ball fades out or vanishes), `colour_constant` (no blob of another colour
  appears). A blurred, noisy or empty generation fails these first.
- MQ (motion quality): all eight plausibility checks of the judge (`PLAUSIBILITY_CHECKS`):
  `enough_frames`, the three visual checks (a ball that vanishes or changes colour does not move
  like a real object either), `continuous` (no jump), `no_hovering`, `floor_respected`,
  `gravity_fit`. MQ = 1 exactly when the judge calls the clip physically plausible: the number
  the loop is run to raise.
- TA (text alignment): `colour_match`, `motion_match`, `direction_match` of what the judge saw
  against what the caption says. TA = 1 exactly when the judge finds caption agreement.

Pair labels: the noise-free label of a dimension is the sign of s(A) − s(B) (`tie` when equal).
Each of `raters` raters says `tie` with probability `tie_rate` whatever the videos show, and
otherwise flips a non-tie label (A ↔ B) with probability `label_noise`; the panel's label is the
strict majority of the votes, and a tie when there is none. With three raters, no unsure votes
and slip rate p, the majority is wrong with probability 3p²(1−p) + p³ = 3p² − 2p³ (p = 0.1:
2.8 % instead of 10 %).

Each pair draws its noise from its own generator, seeded by (seed, its two video ids): labels do
not depend on the order, the sharding or the machine that labels them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from models.physics_judge import PLAUSIBILITY_CHECKS

DIMENSIONS = ("VQ", "MQ", "TA")
VQ_CHECKS = ("balls_tracked", "stays_visible", "colour_constant")
MQ_CHECKS = PLAUSIBILITY_CHECKS
TA_CHECKS = ("colour_match", "motion_match", "direction_match")
CHECKS = {"VQ": VQ_CHECKS, "MQ": MQ_CHECKS, "TA": TA_CHECKS}
FLIP = {"A": "B", "B": "A"}


def checklist_scores(checks: Mapping[str, bool]) -> tuple[float, float, float]:
    """(VQ, MQ, TA): the share of each dimension's judge checks that pass."""
    missing = [c for dim in DIMENSIONS for c in CHECKS[dim] if c not in checks]
    if missing:
        raise KeyError(f"checklist_scores: the verdict lacks checks {missing}; pass `PhysicsJudge.judge(...).checks`")
    return tuple(float(np.mean([bool(checks[c]) for c in CHECKS[dim]])) for dim in DIMENSIONS)


def failed_checks(checks: Mapping[str, bool], dim: str) -> list[str]:
    """The checks of one dimension that fail (what a rater would say is wrong)."""
    return [c for c in CHECKS[dim] if not checks.get(c, False)]


def noise_free_label(score_a: float, score_b: float) -> str:
    """`A` when A scores higher, `B` when B does, `tie` when they are equal."""
    if score_a > score_b:
        return "A"
    if score_b > score_a:
        return "B"
    return "tie"


def pair_rng(seed: int, id_a: str, id_b: str) -> np.random.Generator:
    """The generator of one pair's rater noise: a function of the seed and the pair, nothing else."""
    digest = hashlib.sha256(f"{seed}/{id_a}/{id_b}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def rater_votes(truth: str, raters: int, label_noise: float, tie_rate: float, rng: np.random.Generator) -> list[str]:
    """What each rater says about one dimension whose noise-free label is `truth`.

    Every rater draws two uniforms whatever the outcome, so one rater's answer never shifts the
    random stream of the next.
    """
    if truth not in ("A", "B", "tie"):
        raise ValueError(f"rater_votes: truth must be A, B or tie, got {truth!r}")
    votes = []
    for unsure, slip in rng.random((raters, 2)):
        if unsure < tie_rate:
            votes.append("tie")
        elif truth != "tie" and slip < label_noise:
            votes.append(FLIP[truth])
        else:
            votes.append(truth)
    return votes


def majority(votes: Sequence[str]) -> str:
    """The label more than half of the votes give; `tie` when no label has a strict majority."""
    if not votes:
        raise ValueError("majority: no votes; a panel needs at least one rater")
    label, count = Counter(votes).most_common(1)[0]
    return label if 2 * count > len(votes) else "tie"
