"""What every preference loss shares: input checks, the pair's errors, the reference-free margin Δ.

Conventions (ALGORITHMS.md): rectified flow `x_t = (1-t)·x0 + t·ε` (t=1 pure noise, t=0 data;
Liu et al. 2022, arXiv 2209.03003), velocity target `v = ε - x0`. A per-sample error is the
**mean** over every element of a video, so every β in this package is a β for mean-reduced
errors: a β quoted for sum-reduced errors corresponds to β_sum·(C·F·H·W) here.

The losses take per-sample errors of shape (B,) that the caller computed, so they do not depend
on any model. `pair_errors` computes them for a velocity model; call it once with the policy and
once with the reference (under `torch.no_grad()`) with the same `t` and `noise`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""Any callable `(x_t (B,C,F,H,W), t (B,), cond) -> velocity (B,C,F,H,W)`."""

VIDEO_LAYOUT = "(B, C, F, H, W)"


# ---------------------------------------------------------------------------------------------
# 1. Input checks


def check_positive(name: str, value: float) -> None:
    """Refuse a non-positive, non-finite or non-numeric coefficient such as β or τ."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}; pass e.g. `{name}=1.0`")


def check_non_negative(name: str, value: float) -> None:
    """Refuse a negative or non-finite weight such as λ; 0 switches a term off."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}; use 0 to switch the term off")


def check_errors(**errors: torch.Tensor) -> None:
    """Every argument must be a floating tensor of shape (B,), B >= 1, all of the same shape."""
    first_name, first = None, None
    for name, value in errors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"`{name}` must be a floating-point torch.Tensor of shape (B,), got {kind}")
        if value.ndim != 1 or value.numel() == 0:
            raise ValueError(
                f"`{name}` has shape {tuple(value.shape)}; pass one error per sample, shape (B,) with B >= 1 "
                "(reduce a per-element error with `.flatten(1).mean(1)`, or use `pair_errors`)"
            )
        if first is None:
            first_name, first = name, value
        elif value.shape != first.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(value.shape)} but `{first_name}` has shape {tuple(first.shape)}; "
                f"pass the same pairs to every argument ({', '.join(f'`{n}`' for n in errors)} all of shape (B,))"
            )


def _check_same_video_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    if reference.ndim != 5:
        raise ValueError(
            f"`{reference_name}` has shape {tuple(reference.shape)}; expected a video batch {VIDEO_LAYOUT}"
        )
    for name, value in others.items():
        if value.shape != reference.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(value.shape)} but `{reference_name}` has shape {tuple(reference.shape)}; "
                f"bring both to one {VIDEO_LAYOUT} (same clip length and resolution) before pairing them"
            )


# ---------------------------------------------------------------------------------------------
# 2. Errors of a pair (the only place a model is called)


class PairErrors(NamedTuple):
    """Per-sample errors of the winners and the losers, each (B,)."""

    e_w: torch.Tensor
    e_l: torch.Tensor


def frame_mask_errors(sq_err: torch.Tensor, exclude_first_frame: bool) -> torch.Tensor:
    """Per-sample mean of a squared error (B,C,F,H,W) → (B,), optionally without frame 0.

    HuViDPO (arXiv 2502.01690) conditions on the first frame: frame 0 is given and held fixed
    while sampling, so it carries no preference signal and the DPO errors exclude it,
    `e = mean over C, f=1..F-1, H, W`. Otherwise the mean runs over all elements.
    """
    if sq_err.ndim != 5:
        raise ValueError(f"`sq_err` has shape {tuple(sq_err.shape)}; expected {VIDEO_LAYOUT}")
    if exclude_first_frame:
        if sq_err.shape[2] < 2:
            raise ValueError(
                f"`sq_err` has {sq_err.shape[2]} frame(s) (shape {tuple(sq_err.shape)}); excluding frame 0 "
                "needs at least 2 frames; set `exclude_first_frame=False` for single-frame clips"
            )
        sq_err = sq_err[:, :, 1:]
    return sq_err.flatten(1).mean(1)


def held_frame_times(t: torch.Tensor, frames: int, held: torch.Tensor | bool = True) -> torch.Tensor:
    """Per-frame times (B, F) for one time per video t (B,): frame 0 at t = 0 in the rows `held`
    marks (all rows for True), as a clean given first frame is presented (Wan 2.2 TI2V)."""
    times = t.reshape(-1, 1).repeat(1, frames)
    times[:, 0] = torch.where(torch.as_tensor(held, device=t.device), torch.zeros_like(times[:, 0]), times[:, 0])
    return times


