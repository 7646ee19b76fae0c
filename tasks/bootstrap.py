"""`bootstrap` (embedded world only): the models a real run would name on a hub, trained here.

A real run names an open_clip architecture with pretrained weights and a hub T2V checkpoint; the
embedded world cannot download either, so this stage trains them from scratch on the ingested,
*unselected* clips — like models pretrained on unfiltered web video — and records them in a
`checkpoints` manifest. Today it trains the tiny open_clip model that `select` scores
frame–caption similarity with; `select` loads it by path through `open_clip.create_model`,
the same call a real run makes with a hub tag.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from pydantic import Field

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, read_manifest, write_manifest
from models.clip_model import TinyClipConfig, save_clip, train_clip
from tasks.common import StageConfig, StageResult
from tasks.video_io import read_video


class BootstrapConfig(StageConfig):
    clip: TinyClipConfig = Field(default_factory=TinyClipConfig, description="the tiny CLIP and its training")
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
    clip = train_clip(frames, [r["caption"] for r in rows], cfg.clip, seed=cfg.seed)
    clip_dir = out.files("clip")
    save_clip(clip, clip_dir)
    info = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in clip.train_info.items() if np.isscalar(v)}
    ref = write_manifest(
        [
            {
                "checkpoint_id": "clip",
                "kind": "clip",
                "format": "open_clip",
                "path": layout.stored_path(clip_dir),
                "base_id": cfg.clip.model_name,
                "round": None,
                "metrics_json": json.dumps(info, sort_keys=True),
            }
        ],
        "checkpoints",
        out.manifest_path,
        layout,
        lineage,
    )
    metrics = {f"clip_{k}": float(v) for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageResult(ref, counts={"training_clips": len(rows)}, metrics=metrics)
