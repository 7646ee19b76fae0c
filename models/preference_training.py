"""One round of preference fine-tuning of the policy's LoRA: Flow-DPO and its relatives.

`train_preference(policy, data, cfg)` trains only a LoRA on the policy's transformer with one of
the losses of `models.losses` (ALGORITHMS.md §1–2, §4):

| method | data | loss |
|---|---|---|
| `flow_dpo` | pairs (chosen, rejected) | `-log σ(-(β_t/2)·Δ)`, velocity errors (VideoAlign) |
| `diffusion_dpo` | pairs | the same on ε-errors `(1-t)²·e_v` (Wallace et al. 2023) |
| `ipo` | pairs | `(-Δ - 1/(2β))²` (Azar et al. 2023) |
| `kto` | single videos + desirable | `λ_y·(1 - σ(s_y·β·(g - z)))` (Ethayarajh et al. 2024) |
| `rwr` | single videos + rewards | `Σ softmax(r/τ)_i · e_i` (Flow-RWR baseline) |
| `sft` | winners (chosen) | `mean(e_w)` (baseline) |

`Δ = (e_w - e_w_ref) - (e_l - e_l_ref)`. flow_dpo, diffusion_dpo and ipo share `beta`; with uniform t
diffusion_dpo's ε-errors are a third of the velocity errors on average, so the same β acts
weaker there (its paper's β = 5000, `PAPER_BETA`, was for image models). Every per-video error is a **mean** over the elements of
the video (C·F·H·W, or without frame 0 when `exclude_first_frame`), so every β here is a β for
mean-reduced errors. Within a pair the winner and the loser share one t and one ε, and the
reference sees the same t and ε as the policy.

The reference is the same network with the LoRA switched off (`Policy.disable_adapter`, no second
copy in memory), or optionally a frozen deep copy of the transformer as it was when training
started (with a LoRA loaded from the previous round, that copy is the previous round's policy).
A non-finite loss or gradient norm is never applied: training stops, the LoRA keeps the weights
of the last good step, and the returned info says which step and why.

Data parallel: called on every worker of an initialised `torch.distributed` process group of more
than one worker (Ray Train's `TorchTrainer`, `tasks/finetune.py`), the transformer is wrapped in
DDP (only the LoRA requires grad, so only it is all-reduced). Every worker draws the same global
batch, t and ε from the shared seed and keeps its own disjoint `batch_size / world_size` rows, so N
workers train on the batches one process would (the mean of equal-sized shard means is the global
mean; rwr's softmax weights alone are normalised per shard). KTO's reference point is all-reduced
(`models/losses/kto.py`); each step's record is the mean over workers, so all stop on the same
non-finite step. Without a process group, or with one worker, nothing of this runs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_contracts.lineage import atomic_write_json
from models.losses import (
    diffusion_dpo_loss,
    flow_dpo_loss,
    frame_mask_errors,
    implicit_accuracy,
    ipo_loss,
    kto_loss,
    noisy_input,
    pair_errors,
    regularised,
    rwr_loss,
    sft_loss,
)
from models.policy import ADAPTER, DEFAULT_LORA_TARGETS, Policy
from models.policy_training import drop_captions, lr_factor, sample_timesteps
from models.text_encoder import TextEmbeddings

Method = Literal["flow_dpo", "diffusion_dpo", "ipo", "kto", "rwr", "sft"]
PAIRWISE = ("flow_dpo", "diffusion_dpo", "ipo")
METRICS_FILE = "metrics.json"
FINAL_WINDOW = 10  # the final metrics average this many last steps: one batch of 16 pairs is noisy
# What each method reads from `PreferenceData`; `rejected` is allowed (and unused) for sft, so the
# same pairs can train the SFT-on-winners baseline.
REQUIRED = {
    "flow_dpo": ("chosen", "rejected"),
    "diffusion_dpo": ("chosen", "rejected"),
    "ipo": ("chosen", "rejected"),
    "sft": ("chosen",),
    "kto": ("videos", "desirable"),
    "rwr": ("videos", "rewards"),
}
ALLOWED_EXTRA = {"sft": ("rejected",)}


# ---------------------------------------------------------------------------------------------
# 1. Config


class PreferenceTrainConfig(BaseModel):
    """How one round of preference fine-tuning trains the policy's LoRA; β's are for mean-reduced errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(
        "flow_dpo",
        description="loss: flow_dpo (VideoAlign, the default for velocity models), diffusion_dpo, ipo, kto, rwr, sft",
    )
    beta: float = Field(
        2000.0,
        gt=0,
        description="β of flow_dpo/diffusion_dpo/ipo for per-video MEAN errors; on the world 2000 doubled plausibility "
        "and kept most caption agreement, where 500 lost it and 10000 barely moved (ENVIRONMENT.md)",
    )
    beta_schedule: Literal["constant", "one_minus_t_sq"] = Field(
        "constant",
        description="flow_dpo's β_t: constant (VideoAlign), or β(1-t)² which reward-hacks there (ablation only)",
    )
    kto_beta: float = Field(
        1000.0,
        gt=0,
        description="KTO's β for mean errors; KTO multiplies by β where DPO by β/2, so 1000 matches β=2000",
    )
    kto_lambda_d: float = Field(
        1.0, ge=0, description="KTO weight of desirable videos; the paper's 1.0 for balanced labels"
    )
    kto_lambda_u: float = Field(
        1.0, ge=0, description="KTO weight of undesirable videos; the paper's 1.0 for balanced labels"
    )
    rwr_tau: float = Field(
        1.0, gt=0, description="RWR temperature of softmax(r/τ); 1 suits rewards z-normalised per dimension"
    )
    lora_rank: int = Field(
        16, ge=1, description="LoRA rank; the world prototype's r16 (VideoAlign's r64 is for 1B+ models)"
    )
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scale α (update ×α/r); α = 2r as VideoAlign's r64/α128")
    lora_targets: tuple[str, ...] = Field(
        DEFAULT_LORA_TARGETS, min_length=1, description="modules that get a LoRA: the attention q/k/v/o, as VideoAlign"
    )
    lr: float = Field(
        1e-4,
        gt=0,
        description="AdamW rate of the LoRA; at 1e-4 a tiny Wan learns a two-pattern preference within 100 steps (tested)",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW decay; 0: decay would pull the LoRA toward the reference, a second anchor beside β",
    )
    warmup_steps: int = Field(
        10, ge=0, description="linear warmup; Adam's first steps are full-size sign steps on a noisy batch"
    )
    min_lr_ratio: float = Field(
        1.0, ge=0, le=1, description="cosine decay to this share of lr; 1: constant after warmup"
    )
    steps: int = Field(
        150, ge=1,
        description="optimiser steps; 150 since finetune's real-clip phase (session 11), which took the time of the "
        "prototype's 300 (150 vs 300 alone: 41.8% vs 46.9%, inside the noise; README, A round)",
    )
    batch_size: int = Field(16, ge=1, description="pairs (or single videos for kto/rwr) per step; the prototype's 16")
    timesteps: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="t ~ U(0,1) (rectified flow) or sigmoid(N(0,1)) (SD3's logit-normal)"
    )
    grad_clip: float = Field(1.0, gt=0, description="global grad-norm clip of the LoRA; the usual 1.0")
    lambda1: float = Field(
        0.0,
        ge=0,
        description="weight of the flow-matching loss on winners (IPO/PhysHPO regulariser); 0: off, as it did not help on the world",
    )
    lambda2: float = Field(
        0.0,
        ge=0,
        description="weight of the flow-matching loss on real videos (IPO's regulariser); > 0 needs real_latents",
    )
    caption_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of rows trained with the empty prompt (CFG's unconditional branch), as the base "
        "was trained (0.1); the LoRA is shared by both branches of classifier-free guidance, and training only "
        "the conditional one leaves the unconditional to drift (README: SFT's collapse under CFG 5)",
    )
    exclude_first_frame: bool = Field(
        False,
        description="drop frame 0 from every error (HuViDPO's first-frame conditioning); the world is unconditioned",
    )
    hold_first_frame: bool = Field(
        False,
        description="give the network frame 0 clean at t = 0, as a policy with `first_frame_mode=clean` samples from "
        "a given frame (finetune sets it for such a policy's first-frame generations); needs exclude_first_frame",
    )
    reference: Literal["disabled_adapter", "frozen_copy"] = Field(
        "disabled_adapter",
        description="disabled_adapter: the base network with the LoRA off (no second copy); frozen_copy: a copy of "
        "the policy as training starts (a loaded LoRA included)",
    )
    seed: int = Field(0, description="seeds the LoRA's initial A, the batch order, t and ε")

    @model_validator(mode="after")
    def _check(self) -> PreferenceTrainConfig:
        if self.hold_first_frame and not self.exclude_first_frame:
            raise ValueError(
                "preference_training: hold_first_frame=true gives frame 0 as input, so its error says nothing; set "
                "exclude_first_frame=true too"
            )
        if self.beta_schedule != "constant" and self.method != "flow_dpo":
            raise ValueError(
                f"preference_training: beta_schedule={self.beta_schedule!r} applies to flow_dpo only, not "
                f"{self.method!r} (diffusion_dpo's ε-errors already carry (1-t)²); set beta_schedule=constant"
            )
        if self.lambda1 > 0 and self.method in ("sft", "rwr"):
            why = "sft already is the winners' flow-matching loss" if self.method == "sft" else "rwr has no winners"
            raise ValueError(
                f"preference_training: lambda1={self.lambda1} with method={self.method}: {why}; set lambda1=0"
            )
        return self


