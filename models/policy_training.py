"""Train a tiny base policy on world clips, judge its samples, and draw them as a frame strip.

The base policy is what a preference round starts from: a pixel-space `WanTransformer3DModel`
trained with the rectified-flow loss (`Policy.flow_matching_loss`) on an unfiltered mix of
plausible and implausible clips, as a web-video model is trained on unfiltered web video.
`train_base_policy` builds the text encoder and a random transformer with `build_tiny`, loads
them back with `Policy.from_pretrained` (the path a real run takes with a hub id), trains, and
saves the transformer with `save_pretrained` so the next stage loads it the same way.

`judge_samples` samples one video per (prompt, seed) and reports the physics judge's
plausibility and caption-agreement rates with Wilson 95% intervals.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_contracts.lineage import atomic_write_bytes
from models.frames import check_clip
from models.physics_judge import PhysicsJudge
from models.physics_world import WorldSpec
from models.policy import Policy, PolicyConfig, build_tiny
from models.text_encoder import build_text_encoder

TEXT_ENCODER_DIR = "text_encoder"
TRANSFORMER_DIR = "transformer"
WILSON_Z = 1.959964  # two-sided 95%


# ---------------------------------------------------------------------------------------------
# 1. Config


class BasePolicyTrainConfig(BaseModel):
    """How the tiny base policy is built and trained; defaults measured on 2 CPU cores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(
        2200, ge=1, description="optimiser steps; 2,200 at batch 16 take ~250 s on 2 idle cores (README, bootstrap)"
    )
    batch_size: int = Field(
        16, ge=1,
        description="clips per step; in one time budget 16 beat the prototype's 32 (twice the steps; 30% vs 20% "
        "plausible samples, README)",
    )
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate; 2e-3 beat 1e-3 at batch 16 (34% vs 30%, README)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay; torch's default 0.01")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps; keeps Adam's first noisy updates small")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at this share of lr; a short run still moves at the end")
    grad_clip: float = Field(1.0, gt=0, description="global grad-norm clip; the usual 1.0 for diffusion transformers")
    timesteps: Literal["uniform", "logit_normal"] = Field(
        "logit_normal",
        description="t ~ sigmoid(N(0,1)) (SD3's logit-normal, Esser et al. 2024; 1,200 steps: 18-27% plausible samples, "
        "uniform: 3%) or t ~ U(0,1)",
    )
    layers: int = Field(4, ge=1, description="transformer blocks; 4 made balls where 2 made fragments (ENVIRONMENT.md)")
    dim: int = Field(128, ge=32, description="transformer width; 128 (~1M params) made recognisable balls")
    head_dim: int = Field(32, ge=8, description="channels per attention head; dim 128 → 4 heads")
    patch_size: tuple[int, int, int] = Field((1, 4, 4), description="(t, h, w) patch; (1,4,4) gives 128 tokens per 8×16×16 clip")
    ema_decay: float | None = Field(
        0.995, gt=0, lt=1, description="sample from an exponential moving average of the weights (None: the last weights); short runs gain most"
    )
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="share of clips trained on the empty prompt, so CFG's unconditional branch is learnt (SD/Wan's 0.1)"
    )
    first_frame_rate: float = Field(
        0.25, ge=0, lt=1,
        description="share of clips trained to continue their own frame 0 (Wan 2.2 TI2V: frame 0 clean, its tokens at "
        "t = 0, out of the loss), so the policy samples from a given first frame (`first_frame_mode=clean`); 0: "
        "text-to-video only. 0.25 also made unconditioned samples more plausible at 1,800 steps (47.3% vs 32.4%, "
        "38.7% vs 33.2% over two seeds; README, first-frame conditioning)",
    )
    seed: int = Field(0, description="seeds the initial weights, the batch order, t and ε")
    init_from: str | None = Field(
        None,
        description="a folder `train_base_policy` wrote (text_encoder/ and transformer/): continue training that policy "
        "instead of building a random one; its text encoder is reused as it is, so every caption must be in its vocabulary",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="stop training after this many seconds (info says so); None: run all steps"
    )
    log_every: int = Field(100, ge=1, description="steps between entries of the loss history in info")

    @model_validator(mode="after")
    def _check(self) -> BasePolicyTrainConfig:
        if self.dim % self.head_dim:
            raise ValueError(f"policy_training: dim={self.dim} is not a multiple of head_dim={self.head_dim}")
        return self


