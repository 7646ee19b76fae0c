"""`prefloop sample`: videos from a run's policy for given prompts, optionally reward-guided or
anchored on a first frame, written as mp4s to a folder (no manifest: a look, not a stage).

    prefloop sample --run demo --guidance VQ:MQ:TA=0:1:0 --weight 2 --prompts "a red ball falls" --out /tmp/s

The policy is the run's latest finetuned one (or bootstrap's base with `--policy base`); the reward
model that guides is the run's latest `train_reward` checkpoint unless `--reward-model` names one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_contracts import RunLayout, read_manifest
from models.reward_guidance import RewardGuidance, RewardGuidanceConfig
from tasks.generate import load_sampler, policy_fps, policy_from_checkpoints, prompt_id, sample_seed

MAX_ROUNDS = 100  # rounds probed for the latest finetune / train_reward stage


def latest_stage_manifest(layout: RunLayout, stage: str) -> Path | None:
    """The manifest of the highest round of a per-round stage that finished, or None."""
    found = None
    for k in range(1, MAX_ROUNDS + 1):
        path = layout.stage(stage, k).manifest_path
        if path.is_file():
            found = path
    return found


def run_policy(layout: RunLayout, which: str):
    """(policy config, LoRA folder or None, policy id) of the run: `latest` finetune, or the `base`."""
    path = latest_stage_manifest(layout, "finetune") if which == "latest" else None
    if path is None:
        path = layout.stage("bootstrap").manifest_path
    if not path.is_file():
        raise FileNotFoundError(f"prefloop sample: run `{layout.run}` has no bootstrap policy (`{path}`); run bootstrap first")
    rows = read_manifest(str(path), "checkpoints", layout).rows()
    if which == "base":
        rows = [r for r in rows if r["kind"] == "policy"]
    return policy_from_checkpoints(rows, layout, str(path))


def run_reward_model(layout: RunLayout) -> str:
    path = latest_stage_manifest(layout, "train_reward")
    if path is None:
        raise FileNotFoundError(
            f"prefloop sample: run `{layout.run}` has no train_reward checkpoint; pass --reward-model FOLDER"
        )
    rows = [r for r in read_manifest(str(path), "checkpoints", layout).rows() if r["kind"] == "reward_model"]
    return str(layout.resolve(rows[0]["path"]))


def sample_to_dir(
    layout: RunLayout,
    prompts: Sequence[str],
    out_dir: Path,
    *,
    policy: str = "latest",
    samples_per_prompt: int = 1,
    seed: int = 0,
    guidance: RewardGuidanceConfig | None = None,
    reward_model: str | None = None,
    first_frame: np.ndarray | None = None,
) -> dict:
    """Sample `samples_per_prompt` videos per prompt into `out_dir` (<prompt id>-<k>.mp4) and a
    `samples.json` listing them with the settings; returns that listing."""
    from tasks.video_io import write_video

    policy_cfg, lora, policy_id = run_policy(layout, policy)
    sampler = load_sampler(policy_cfg, lora, fold=True)
    fps = policy_fps(policy_cfg)
    steer = None
    if guidance is not None and guidance.enabled:
        folder = guidance.reward_model or reward_model or run_reward_model(layout)
        steer = RewardGuidance.from_reward_model(guidance, folder, fps, str(sampler.device))
    items = [(p, k, sample_seed(seed, 0, p, k)) for p in prompts for k in range(samples_per_prompt)]
    first = None if first_frame is None else np.stack([first_frame] * len(items))
    videos = sampler.sample([p for p, _, _ in items], [s for _, _, s in items], first_frame=first, reward_guidance=steer)
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = {"policy_id": policy_id, "guidance": None if steer is None else guidance.model_dump(mode="json"),
               "guidance_mode": None if steer is None else steer.mode,
               "guidance_stats": None if steer is None else steer.stats, "first_frame": first_frame is not None,
               "samples": []}
    for (prompt, k, s), video in zip(items, videos, strict=True):
        path = write_video(out_dir / f"{prompt_id(prompt)}-{k:02d}.mp4", video, fps)
        listing["samples"].append({"prompt": prompt, "sample_index": k, "seed": s, "video_path": str(path)})
    (out_dir / "samples.json").write_text(json.dumps(listing, indent=1))
    return listing