# ---------------------------------------------------------------------------------------------
# 2. Data


@dataclass(frozen=True)
class PreferenceData:
    """The latents a round trains on, one prompt per row; which fields a method needs is in `REQUIRED`.

    - pairs (`flow_dpo`, `diffusion_dpo`, `ipo`): `chosen` and `rejected` latents (N, C, F, H, W),
      row i of each a pair for `prompts[i]`.
    - `sft`: `chosen` (N, C, F, H, W); `rejected` may be given and is not used.
    - `kto`: single `videos` (N, C, F, H, W) with `desirable` (N,) bool; `pointwise_from_pairs`
      turns pairs into KTO's labels (IPO's loop: best desirable, worst undesirable).
    - `rwr`: single `videos` with `rewards` (N,) float (higher is better).

    Latents are what `Policy.encode` returns. `check` names what is missing or malformed.
    """

    prompts: Sequence[str]
    chosen: torch.Tensor | None = None
    rejected: torch.Tensor | None = None
    videos: torch.Tensor | None = None
    desirable: torch.Tensor | None = None
    rewards: torch.Tensor | None = None

    @classmethod
    def pointwise_from_pairs(
        cls, chosen: torch.Tensor, rejected: torch.Tensor, prompts: Sequence[str]
    ) -> PreferenceData:
        """KTO data from pairs: every winner desirable, every loser undesirable, each with its pair's prompt."""
        if chosen.shape[0] != rejected.shape[0] or len(prompts) != chosen.shape[0]:
            raise ValueError(
                f"PreferenceData.pointwise_from_pairs: {chosen.shape[0]} chosen, {rejected.shape[0]} rejected and "
                f"{len(prompts)} prompts; give one of each per pair"
            )
        n = chosen.shape[0]
        desirable = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        return cls(prompts=list(prompts) * 2, videos=torch.cat([chosen, rejected]), desirable=desirable)

    def check(self, method: str, latent_shape: Sequence[int]) -> int:
        """Number of rows N after checking every field `method` needs; raises saying what to fix."""
        where = f"preference data for method={method}"
        # 1. the fields this method reads, and no field it would silently ignore
        given = [f.name for f in fields(self) if f.name != "prompts" and getattr(self, f.name) is not None]
        missing = [name for name in REQUIRED[method] if name not in given]
        if missing:
            needs = " and ".join(f"`{n}`" for n in REQUIRED[method])
            raise ValueError(f"{where}: `{'`, `'.join(missing)}` is missing; {method} needs {needs} ({_HOW[method]})")
        unused = [n for n in given if n not in REQUIRED[method] + ALLOWED_EXTRA.get(method, ())]
        if unused:
            raise ValueError(
                f"{where}: `{'`, `'.join(unused)}` is given but {method} does not use it; drop it or choose the method "
                f"that does ({_HOW[method]})"
            )
        # 2. prompts
        if isinstance(self.prompts, str) or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"{where}: `prompts` must be a list of non-empty strings, one per row")
        n = len(self.prompts)
        if n == 0:
            raise ValueError(f"{where}: no rows; give at least one pair or video")
        # 3. latents: one per prompt, the policy's shape, finite
        expected = (n, *latent_shape)
        for name in ("chosen", "rejected", "videos"):
            x = getattr(self, name)
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape) != expected:
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"{where}: `{name}` is {got}, expected floating latents {expected} "
                    f"(one per prompt, the policy's (C, F, H, W) = {tuple(latent_shape)}); encode clips with `Policy.encode`"
                )
            _check_finite(f"{where}: `{name}`", x)
        # 4. labels
        if self.desirable is not None:
            d = self.desirable
            if not isinstance(d, torch.Tensor) or d.dtype != torch.bool or tuple(d.shape) != (n,):
                got = f"{d.dtype} {tuple(d.shape)}" if isinstance(d, torch.Tensor) else type(d).__name__
                raise ValueError(
                    f"{where}: `desirable` is {got}, expected a bool tensor ({n},); convert with `labels == 1`"
                )
        if self.rewards is not None:
            r = self.rewards
            if not isinstance(r, torch.Tensor) or not r.is_floating_point() or tuple(r.shape) != (n,):
                got = f"{r.dtype} {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"{where}: `rewards` is {got}, expected a float tensor ({n},), one reward per video")
            _check_finite(f"{where}: `rewards`", r)
        return n


