"""`train_reward`: a VideoReward-style reward model from the round's labelled pairs.

Follows VideoAlign (arXiv 2501.13918): one reward per dimension (VQ, MQ, TA) read from reward
tokens by a shared head, trained with Bradley-Terry-with-ties (θ = 5); `invalid` labels are
masked per dimension; held-out pairs give the z-normalisation stored with the checkpoint and the
accuracies (w/o ties, w/ ties with the calibrated ε, beside a random baseline) shown in the UI.
In the embedded world the CLIP backbone starts from the world CLIP that `bootstrap` trained, as
VideoReward starts from a pretrained VLM. Training runs in this process on the threads the stage
is given; `models/reward_model.py` holds the model and its training loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import Field

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, read_manifest, write_manifest
from models.reward_model import RewardModelConfig, reward_difference_histogram_png, train_reward_model
from tasks.common import StageConfig, StageResult
from tasks.video_io import read_video

LABEL_COLUMNS = ("label_vq", "label_mq", "label_ta")


class TrainRewardConfig(StageConfig):
    model: RewardModelConfig = Field(default_factory=RewardModelConfig, description="architecture and training of the reward model")
    heldout_fraction: float = Field(
        0.2, gt=0, lt=1, description="pairs kept out of training for the z-normalisation and the accuracies"
    )
    init_clip: str | None = Field(
        "world", description="`world`: start from bootstrap's CLIP; a folder of an open_clip model; None: from scratch"
    )
    fps: float = Field(8.0, gt=0, description="frame rate of the labelled videos (the world's 8 fps); resampled to model.fps")


def pair_arrays(rows: list[dict], layout: RunLayout, where: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, list[str]]:
    """Frames of every decodable pair, their prompts and label strings; pairs whose video cannot be
    read are left out and named."""
    a, b, prompts, labels, skipped = [], [], [], [], []
    for i, r in enumerate(rows):
        if r["video_b"] is None:
            skipped.append(f"row {i}: pointwise row (no video_b)")
            continue
        try:
            fa, fb = read_video(layout.resolve(r["video_a"])), read_video(layout.resolve(r["video_b"]))
        except (OSError, ValueError) as err:
            skipped.append(f"row {i}: {err}")
            continue
        if fa.shape != fb.shape:
            skipped.append(f"row {i}: videos differ in shape {fa.shape} vs {fb.shape}")
            continue
        a.append(fa)
        b.append(fb)
        prompts.append(r["prompt"])
        labels.append([r[c] or "invalid" for c in LABEL_COLUMNS])
    if not a:
        raise ValueError(f"`{where}`: no pair with two readable videos; rerun `label` (skipped: {skipped[:3]})")
    shapes = {x.shape for x in a}
    if len(shapes) != 1:
        raise ValueError(f"`{where}`: pairs have videos of different shapes {sorted(shapes)}; label one video size per round")
    return np.stack(a), np.stack(b), prompts, np.asarray(labels), skipped


def clip_folder(inputs: Mapping[str, ManifestRef], cfg: TrainRewardConfig, layout: RunLayout) -> str | None:
    if cfg.init_clip != "world":
        return cfg.init_clip
    if "checkpoints" not in inputs:
        raise ValueError("train_reward.init_clip is `world` but no bootstrap `checkpoints` input was given; set init_clip to a folder or null")
    rows = [r for r in read_manifest(inputs["checkpoints"].path, "checkpoints", layout).rows() if r["kind"] == "clip"]
    if len(rows) != 1:
        raise ValueError(f"`{inputs['checkpoints'].path}`: expected one `clip` row, found {len(rows)}; rerun bootstrap")
    return str(layout.resolve(rows[0]["path"]))


def run(
    inputs: Mapping[str, ManifestRef], cfg: TrainRewardConfig, layout: RunLayout, out: StageDir, lineage: Lineage, *, round: int = 1
) -> StageResult:
    """`labels` (+ bootstrap's CLIP) → a reward model checkpoint, its accuracy table and histogram."""
    # 1. the pairs
    rows = read_manifest(inputs["labels"].path, "labels", layout).rows()
    videos_a, videos_b, prompts, labels, skipped = pair_arrays(rows, layout, inputs["labels"].path)
    # 2. train, then save in the from_pretrained layout
    model, info = train_reward_model(
        videos_a, videos_b, prompts, labels, cfg.model, heldout_fraction=cfg.heldout_fraction,
        init_clip=clip_folder(inputs, cfg, layout), fps=cfg.fps,
    )
    model_dir = out.files("reward_model")
    model.save_pretrained(model_dir)
    figures = out.files("figures")
    histogram = reward_difference_histogram_png(info, figures / "reward_differences.png")
    # 3. the checkpoint row and the numbers for the UI
    report = info["report"]
    metrics: dict[str, float] = {"train_seconds": float(info["seconds"]), "compute_s": float(info["seconds"])}
    for line in report:
        dim = str(line["dimension"]).lower()
        for key in ("acc_wo_ties", "acc_w_ties", "epsilon", "random_wo_ties", "random_w_ties"):
            value = line.get(key)
            if value is not None and np.isfinite(value):
                metrics[f"{dim}_{key}"] = float(value)
    (figures / "report.json").write_text(json.dumps(report, indent=1, default=float))
    ref = write_manifest(
        [{
            "checkpoint_id": f"reward-r{round:02d}", "kind": "reward_model", "format": "safetensors",
            "path": layout.stored_path(model_dir), "base_id": cfg.model.backbone, "round": round,
            "metrics_json": json.dumps(metrics, sort_keys=True),
        }],
        "checkpoints", out.manifest_path, layout, lineage,
    )
    counts = {"pairs": len(rows), "pairs_used": len(prompts), "pairs_skipped": len(skipped),
              "train_pairs": int(info["train_pairs"]), "heldout_pairs": int(info["heldout_pairs"])}
    return StageResult(ref, counts=counts, metrics=metrics, images={"reward differences (held-out pairs)": str(Path(histogram))})