# ---------------------------------------------------------------------------------------------
# 2. Pure helpers


def sample_timesteps(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """t in (0, 1) for the loss: uniform, or logit-normal `t = σ(u), u ~ N(0, 1)` (Esser et al. 2024, SD3)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    raise ValueError(f"policy_training: unknown timestep sampling {kind!r}; use `uniform` or `logit_normal`")


def drop_captions(ids: torch.Tensor, rate: float, empty_id: int, gen: torch.Generator) -> torch.Tensor:
    """Each row's prompt index, replaced by the empty prompt's with probability `rate` (no draw at 0)."""
    if rate == 0:
        return ids
    return torch.where(torch.rand(len(ids), generator=gen) < rate, torch.tensor(empty_id), ids)


def lr_factor(step: int, cfg: BasePolicyTrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (Wilson 1927); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_clips(frames_list: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
    if len(frames_list) != len(captions):
        raise ValueError(f"train_base_policy: {len(frames_list)} clips but {len(captions)} captions; give one caption per clip")
    if not frames_list:
        raise ValueError("train_base_policy: no clips; give at least one (frames, caption) pair")
    for i, c in enumerate(captions):
        if not c or not c.strip():
            raise ValueError(f"train_base_policy: clip {i} has an empty caption; give every clip a caption")
    clips = [check_clip(f, where=f"train_base_policy: clip {i}") for i, f in enumerate(frames_list)]
    shapes = {c.shape for c in clips}
    if len(shapes) != 1:
        raise ValueError(f"train_base_policy: clips differ in shape {sorted(shapes)}; render them all at one size")
    return np.stack(clips)


# ---------------------------------------------------------------------------------------------
# 3. Training


def load_policy(out_dir: str | Path, frames: int = 8, size: int = 16, first_frame_mode: str = "path") -> Policy:
    """The policy `train_base_policy` saved in `out_dir`, on the CPU, through `Policy.from_pretrained`."""
    out = Path(out_dir)
    return Policy.from_pretrained(
        PolicyConfig(
            family="wan",
            transformer=str(out / TRANSFORMER_DIR),
            text_encoder=str(out / TEXT_ENCODER_DIR),
            device="cpu",
            frames=frames,
            height=size,
            width=size,
            first_frame_mode=first_frame_mode,
        )
    )


def _copy_policy(src: Path, out: Path) -> None:
    """Copy a saved policy's text encoder and transformer into `out` (the start of a continued training)."""
    for sub in (TEXT_ENCODER_DIR, TRANSFORMER_DIR):
        if not (src / sub / "config.json").is_file():
            raise FileNotFoundError(
                f"policy_training: init_from={src} has no {sub}/ written by train_base_policy; "
                "point it at a bootstrap `policy` folder or a variant's output folder"
            )
    for sub in (TEXT_ENCODER_DIR, TRANSFORMER_DIR):
        if (out / sub).resolve() != (src / sub).resolve():
            shutil.copytree(src / sub, out / sub, dirs_exist_ok=True)


def first_frame_mode(cfg: BasePolicyTrainConfig) -> str:
    """How the trained policy holds a given first frame: `clean` once it was trained to continue one."""
    return "clean" if cfg.first_frame_rate > 0 else "path"


def train_base_policy(
    frames_list: Sequence[np.ndarray],
    captions: Sequence[str],
    out_dir: str | Path,
    cfg: BasePolicyTrainConfig,
    on_log: Callable[[int, float], None] | None = None,
) -> tuple[Policy, dict]:
    """Train a tiny pixel-space Wan on (clip, caption) pairs with the rectified-flow loss.

    Writes `out_dir/text_encoder` and `out_dir/transformer` (safetensors, `save_pretrained`).
    `on_log(step, loss)` is called every `log_every` steps (progress reports). Returns the trained policy and info: steps done, seconds, final loss, params, loss history,
    and whether the time budget stopped training early.
    """
    # 1. check inputs and build the checkpoints a real run would download
    video = _check_clips(frames_list, captions)
    n, frames, height, width, _ = video.shape
    if height != width:
        raise ValueError(f"train_base_policy: clips are {width}×{height}; the world's clips are square")
    out = Path(out_dir)
    if cfg.init_from is not None:
        _copy_policy(Path(cfg.init_from), out)
    else:
        text = build_text_encoder(sorted(set(captions)), out / TEXT_ENCODER_DIR, seed=cfg.seed)
        build_tiny(
            "wan", out / TRANSFORMER_DIR, text_dim=text.hidden_size, text_len=text.max_length, frames=frames,
            height=height, width=width, patch_size=cfg.patch_size, layers=cfg.layers, dim=cfg.dim,
            head_dim=cfg.head_dim, seed=cfg.seed,
        )
    policy = load_policy(out, frames, height, first_frame_mode(cfg))
    info = train_flow_matching(policy, video, captions, cfg, on_log)
    policy.transformer.save_pretrained(out / TRANSFORMER_DIR, safe_serialization=True)
    info["out_dir"] = str(out)
    return policy, info


def train_flow_matching(
    policy: Policy,
    video: np.ndarray,
    captions: Sequence[str],
    cfg: BasePolicyTrainConfig,
    on_log: Callable[[int, float], None] | None = None,
) -> dict:
    """Train every weight of `policy.transformer` in place with the rectified-flow loss on (clip, caption).

    `video` is (N, F, H, W, 3) uint8, encoded once with the policy (pixel space in the world, its VAE
    otherwise) on the policy's device. With `cfg.ema_decay` the averaged weights are copied in at the
    end. The transformer is left in eval mode without gradients, as `from_pretrained` gives it.
    Returns steps done, seconds, final loss, params, the loss history and whether the time budget
    stopped training early. `cfg.init_from` and the model-shape fields are not read here.
    """
    n = len(video)
    model = policy.transformer
    model.requires_grad_(True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # 1. encode every clip and caption once: the text encoder is frozen and encoding is exact
    x0 = policy.encode(video)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    bank = policy.encode_text(unique + [""])  # the last entry is the empty prompt of caption dropout
    caption_ids = torch.tensor([index[c] for c in captions])
    empty_id = len(unique)
    # 2. train
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=gen)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay is not None else None
    cursor, history, loss_value, stopped_early = 0, [], float("nan"), False
    start = time.perf_counter()
    step = 0
    for step in range(cfg.steps):
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            stopped_early = True
            break
        if cursor + cfg.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        rows = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        t = sample_timesteps(len(rows), cfg.timesteps, gen)
        ids = drop_captions(caption_ids[rows], cfg.caption_dropout, empty_id, gen)
        # no draw at rate 0, so text-to-video training keeps its random stream
        held = torch.rand(len(rows), generator=gen) < cfg.first_frame_rate if cfg.first_frame_rate > 0 else None
        loss = policy.flow_matching_loss(x0[rows], bank.index(ids), t=t, generator=gen, clean_first_frame=held).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            # warm-up as in Keras/timm: early averages do not drag in the random initial weights
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        loss_value = float(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append((step, loss_value))
            if on_log is not None:
                on_log(step, loss_value)
    else:
        step = cfg.steps
    seconds = time.perf_counter() - start
    # 3. the averaged weights, frozen, as `from_pretrained` gives them
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema, strict=True):
                p.copy_(e)
    model.eval().requires_grad_(False)
    return {
        "steps_done": step,
        "steps_planned": cfg.steps,
        "stopped_early": stopped_early,
        "stop_reason": f"time budget of {cfg.time_budget_s} s exceeded" if stopped_early else "all steps done",
        "seconds": seconds,
        "seconds_per_step": seconds / max(step, 1),
        "final_loss": loss_value,
        "ema_decay": cfg.ema_decay,
        "loss_history": history,
        "params": sum(p.numel() for p in params),
        "clips": n,
        "unique_captions": len(unique),
    }


# ---------------------------------------------------------------------------------------------
# 4. Evaluation


def judge_samples(
    policy: Policy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    spec: WorldSpec,
    batch_size: int = 32,
    first_frames: Sequence[np.ndarray] | None = None,
) -> dict:
    """Sample one video per (prompt, seed) pair, judge each, and report the rates with Wilson 95% intervals.

    `first_frames` (one uint8 (H, W, 3) frame per pair) samples each video from its given frame 0;
    `frame0_exact` then counts the videos whose frame 0 is that frame bit for bit.
    """
    if isinstance(prompts, str) or len(prompts) != len(seeds) or not prompts:
        raise ValueError(
            f"judge_samples: give one seed per prompt, at least one pair; got {len(prompts)} prompts, {len(seeds)} seeds"
        )
    if first_frames is not None and len(first_frames) != len(prompts):
        raise ValueError(f"judge_samples: {len(first_frames)} first frames for {len(prompts)} pairs; give one per pair")
    judge = PhysicsJudge(spec)
    frames, verdicts = [], []
    for i in range(0, len(prompts), batch_size):
        given = None if first_frames is None else np.stack(first_frames[i : i + batch_size])
        videos = policy.sample(list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size]), first_frame=given)
        for video, prompt in zip(videos, prompts[i : i + batch_size], strict=True):
            frames.append(video)
            verdicts.append(judge.judge(video, prompt))
    n = len(verdicts)
    plausible = sum(v.plausible for v in verdicts)
    agree = sum(v.caption_agreement for v in verdicts)
    reasons: dict[str, int] = {}
    for v in verdicts:
        reasons[v.reason] = reasons.get(v.reason, 0) + 1
    exact = None if first_frames is None else sum(bool(np.array_equal(f[0], g)) for f, g in zip(frames, first_frames, strict=True))
    return {
        "n": n,
        "frame0_exact": exact,
        "plausibility": plausible / n,
        "plausibility_ci": wilson_interval(plausible, n),
        "caption_agreement": agree / n,
        "caption_agreement_ci": wilson_interval(agree, n),
        "reasons": reasons,
        "plausible": [bool(v.plausible) for v in verdicts],
        "caption_agrees": [bool(v.caption_agreement) for v in verdicts],
        "frames": frames,
    }


def frame_strip_png(frames_list: Sequence[np.ndarray], path: str | Path, scale: int = 4, gap: int = 2) -> Path:
    """One row per clip, its frames side by side, upscaled `scale`× with nearest pixels (the clips are 16 px)."""
    if not frames_list:
        raise ValueError(f"frame_strip_png: no clips to draw into `{path}`; give at least one")
    clips = [check_clip(f, where=f"frame_strip_png: clip {i}") for i, f in enumerate(frames_list)]
    f, h, w, _ = clips[0].shape
    if any(c.shape != clips[0].shape for c in clips):
        raise ValueError("frame_strip_png: clips differ in shape; draw clips of one size per strip")
    sheet = np.full((len(clips) * (h + gap) - gap, f * (w + gap) - gap, 3), 255, np.uint8)
    for r, clip in enumerate(clips):
        for c, frame in enumerate(clip):
            sheet[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = frame
    sheet = cv2.resize(sheet, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"frame_strip_png: OpenCV could not encode the strip for `{path}`")
    out = Path(path)
    atomic_write_bytes(out, png.tobytes())
    return out
