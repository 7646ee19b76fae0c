"""`bootstrap` (embedded world only): the models a real run would name on a hub, trained here.

A real run names an open_clip architecture with pretrained weights and a hub T2V checkpoint; the
embedded world cannot download either, so this stage trains them from scratch on the ingested,
*unselected* clips — like models pretrained on unfiltered web video — and records them in a
`checkpoints` manifest:

- the tiny open_clip model that `select` scores frame–caption similarity with; `select` loads it
  by path through `open_clip.create_model`, the same call a real run makes with a hub tag;
- the base policy: a pixel-space `WanTransformer3DModel` and its text encoder, trained with the
  rectified-flow loss on a mix of plausible and implausible clips, so that it makes both. Its
  samples for held-out prompts are judged (plausibility with a 95% interval, the room left for
  alignment) and drawn as a frame strip. `generate` loads it through `Policy.from_pretrained`
  from the folder's `policy.json`, as a real run loads a hub checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, read_manifest, write_manifest
from models.clip_model import TinyClipConfig, save_clip, train_clip
from models.physics_world import WorldSpec
from models.policy import PolicyConfig, save_policy_folder
from models.policy_training import (
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    BasePolicyTrainConfig,
    first_frame_mode,
    frame_strip_png,
    judge_samples,
    train_base_policy,
)
from tasks.common import StageConfig, StageResult
from tasks.video_io import read_video


class BootstrapConfig(StageConfig):
    clip: TinyClipConfig = Field(default_factory=TinyClipConfig, description="the tiny CLIP and its training")
    policy: BasePolicyTrainConfig = Field(
        default_factory=lambda: BasePolicyTrainConfig(time_budget_s=250.0),
        description="the tiny base policy and its training; 250 s of training keeps the stage within 6 minutes on 2 cores",
    )
    train_policy: bool = Field(True, description="train the base policy (false: the CLIP only, for select-only runs)")
    judge_samples: int = Field(
        64, ge=0,
        description="base-policy samples judged on held-out prompts: a first look (64: a 95% interval of about ±12 "
        "points, ~5 s; 256: ±6, ~20 s); evaluate judges the base on its 256 pairs in round 1",
    )
    max_clips: int | None = Field(None, ge=2, description="cap on training clips (None: every usable training clip)")
    seed: int = Field(0, description="training is deterministic for a seed")


def training_rows(rows: list[dict], max_clips: int | None, seed: int) -> list[dict]:
    """Usable clips whose captions are not held out: held-out prompts stay unseen by every model."""
    usable = [r for r in rows if r["reason"] is None and r["split"] == "train"]
    if max_clips is not None and len(usable) > max_clips:
        keep = np.random.default_rng(seed).choice(len(usable), size=max_clips, replace=False)
        usable = [usable[i] for i in sorted(keep)]
    return usable


def run(inputs: Mapping[str, ManifestRef], cfg: BootstrapConfig, layout: RunLayout, out: StageDir, lineage: Lineage) -> StageResult:
    videos = read_manifest(inputs["videos"].path, "videos", layout)
    rows = training_rows(videos.rows(), cfg.max_clips, cfg.seed)
    if len(rows) < 2:
        raise ValueError(f"bootstrap: {len(rows)} usable training clips in {videos.ref.path}; ingest more clips")
    # Clips shorter than the storyboard still train: the model pads by repeating the last frame.
    frames = [read_video(layout.resolve(r["video_path"])) for r in rows]
    t0 = time.perf_counter()
    clip = train_clip(frames, [r["caption"] for r in rows], cfg.clip, seed=cfg.seed)
    clip_dir = out.files("clip")
    save_clip(clip, clip_dir)
    info = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in clip.train_info.items() if np.isscalar(v)}
    checkpoints = [
        {
            "checkpoint_id": "clip",
            "kind": "clip",
            "format": "open_clip",
            "path": layout.stored_path(clip_dir),
            "base_id": cfg.clip.model_name,
            "round": None,
            "metrics_json": json.dumps(info, sort_keys=True),
        }
    ]
    metrics = {f"clip_{k}": float(v) for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    counts = {"training_clips": len(rows)}
    images: dict[str, str] = {}
    compute = time.perf_counter() - t0
    if cfg.train_policy:
        t0 = time.perf_counter()
        heldout = sorted({r["caption"] for r in videos.rows() if r["split"] == "heldout" and r["caption"]})
        row, policy_metrics, strip = bootstrap_policy(frames, [r["caption"] for r in rows], heldout, cfg, layout, out)
        checkpoints.append(row)
        metrics.update(policy_metrics)
        counts["policy_training_clips"] = int(policy_metrics.pop("policy_clips"))
        if strip is not None:
            images["base policy samples (held-out prompts; rows: prompt/seed)"] = str(strip)
        compute += time.perf_counter() - t0
    metrics["compute_s"] = compute
    ref = write_manifest(checkpoints, "checkpoints", out.manifest_path, layout, lineage)
    return StageResult(ref, counts=counts, metrics=metrics, images=images)


def full_length(frames: list[np.ndarray], captions: list[str]) -> tuple[list[np.ndarray], list[str], tuple[int, ...]]:
    """The clips of the most common shape (the world's frames × size): the policy trains on one shape;
    clips cut short (the world's `too_short` defect) are left out."""
    shapes = [f.shape for f in frames]
    shape = max(set(shapes), key=shapes.count)
    keep = [i for i, s in enumerate(shapes) if s == shape]
    return [frames[i] for i in keep], [captions[i] for i in keep], shape


def heldout_first_frames(videos: Sequence[Mapping], layout: RunLayout, size: tuple[int, int]) -> dict[str, list[np.ndarray]]:
    """{held-out caption: frame 0 of each of its usable held-out clips whose frames are `size` (H, W), by
    video_id}; a clip that does not decode (ingest keeps a hostile corpus) is skipped."""
    frames: dict[str, list[np.ndarray]] = {}
    for r in sorted(videos, key=lambda r: r["video_id"]):
        if r["split"] != "heldout" or not r["caption"] or r["reason"] is not None:
            continue
        try:
            clip = read_video(layout.resolve(r["video_path"]), max_frames=1)
        except ValueError:
            continue
        if clip.shape[1:3] == tuple(size):
            frames.setdefault(r["caption"], []).append(clip[0])
    return frames


def judge_heldout(
    policy, heldout: list[str], samples: int, spec: WorldSpec, strip_path: Path,
    first_frames: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> tuple[dict, Path]:
    """Judge `samples` videos for the held-out prompts (prompt i mod n, seed i) and draw a frame
    strip: one row per held-out prompt, its first two seeds side by side. Returns
    (`judge_samples`' result, the strip's path). `first_frames` {prompt: frames} samples the j-th
    video of a prompt from its frame j mod len (HuViDPO's first-frame conditioning)."""
    prompts = [heldout[i % len(heldout)] for i in range(samples)]
    given = None
    if first_frames is not None:
        given = [first_frames[p][(i // len(heldout)) % len(first_frames[p])] for i, p in enumerate(prompts)]
    judged = judge_samples(policy, prompts, list(range(samples)), spec, first_frames=given)
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i], i))
    picked = [i for i in order if i < 2 * len(heldout)][:12]
    return judged, frame_strip_png([judged["frames"][i] for i in picked], strip_path)


def bootstrap_policy(
    frames: list[np.ndarray], captions: list[str], heldout: list[str], cfg: BootstrapConfig, layout: RunLayout, out: StageDir
) -> tuple[dict, dict[str, float], Path | None]:
    """Train the base policy, judge its samples for held-out prompts, draw a frame strip."""
    # 1. train on every full-length training clip
    clips, caps, shape = full_length(frames, captions)
    policy_dir = out.files("policy")
    policy, info = train_base_policy(clips, caps, policy_dir, cfg.policy)
    n_frames, size = shape[0], shape[1]
    save_policy_folder(
        policy_dir,
        PolicyConfig(family="wan", transformer=str(policy_dir / TRANSFORMER_DIR), text_encoder=str(policy_dir / TEXT_ENCODER_DIR),
                     device="auto", frames=n_frames, height=size, width=size,
                     first_frame_mode=first_frame_mode(cfg.policy)),
    )
    metrics = {
        "policy_clips": float(len(clips)),
        "policy_params": float(info["params"]),
        "policy_steps": float(info["steps_done"]),
        "policy_train_seconds": round(info["seconds"], 2),
        "policy_final_loss": round(info["final_loss"], 5),
    }
    # 2. judge samples for held-out prompts: the rate alignment starts from
    strip = None
    if cfg.judge_samples and heldout:
        judged, strip = judge_heldout(
            policy, heldout, cfg.judge_samples, WorldSpec(size=size, frames=n_frames),
            out.files("figures") / "base_policy_samples.png",
        )
        low, high = judged["plausibility_ci"]
        metrics.update(
            policy_judged_samples=float(judged["n"]),
            policy_plausibility=round(judged["plausibility"], 4),
            policy_plausibility_ci_low=round(low, 4),
            policy_plausibility_ci_high=round(high, 4),
            policy_caption_agreement=round(judged["caption_agreement"], 4),
        )
    summary = {k: v for k, v in metrics.items() if k != "policy_clips"}
    row = {
        "checkpoint_id": "base",
        "kind": "policy",
        "format": "diffusers",
        "path": layout.stored_path(policy_dir),
        "base_id": "prefloop-world-wan",
        "round": None,
        "metrics_json": json.dumps(summary, sort_keys=True),
    }
    return row, metrics, strip
