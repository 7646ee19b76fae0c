"""Preference losses for text-to-video models: small pure functions on per-sample errors.

One family per file; all take per-sample errors (B,) that are **means** over the elements of a
video, so every β is a β for mean-reduced errors (ALGORITHMS.md §1–4). `pair_errors` computes
the errors of a (winner, loser) pair for any velocity model with one shared t and ε.
"""

from models.losses.common import (
    PairErrors,
    PreferenceLossOutput,
    frame_mask_errors,
    implicit_accuracy,
    noisy_input,
    pair_errors,
    preference_margin,
)
from models.losses.diffusion_dpo import PAPER_BETA, diffusion_dpo_loss
from models.losses.flow_dpo import BETA_SCHEDULES, beta_at, flow_dpo_loss
from models.losses.ipo import ipo_loss
from models.losses.kto import KTOLossOutput, all_reduce_mean, kto_loss
from models.losses.physhpo import (
    boundary_anchored,
    hierarchical_loss,
    mask_prompt,
    motion_errors,
    temporal_difference,
    weighted_negatives,
)
from models.losses.rwr import rwr_loss, rwr_weights
from models.losses.sft import regularised, sft_loss

__all__ = [
    "BETA_SCHEDULES",
    "PAPER_BETA",
    "KTOLossOutput",
    "PairErrors",
    "PreferenceLossOutput",
    "all_reduce_mean",
    "beta_at",
    "boundary_anchored",
    "diffusion_dpo_loss",
    "flow_dpo_loss",
    "frame_mask_errors",
    "hierarchical_loss",
    "implicit_accuracy",
    "ipo_loss",
    "kto_loss",
    "noisy_input",
    "mask_prompt",
    "motion_errors",
    "pair_errors",
    "preference_margin",
    "regularised",
    "rwr_loss",
    "rwr_weights",
    "sft_loss",
    "temporal_difference",
    "weighted_negatives",
]