_HOW = {
    "flow_dpo": "PreferenceData(prompts, chosen=..., rejected=...)",
    "diffusion_dpo": "PreferenceData(prompts, chosen=..., rejected=...)",
    "ipo": "PreferenceData(prompts, chosen=..., rejected=...)",
    "sft": "PreferenceData(prompts, chosen=...)",
    "kto": "PreferenceData(prompts, videos=..., desirable=...) or PreferenceData.pointwise_from_pairs",
    "rwr": "PreferenceData(prompts, videos=..., rewards=...)",
}


def _check_finite(where: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{where}: rows {rows[:10]} hold NaN or inf; drop them or re-encode their videos")


# ---------------------------------------------------------------------------------------------
# 3. Errors and per-method losses (pure functions of a batch)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, TextEmbeddings], torch.Tensor]


def velocity_fn(policy: Policy) -> VelocityFn:
    """`(x_t, t, text) -> v_θ`, the callable `pair_errors` takes, for a policy (or its frozen copy)."""
    return lambda x_t, t, text: policy.velocity(x_t, t, text.embeddings, text.mask)


def sample_errors(
    fn: VelocityFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: Any, cfg: PreferenceTrainConfig
) -> torch.Tensor:
    """Per-video rectified-flow errors (B,) with given t and ε: `pair_errors` for single videos.

    `x_t = (1-t)·x0 + t·ε`, `e = mean over C·F·H·W (frame 0 excluded on request) of (v(x_t,t,y) - (ε - x0))²`;
    frame 0 held as `cfg.hold_first_frame` says (`noisy_input`).
    """
    x_t, t_in = noisy_input(x0, t, noise, cfg.hold_first_frame)
    sq_err = (fn(x_t, t_in, cond).float() - (noise - x0).float()).pow(2)
    return frame_mask_errors(sq_err, cfg.exclude_first_frame)


@dataclass(frozen=True)
class Batch:
    """One step's rows on the policy's device: `x` chosen or single videos, `x_l` rejected (pairs only)."""

    x: torch.Tensor
    text: TextEmbeddings
    t: torch.Tensor
    noise: torch.Tensor
    x_l: torch.Tensor | None = None
    desirable: torch.Tensor | None = None
    rewards: torch.Tensor | None = None


def _mean(x: torch.Tensor) -> float | None:
    return float(x.detach().float().mean()) if x.numel() else None


def pairwise_loss(
    policy_fn: VelocityFn,
    reference: Callable[[], AbstractContextManager],
    ref_fn: VelocityFn,
    b: Batch,
    cfg: PreferenceTrainConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss, winners' velocity errors for λ1, log record) of flow_dpo, diffusion_dpo or ipo.

    diffusion_dpo on a velocity model: ε̂ = x_t + (1-t)·v̂, so the ε-error is `(1-t)²·e_v`; its
    logged errors are those ε-errors. The same t and ε serve the policy and the reference.
    """
    # 1. the four errors, the pair sharing t and ε, the reference without gradient
    e_w, e_l = pair_errors(policy_fn, b.x, b.x_l, b.t, b.noise, b.text, cfg.exclude_first_frame, cfg.hold_first_frame)
    with torch.no_grad(), reference():
        e_w_ref, e_l_ref = pair_errors(ref_fn, b.x, b.x_l, b.t, b.noise, b.text, cfg.exclude_first_frame, cfg.hold_first_frame)
    # 2. the method's loss
    if cfg.method == "flow_dpo":
        out = flow_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, cfg.beta, t=b.t, beta_schedule=cfg.beta_schedule)
    elif cfg.method == "diffusion_dpo":
        scale = (1 - b.t.float()) ** 2
        out = diffusion_dpo_loss(scale * e_w, scale * e_l, scale * e_w_ref, scale * e_l_ref, cfg.beta)
    else:
        out = ipo_loss(e_w, e_l, e_w_ref, e_l_ref, cfg.beta)
    record = {
        "implicit_accuracy": float(out.implicit_accuracy),
        "e_w": float(out.e_w),
        "e_l": float(out.e_l),
        "e_w_ref": float(out.e_w_ref),
        "e_l_ref": float(out.e_l_ref),
        "inside": float(out.inside.mean()),
    }
    return out.loss, e_w, record


def kto_step_loss(
    policy_fn: VelocityFn,
    reference: Callable[[], AbstractContextManager],
    ref_fn: VelocityFn,
    b: Batch,
    cfg: PreferenceTrainConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(loss, desirable videos' errors for λ1, log record) of KTO.

    Logged as the pairwise methods are: e_w/e_l are the mean errors of the desirable/undesirable
    videos (None when the batch has none), `inside` the mean of `s_y·β·(g - z)` and the implicit
    accuracy the share of videos where it is > 0 (an exact zero counts ½).
    """
    e = sample_errors(policy_fn, b.x, b.t, b.noise, b.text, cfg)
    with torch.no_grad(), reference():
        e_ref = sample_errors(ref_fn, b.x, b.t, b.noise, b.text, cfg)
    out = kto_loss(e, e_ref, b.desirable, cfg.kto_beta, cfg.kto_lambda_d, cfg.kto_lambda_u)
    sign = torch.where(b.desirable, 1.0, -1.0)
    inside = sign * cfg.kto_beta * (out.reward - out.reference_point)
    d, u = b.desirable, ~b.desirable
    record = {
        "implicit_accuracy": float(implicit_accuracy(inside)),
        "e_w": _mean(e[d]),
        "e_l": _mean(e[u]),
        "e_w_ref": _mean(e_ref[d]),
        "e_l_ref": _mean(e_ref[u]),
        "inside": float(inside.mean()),
        "reference_point": float(out.reference_point),
    }
    return out.loss, e[d], record


def pointwise_loss(policy_fn: VelocityFn, b: Batch, cfg: PreferenceTrainConfig) -> tuple[torch.Tensor, None, dict]:
    """(loss, None, log record) of the reference-free baselines sft (on `x`, the winners) and rwr."""
    e = sample_errors(policy_fn, b.x, b.t, b.noise, b.text, cfg)
    loss = sft_loss(e) if cfg.method == "sft" else rwr_loss(e, b.rewards, cfg.rwr_tau)
    return loss, None, {"e_w": _mean(e)}


# ---------------------------------------------------------------------------------------------
# 4. Training


LOG_KEYS = (
    "step",
    "loss",
    "preference_loss",
    "implicit_accuracy",
    "e_w",
    "e_l",
    "e_w_ref",
    "e_l_ref",
    "inside",
    "grad_norm",
    "lr",
)


def _check_real(real_latents, real_prompts, cfg: PreferenceTrainConfig, latent_shape) -> int:
    """Number of real videos for the λ2 regulariser (0 when it is off), after checking them."""
    if cfg.lambda2 == 0:
        if real_latents is not None or real_prompts is not None:
            raise ValueError(
                "train_preference: real_latents/real_prompts are given but lambda2=0 would not use them; "
                "set lambda2 > 0 or do not pass them"
            )
        return 0
    if real_latents is None or real_prompts is None:
        raise ValueError(
            f"train_preference: lambda2={cfg.lambda2} needs real_latents and real_prompts; pass both or set lambda2=0"
        )
    m = len(real_prompts)
    if isinstance(real_prompts, str) or not all(isinstance(p, str) and p.strip() for p in real_prompts):
        raise ValueError("train_preference: real_prompts must be a list of non-empty strings, one per real video")
    if not real_latents.is_floating_point() or tuple(real_latents.shape) != (m, *latent_shape):
        raise ValueError(
            f"train_preference: real_latents is {real_latents.dtype} {tuple(real_latents.shape)}, expected floating "
            f"{(m, *latent_shape)} (one per real prompt); encode the real clips with `Policy.encode`"
        )
    _check_finite("train_preference: real_latents", real_latents)
    if m < cfg.batch_size:
        raise ValueError(
            f"train_preference: {m} real videos, fewer than batch_size={cfg.batch_size}; give more or lower batch_size"
        )
    return m


class _Rows:
    """Batches of row indices: a fresh permutation each epoch, drawn from the training generator."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen = n, batch, gen
        self.order, self.cursor = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.gen), 0
        rows = self.order[self.cursor : self.cursor + self.batch]
        self.cursor += self.batch
        return rows


def _prompt_bank(policy: Policy, prompts: Sequence[str]) -> tuple[TextEmbeddings, torch.Tensor, int]:
    """Each unique prompt and the empty prompt encoded once (the text encoder is frozen), each row's
    index into them, and the empty prompt's index (for caption dropout)."""
    unique = sorted(set(prompts) | {""})
    index = {p: i for i, p in enumerate(unique)}
    return policy.encode_text(unique), torch.tensor([index[p] for p in prompts]), index[""]


def _reference(policy: Policy, cfg: PreferenceTrainConfig) -> tuple[Callable[[], AbstractContextManager], VelocityFn]:
    """(context to enter around reference calls, reference velocity) for `cfg.reference`."""
    if cfg.reference == "disabled_adapter":
        return policy.disable_adapter, velocity_fn(policy)
    frozen = copy.copy(policy)  # shares config, text encoder and shapes; only the transformer is copied
    frozen.transformer = copy.deepcopy(policy.transformer).eval().requires_grad_(False)
    return nullcontext, velocity_fn(frozen)


def _lora_info(policy: Policy, added: bool) -> dict:
    pc = policy.transformer.peft_config[ADAPTER]
    return {"added": added, "rank": pc.r, "alpha": pc.lora_alpha, "targets": sorted(pc.target_modules)}


def _final(history: list[dict]) -> dict:
    """Mean of each logged value over the last `FINAL_WINDOW` applied steps (None where never logged)."""
    last = history[-FINAL_WINDOW:]
    final: dict[str, float | int | None] = {"step": last[-1]["step"] if last else None}
    for key in LOG_KEYS[1:]:
        values = [r[key] for r in last if r.get(key) is not None]
        final[key] = sum(values) / len(values) if values else None
    return final


def train_preference(
    policy: Policy,
    data: PreferenceData,
    cfg: PreferenceTrainConfig,
    on_step: Callable[[dict], None] | None = None,
    real_latents: torch.Tensor | None = None,
    real_prompts: Sequence[str] | None = None,
) -> dict:
    """Train the policy's LoRA (added when it has none) on `data` with `cfg.method`; only LoRA weights move.

    Per step: a batch of rows; one t and one ε per row (shared by a pair's winner and loser and
    by policy and reference); the method's loss (module docstring) plus `λ1·mean(e_w)` (winners'
    flow-matching errors, the policy's own e_w) and `λ2·mean(e_real)` (a batch of real videos);
    grad-norm clipping; AdamW. `on_step(record)` gets each applied step's record: step, loss,
    preference_loss (before the regularisers), implicit_accuracy, e_w, e_l, e_w_ref, e_l_ref,
    inside (mean implicit reward margin), grad_norm (before clipping), lr; a value a method does
    not have is None (sft/rwr have no reference).

    A non-finite loss or grad norm is not applied (no optimiser step): training stops there, the
    LoRA keeps the last good weights, and `info["stopped_on_nonfinite"]` says `step N: reason`.
    The same seed gives the same LoRA. Returns info: history, final (the mean of the last
    `FINAL_WINDOW` records), steps_done, seconds, seconds_per_step, lora, config.
    """
    # 1. check inputs
    n = data.check(cfg.method, policy.latent_shape)
    m = _check_real(real_latents, real_prompts, cfg, policy.latent_shape)
    if cfg.batch_size > n:
        raise ValueError(
            f"train_preference: {n} rows ({'pairs' if cfg.method in PAIRWISE else 'videos'}) are fewer than "
            f"batch_size={cfg.batch_size}; give more data or lower batch_size"
        )
    # 2. the adapter, its optimiser and the reference
    added = not policy.has_lora
    if added:
        policy.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
    params = policy.lora_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    world, rank = _world()
    if cfg.batch_size % world:
        raise ValueError(
            f"train_preference: batch_size={cfg.batch_size} does not split over {world} workers; "
            "make it a multiple of the number of workers"
        )
    policy_fn = velocity_fn(policy if world == 1 else _data_parallel(policy))
    uses_reference = cfg.method not in ("sft", "rwr")
    reference, ref_fn = _reference(policy, cfg) if uses_reference else (nullcontext, policy_fn)
    # 3. everything that stays fixed, on the device once
    device, dtype = policy.device, policy.dtype
    x = (data.videos if data.videos is not None else data.chosen).to(device, dtype)
    x_l = data.rejected.to(device, dtype) if cfg.method in PAIRWISE else None
    bank, prompt_ids, empty_id = _prompt_bank(policy, data.prompts)
    if m:
        real_x = real_latents.to(device, dtype)
        real_bank, real_ids, real_empty_id = _prompt_bank(policy, real_prompts)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows_of, real_rows_of = _Rows(n, cfg.batch_size, gen), (_Rows(m, cfg.batch_size, gen) if m else None)
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this worker's rows
    rows_seen: list[list[int]] = []

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = sample_timesteps(count, cfg.timesteps, gen).to(device)
        noise = torch.randn((count, *policy.latent_shape), generator=gen).to(device, dtype)
        return t, noise

    # 4. train
    policy.transformer.train()
    history: list[dict] = []
    stopped: str | None = None
    start = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        # 4a. the batch, with one t and ε per row
        rows = rows_of.next()
        t, noise = draw(len(rows))
        text_ids = drop_captions(prompt_ids[rows], cfg.caption_dropout, empty_id, gen)
        if world > 1:
            rows, t, noise, text_ids = rows[mine], t[mine], noise[mine], text_ids[mine]
            rows_seen.append(rows.tolist())
        b = Batch(
            x=x[rows],
            x_l=None if x_l is None else x_l[rows],
            text=bank.index(text_ids).to(device),
            t=t,
            noise=noise,
            desirable=None if data.desirable is None else data.desirable[rows].to(device),
            rewards=None if data.rewards is None else data.rewards[rows].to(device),
        )
        # 4b. the method's loss and the regularisers
        if cfg.method in PAIRWISE:
            pref, e_winners, record = pairwise_loss(policy_fn, reference, ref_fn, b, cfg)
        elif cfg.method == "kto":
            pref, e_winners, record = kto_step_loss(policy_fn, reference, ref_fn, b, cfg)
        else:
            pref, e_winners, record = pointwise_loss(policy_fn, b, cfg)
        # a KTO batch without a desirable video has no winners: λ1's term is absent for that step
        has_winners = e_winners is not None and e_winners.numel() > 0
        e_real = None
        if m:
            real_rows = real_rows_of.next()
            t_real, noise_real = draw(len(real_rows))
            real_text_ids = drop_captions(real_ids[real_rows], cfg.caption_dropout, real_empty_id, gen)
            if world > 1:
                real_rows, t_real, noise_real, real_text_ids = (
                    real_rows[mine], t_real[mine], noise_real[mine], real_text_ids[mine]
                )
            real_text = real_bank.index(real_text_ids).to(device)
            e_real = sample_errors(policy_fn, real_x[real_rows], t_real, noise_real, real_text, cfg)
        loss = regularised(
            pref, e_winners if has_winners else None, cfg.lambda1 if has_winners else 0.0, e_real, cfg.lambda2
        )
        record = {"step": step, "loss": float(loss.detach()), "preference_loss": float(pref.detach()), **record}
        for key in LOG_KEYS:
            record.setdefault(key, None)
        if e_real is not None:
            record["e_real"] = _mean(e_real)
        if world > 1:
            record = _mean_over_workers(record, device)
        # 4c. backward, clip, and apply only a finite step
        if not math.isfinite(record["loss"]):
            stopped = f"step {step}: loss is {record['loss']}"
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            record.update(grad_norm=grad_norm, lr=lr)
            if not math.isfinite(grad_norm):
                stopped = f"step {step}: grad norm is {grad_norm} (loss {record['loss']:.6g})"
            else:
                opt.step()
        if stopped is not None:
            opt.zero_grad(set_to_none=True)
            kept = f"the weights after step {step - 1}" if step else "its initial weights"
            stopped += f"; the step was not applied, the LoRA keeps {kept}"
            break
        history.append(record)
        if on_step is not None:
            on_step(record)
    seconds = time.perf_counter() - start
    policy.transformer.eval()
    opt.zero_grad(set_to_none=True)
    # 5. what happened
    steps_done = len(history)
    distributed = {}
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows_seen)
        distributed = {"distributed": {"world_size": world, "rank": rank, "rows_by_rank": gathered}}
    return {
        "method": cfg.method,
        "steps_planned": cfg.steps,
        "steps_done": steps_done,
        "stopped_on_nonfinite": stopped,
        "seconds": seconds,
        "seconds_per_step": seconds / max(steps_done, 1),
        "rows": n,
        "real_videos": m,
        "trainable_params": sum(p.numel() for p in params),
        "reference": cfg.reference if uses_reference else None,
        "lora": _lora_info(policy, added),
        "final": _final(history),
        "history": history,
        "config": cfg.model_dump(mode="json"),
        **distributed,
    }


def _world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _data_parallel(policy: Policy) -> Policy:
    """The policy seen through DDP: a shallow copy whose transformer is the DDP wrapper of the same
    module, so the LoRA's gradients are all-reduced while `disable_adapter`, `save_lora` and the
    reference keep using the plain module (the reference runs without grad and needs no sync)."""
    from torch.nn.parallel import DistributedDataParallel

    view = copy.copy(policy)
    ids = [policy.device.index] if policy.device.type == "cuda" else None
    view.transformer = DistributedDataParallel(policy.transformer, device_ids=ids)
    return view


def _mean_over_workers(record: dict, device: torch.device) -> dict:
    """Each float of a step's record averaged over the workers that have it (None where none has)."""
    keys = [k for k, v in record.items() if k != "step" and (v is None or isinstance(v, float))]
    values = [(record[k], 1.0) if record[k] is not None else (0.0, 0.0) for k in keys]
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    mean = {k: (float(s / c) if c > 0 else None) for k, (s, c) in zip(keys, sums.tolist(), strict=True)}
    return {**record, **mean}


# ---------------------------------------------------------------------------------------------
# 5. Checkpoint


def save_preference_checkpoint(policy: Policy, out_dir: str | Path, info: dict) -> Path:
    """Write the LoRA (`Policy.save_lora`: diffusers' pipeline-layout safetensors) and `metrics.json`.

    `metrics.json` holds the final metrics, the config, how training ended and the per-step
    history (and, for data-parallel training, the world size, the writer's rank and each rank's
    rows per step), so a round can be compared without loading the weights. Returns `out_dir`.
    """
    out = Path(out_dir)
    policy.save_lora(out)
    keys = (
        "method",
        "steps_planned",
        "steps_done",
        "stopped_on_nonfinite",
        "seconds",
        "seconds_per_step",
        "rows",
        "real_videos",
        "trainable_params",
        "reference",
        "lora",
        "final",
        "config",
        "history",
    )
    missing = [k for k in keys if k not in info]
    if missing:
        raise ValueError(f"save_preference_checkpoint: info lacks {missing}; pass the dict `train_preference` returned")
    atomic_write_json(out / METRICS_FILE, {k: info[k] for k in (*keys, "distributed") if k in info})
    return out