def noisy_input(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, hold_first_frame: torch.Tensor | bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x_t, t_in)` for the velocity network: `x_t = (1-t)·x0 + t·ε`, t_in = t (B,).

    `hold_first_frame` (a policy trained to continue a given frame, Wan 2.2 TI2V; True for every
    row or a (B,) bool mask): frame 0 of a held row's x_t is x0's own, and t_in is (B, F) with that
    row's frame 0 at t = 0, as the sampler holds a given frame.
    """
    tb = t.view(-1, 1, 1, 1, 1).to(x0.dtype)
    x_t = (1 - tb) * x0 + tb * noise
    held = torch.as_tensor(hold_first_frame, device=x0.device)
    if not bool(held.any()):
        return x_t, t
    x_t[:, :, 0] = torch.where(held.view(-1, 1, 1, 1), x0[:, :, 0], x_t[:, :, 0])
    return x_t, held_frame_times(t, x0.shape[2], held)


def pair_errors(
    velocity_fn: VelocityFn,
    x_w: torch.Tensor,
    x_l: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cond: Any,
    exclude_first_frame: bool = False,
    hold_first_frame: bool = False,
) -> PairErrors:
    """Rectified-flow errors of winner and loser with ONE shared t and ONE shared ε per pair.

    `x_t = (1-t)·x0 + t·ε`, `e = mean over C·F·H·W of (velocity_fn(x_t, t, cond) - (ε - x0))²`,
    computed in float32, for x0 = x_w and x0 = x_l with the same t (B,) and ε (B,C,F,H,W):
    sharing them makes Δ compare the two videos rather than two noise draws (VideoAlign,
    arXiv 2501.13918). `cond` is passed to `velocity_fn` unchanged (one prompt per pair).
    `exclude_first_frame` drops frame 0 from the mean (HuViDPO; see `frame_mask_errors`);
    `hold_first_frame` also gives the network the clean frame 0 at t = 0 (`noisy_input`).

    For the reference errors call this again with the reference model's `velocity_fn` under
    `torch.no_grad()`, with the same `t` and `noise`.
    """
    # 1. check inputs
    _check_same_video_shape("x_w", x_w, x_l=x_l, noise=noise)
    if t.shape != (x_w.shape[0],):
        raise ValueError(
            f"`t` has shape {tuple(t.shape)} but `x_w` has shape {tuple(x_w.shape)}; pass one time per pair, "
            f"shape ({x_w.shape[0]},)"
        )
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(
            f"`t` must lie in [0, 1] (t=1 pure noise, t=0 data); got min {float(t.min())}, max {float(t.max())}"
        )

    if hold_first_frame and not exclude_first_frame:
        raise ValueError("`hold_first_frame` gives frame 0 as input, so its error says nothing: set `exclude_first_frame`")

    # 2. interpolate each video with the shared t and ε, and regress the velocity
    errors = []
    for name, x0 in (("winner", x_w), ("loser", x_l)):
        x_t, t_in = noisy_input(x0, t, noise, hold_first_frame)
        velocity = velocity_fn(x_t, t_in, cond)
        if velocity.shape != x0.shape:
            raise ValueError(
                f"`velocity_fn` returned shape {tuple(velocity.shape)} for the {name} of shape {tuple(x0.shape)}; "
                f"it must return a velocity of the input's shape {VIDEO_LAYOUT}"
            )
        sq_err = (velocity.float() - (noise - x0).float()).pow(2)
        errors.append(frame_mask_errors(sq_err, exclude_first_frame))
    return PairErrors(errors[0], errors[1])


# ---------------------------------------------------------------------------------------------
# 3. The margin and the output record of the pairwise losses


def preference_margin(
    e_w: torch.Tensor, e_l: torch.Tensor, e_w_ref: torch.Tensor, e_l_ref: torch.Tensor
) -> torch.Tensor:
    """`Δ = (e_w - e_w_ref) - (e_l - e_l_ref)`, (B,), float32; Δ < 0 means the policy prefers the winner.

    The reference errors are detached: the reference is a fixed anchor, so no gradient reaches
    it even if the caller forgot `torch.no_grad()`.
    """
    check_errors(e_w=e_w, e_l=e_l, e_w_ref=e_w_ref, e_l_ref=e_l_ref)
    return (e_w.float() - e_w_ref.detach().float()) - (e_l.float() - e_l_ref.detach().float())


def implicit_accuracy(inside: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose implicit reward margin is positive; an exact zero counts ½."""
    inside = inside.detach()
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()


@dataclass(frozen=True)
class PreferenceLossOutput:
    """What a pairwise preference loss returns; everything but `loss` and `per_pair` is detached.

    - `loss`: scalar, mean of `per_pair` over the pairs (what to backpropagate).
    - `per_pair`: (B,) loss of each pair.
    - `inside`: (B,) implicit reward margin `-(β_t/2)·Δ`; > 0 when the policy prefers the winner
      more than the reference does.
    - `implicit_accuracy`: scalar, share of pairs with `inside > 0` (exact zero counts ½).
    - `e_w`, `e_l`, `e_w_ref`, `e_l_ref`: scalar means of the four errors over the pairs.
    """

    loss: torch.Tensor
    per_pair: torch.Tensor
    inside: torch.Tensor
    implicit_accuracy: torch.Tensor
    e_w: torch.Tensor
    e_l: torch.Tensor
    e_w_ref: torch.Tensor
    e_l_ref: torch.Tensor


def preference_output(
    per_pair: torch.Tensor,
    inside: torch.Tensor,
    e_w: torch.Tensor,
    e_l: torch.Tensor,
    e_w_ref: torch.Tensor,
    e_l_ref: torch.Tensor,
) -> PreferenceLossOutput:
    """Assemble the record: mean loss over pairs, detached logging values."""
    inside = inside.detach()

    def mean(e: torch.Tensor) -> torch.Tensor:
        return e.detach().float().mean()

    return PreferenceLossOutput(
        loss=per_pair.mean(),
        per_pair=per_pair,
        inside=inside,
        implicit_accuracy=implicit_accuracy(inside),
        e_w=mean(e_w),
        e_l=mean(e_l),
        e_w_ref=mean(e_w_ref),
        e_l_ref=mean(e_l_ref),
    )
