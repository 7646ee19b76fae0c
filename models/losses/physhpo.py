"""PhysHPO's hierarchical preference terms, opt-in pieces around the DPO loss.

Chen et al. 2025, "Hierarchical Fine-grained Preference Optimization for Physically Plausible
Video Generation" (arXiv 2508.10858):

```
L = L_instance + λ·L_state + ρ·L_motion + μ·L_semantic          λ=0.4, ρ=0.3, μ=0.2
```

- instance: a real (selected) video as winner; losers mixed from a generation for the same
  prompt (weight 0.7) and one for a randomly masked prompt (weight 0.3): `weighted_negatives`,
  `mask_prompt`.
- state: the winner against itself with its first/last 2 frames replaced (`boundary_anchored`).
- motion: the DPO margin on temporal differences of the velocity field (`motion_errors`).
- semantic: one video under its true caption against a rewritten caption (condition-side DPO;
  the caller swaps `cond`, nothing video-side is needed here).

Each level's L is a preference loss (e.g. `flow_dpo_loss(...).loss`) on that level's pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from models.losses.common import VIDEO_LAYOUT, check_errors, check_non_negative


def _check_scalar(name: str, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a scalar loss tensor, got {shape}; pass e.g. `flow_dpo_loss(...).loss`")


def hierarchical_loss(
    instance: torch.Tensor,
    state: torch.Tensor | None = None,
    motion: torch.Tensor | None = None,
    semantic: torch.Tensor | None = None,
    lam: float = 0.4,
    rho: float = 0.3,
    mu: float = 0.2,
) -> torch.Tensor:
    """`L_instance + λ·L_state + ρ·L_motion + μ·L_semantic`; a level given as None is left out.

    Defaults λ=0.4, ρ=0.3, μ=0.2 are PhysHPO's. Each term is a scalar loss, already averaged over
    its pairs.
    """
    _check_scalar("instance", instance)
    total = instance
    for name, term, weight_name, weight in (
        ("state", state, "lam", lam),
        ("motion", motion, "rho", rho),
        ("semantic", semantic, "mu", mu),
    ):
        check_non_negative(weight_name, weight)
        if term is not None:
            _check_scalar(name, term)
            total = total + float(weight) * term
    return total


def weighted_negatives(
    per_pair_losses_same_prompt: torch.Tensor,
    per_pair_losses_masked_prompt: torch.Tensor,
    w_same: float = 0.7,
    w_masked: float = 0.3,
) -> torch.Tensor:
    """Instance-level loss with mixed losers: `w_same·mean(L_same) + w_masked·mean(L_masked)`.

    `L_same` (B1,) are per-pair losses with a generation for the same prompt as loser, `L_masked`
    (B2,) with a generation for a randomly masked prompt (`mask_prompt`). PhysHPO's 0.7 / 0.3.
    """
    check_errors(per_pair_losses_same_prompt=per_pair_losses_same_prompt)
    check_errors(per_pair_losses_masked_prompt=per_pair_losses_masked_prompt)
    check_non_negative("w_same", w_same)
    check_non_negative("w_masked", w_masked)
    return float(w_same) * per_pair_losses_same_prompt.mean() + float(w_masked) * per_pair_losses_masked_prompt.mean()


def boundary_anchored(video: torch.Tensor, donor: torch.Tensor, n: int = 2) -> torch.Tensor:
    """State-level loser: `video` (B,C,F,H,W) with its first n and last n frames taken from `donor`.

    The middle frames are untouched, so the pair differs only at the boundary states the model
    should keep consistent with the motion in between. PhysHPO uses n=2. Inputs are not changed.
    """
    if video.ndim != 5:
        raise ValueError(f"`video` has shape {tuple(video.shape)}; expected {VIDEO_LAYOUT}")
    if donor.shape != video.shape:
        raise ValueError(
            f"`donor` has shape {tuple(donor.shape)} but `video` has shape {tuple(video.shape)}; "
            f"bring the donor to the video's {VIDEO_LAYOUT} first"
        )
    frames = video.shape[2]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or 2 * n >= frames:
        raise ValueError(
            f"`n`={n!r} boundary frames on each side of a {frames}-frame video; need 1 <= n and 2·n < {frames} "
            "so that some original frames remain"
        )
    return torch.cat([donor[:, :, :n], video[:, :, n : frames - n], donor[:, :, frames - n :]], dim=2)


def temporal_difference(x: torch.Tensor) -> torch.Tensor:
    """`x[:, :, 1:] - x[:, :, :-1]`: the change from frame to frame of a (B,C,F,H,W) tensor, F-1 frames."""
    if x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"`x` has shape {tuple(x.shape)}; expected {VIDEO_LAYOUT} with F >= 2")
    return x[:, :, 1:] - x[:, :, :-1]


def motion_errors(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """Motion-level error (B,): `mean over C·(F-1)·H·W of (Δ_t v_pred - Δ_t v_target)²`, float32.

    Δ_t is `temporal_difference`. Used in place of the velocity errors in `flow_dpo_loss`, it
    gives PhysHPO's motion-level margin: the preference acts on how the velocity field changes
    between frames rather than on its value.
    """
    if v_pred.shape != v_target.shape:
        raise ValueError(
            f"`v_pred` has shape {tuple(v_pred.shape)} but `v_target` has shape {tuple(v_target.shape)}; "
            f"both must be velocities of one video batch {VIDEO_LAYOUT}"
        )
    diff = temporal_difference(v_pred.float()) - temporal_difference(v_target.float())
    return diff.pow(2).flatten(1).mean(1)


def mask_prompt(prompt: str, rng: np.random.Generator, p: float = 0.5, mask_token: str | None = None) -> str:
    """The prompt with each word independently masked with probability p (PhysHPO's masked-prompt losers).

    A masked word is dropped, or replaced by `mask_token` if given. Words are split on
    whitespace and rejoined with single spaces; p=1 without a mask token gives "" (the
    unconditional prompt).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a str, got {type(prompt).__name__}")
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise ValueError(f"`p` must be a probability in [0, 1], got {p!r}")
    words = prompt.split()
    masked = rng.random(len(words)) < p
    if mask_token is None:
        return " ".join(word for word, hit in zip(words, masked, strict=True) if not hit)
    return " ".join(mask_token if hit else word for word, hit in zip(words, masked, strict=True))
