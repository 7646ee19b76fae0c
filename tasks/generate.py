"""`generate`: K samples per prompt from the current policy, the raw material of preference pairs.

IPO samples K = 8 videos per prompt with the policy of the round; the critic ranks them and the
best and worst form a pair. Every sample's seed is derived from (config seed, round, prompt, k),
so a rerun, a retried shard or another machine draws the same video. Each sample is written as
an mp4 (what critics and people look at) and as a latent safetensors file (what `finetune`
trains on, so training never re-encodes a lossy mp4).

Options (ALGORITHMS.md §4, §7): `first_frame` anchors every sample of a prompt on a given frame 0
(HuViDPO): frame 0 of a selected real video whose caption is the prompt (`selection`), or an image
named per prompt in a JSON file (`file`). Each prompt's frame is written once as a lossless PNG under
`first_frames/`, recorded in the manifest's `first_frame_path`, and held fixed by the sampler;
`finetune` then drops frame 0 from the DPO errors. `reward_guidance` steers sampling toward weighted
reward dimensions (Flow-NRG, `models/reward_guidance.py`).

The work is cut into shards of `shard_size` samples. A Ray actor pool (one policy loaded per
actor, `num_gpus` per actor from `infra/resources.py`) samples a shard in batches and records it
in `shards/shard-NNNNN.json` after its files are on disk; a restarted stage keeps every shard
whose record matches its cache key and samples only the rest. Actors that die are restarted by
Ray and their shard is retried; files are written atomically and named by generation id, so a
retry overwrites, never duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, read_manifest, write_manifest
from data_contracts.lineage import atomic_write_bytes, atomic_write_json
from data_contracts.schemas import CAPTION_REASONS
from infra.ray_cluster import current_node_id
from models.policy import PolicyConfig, load_policy_folder_config
from models.reward_guidance import RewardGuidanceConfig
from tasks.common import StageConfig, StageResult

SHARD_RECORD_VERSION = 2  # 2: latents encode the written mp4


class GenerateConfig(StageConfig):
    prompts: Literal["train", "heldout"] = Field(
        "train", description="captions of this split of the `videos` manifest are the prompts (held-out ones stay for evaluate)"
    )
    prompt_file: str | None = Field(None, description="a UTF-8 text file, one prompt per line; replaces `prompts`")
    max_prompts: int | None = Field(64, ge=1, description="first N distinct prompts in sorted order (None: all)")
    samples_per_prompt: int = Field(8, ge=1, description="K samples per prompt; IPO samples 8")
    steps: int | None = Field(None, ge=1, description="Euler steps; None: the policy's own default")
    guidance: float | None = Field(None, ge=1.0, description="CFG scale; None: the policy's own default")
    seed: int = Field(0, description="base of every sample's seed (seed = hash(seed, round, prompt, k))")
    shard_size: int = Field(32, ge=1, description="samples per shard: the unit of work, retry and resume")
    batch_size: int = Field(16, ge=1, description="samples per sampling call of an actor")
    actors: int | None = Field(None, ge=1, description="policy actors; None: the `generate` row of infra/resources.py")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; None: infra/resources.py (clamped to what exists)")
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs (and math threads) per actor; None: the largest node's CPUs split between the actors"
    )
    write_latents: bool = Field(True, description="cache each sample's latents (safetensors) for training")
    policy: PolicyConfig | None = Field(
        None, description="the policy to sample (hub ids or folders); None: the policy in the input `checkpoints`"
    )
    first_frame: Literal["none", "selection", "file"] = Field(
        "none",
        description="none: unconditioned (the world's default); selection: frame 0 of a selected real video whose "
        "caption is the prompt (HuViDPO); file: the image named for the prompt in `first_frame_file`",
    )
    first_frame_file: str | None = Field(
        None, description="first_frame=file: a JSON object {prompt: image path}, paths relative to the file's folder"
    )
    reward_guidance: RewardGuidanceConfig = Field(
        default_factory=RewardGuidanceConfig,
        description="Flow-NRG reward guidance while sampling (scale 0: off); reward_model must name a checkpoint folder",
    )


# ---------------------------------------------------------------------------------------------
# 1. The pure core: prompts, ids, seeds, shards


def prompt_id(prompt: str) -> str:
    """A short stable id of a prompt's text."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def sample_seed(base: int, round_: int, prompt: str, k: int) -> int:
    """The seed of sample k of a prompt: independent of prompt order, shard and worker."""
    digest = hashlib.sha256(f"{base}/{round_}/{prompt}/{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def read_prompt_file(path: Path, stage: str = "generate") -> list[str]:
    """Non-empty lines of a prompt file; a line with a control character is refused by number."""
    if not path.is_file():
        raise FileNotFoundError(f"{stage}: prompt file `{path}` does not exist; set {stage}.prompt_file to a text file")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if any(ord(ch) < 32 for ch in text):
            raise ValueError(f"`{path}`, line {n}: control character in the prompt; remove it")
        if text:
            prompts.append(text)
    if not prompts:
        raise ValueError(f"`{path}`: no prompts; write one prompt per line")
    return prompts


def plan_samples(prompts: Sequence[str], cfg: GenerateConfig, round_: int) -> list[dict[str, Any]]:
    """One item per (prompt, k): ids, seed and file names, in a fixed order."""
    items = []
    for prompt in prompts:
        pid = prompt_id(prompt)
        for k in range(cfg.samples_per_prompt):
            gid = f"r{round_:02d}-{pid}-{k:02d}"
            items.append(
                {"generation_id": gid, "prompt_id": pid, "prompt": prompt, "sample_index": k,
                 "seed": sample_seed(cfg.seed, round_, prompt, k)}
            )
    return items


def shards_of(items: Sequence[dict], shard_size: int) -> list[list[dict]]:
    return [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def first_frame_sources_from_selection(prompts: Sequence[str], rows: Sequence[Mapping[str, Any]], where: str) -> dict[str, str]:
    """{prompt: stored video path} of the first selected real video (by video_id) whose caption is
    the prompt; every prompt must have one."""
    by_caption: dict[str, str] = {}
    for r in sorted((r for r in rows if r["selected"] and r["caption"]), key=lambda r: r["video_id"]):
        by_caption.setdefault(r["caption"], r["video_path"])
    missing = [p for p in prompts if p not in by_caption]
    if missing:
        raise ValueError(
            f"`{where}`: {len(missing)} of {len(prompts)} prompts have no selected real video with that caption "
            f"(first: {missing[0]!r}); generate.first_frame=selection needs one per prompt: lower generate.max_prompts, "
            "use first_frame=file, or first_frame=none"
        )
    return {p: by_caption[p] for p in prompts}


def first_frame_sources_from_file(prompts: Sequence[str], path: Path) -> dict[str, str]:
    """{prompt: image path} from a JSON object {prompt: path}; relative paths are relative to the file."""
    if not path.is_file():
        raise FileNotFoundError(f"generate: first_frame_file `{path}` does not exist; write a JSON object {{prompt: image}}")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"`{path}`: not valid JSON ({err}); write an object {{prompt: image path}}") from err
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"`{path}`: expected a JSON object {{prompt: image path}} with string paths")
    missing = [p for p in prompts if p not in mapping]
    if missing:
        raise ValueError(f"`{path}`: no image for {len(missing)} prompts (first: {missing[0]!r}); add one per prompt")
    return {p: str((path.parent / mapping[p]) if not Path(mapping[p]).is_absolute() else Path(mapping[p])) for p in prompts}


# ---------------------------------------------------------------------------------------------
# 2. Sampling one shard (runs inside an actor, or in-process)


@dataclass(frozen=True)
class ShardJob:
    index: int
    items: list[dict]
    videos_dir: str
    latents_dir: str | None
    record_path: str
    cache_key: str
    steps: int | None
    guidance: float | None
    batch_size: int
    fps: float
    reward_guidance: dict | None = None  # RewardGuidanceConfig as JSON, when enabled
    reward_folder: str | None = None


def sample_shard(policy: Any, job: ShardJob) -> dict[str, Any]:
    """Sample every item of a shard, write its mp4s and latents, then its record (last, atomically).

    The cached latent is the policy's encoding of the mp4 as written — the video the critic judges —
    not the sampler's raw end point: under CFG that end point leaves the data range (in the world at
    guidance 5, 7 % of its values lie outside [-1, 1], up to 3.4) and decoding clips it, so training
    on it would teach the policy values no video has.
    """
    import numpy as np
    import torch
    from safetensors.torch import save

    from models.reward_guidance import RewardGuidance
    from tasks.video_io import read_image, read_video, write_video

    started = time.perf_counter()
    rows, compute = [], 0.0
    steer = None
    if job.reward_guidance is not None:
        steer = RewardGuidance.from_reward_model(
            RewardGuidanceConfig.model_validate(job.reward_guidance), job.reward_folder, job.fps, str(policy.device)
        )
    for i in range(0, len(job.items), job.batch_size):
        batch = job.items[i : i + job.batch_size]
        t0 = time.perf_counter()
        first = None
        if batch[0].get("first_frame_path"):
            first = np.stack([read_image(b["first_frame_path"]) for b in batch])
        latents = policy.sample_latents(
            [b["prompt"] for b in batch], [b["seed"] for b in batch], job.steps, job.guidance,
            first_frame=first, reward_guidance=steer,
        )
        videos = policy.decode(latents)
        compute += time.perf_counter() - t0
        paths = [Path(job.videos_dir) / f"{item['generation_id']}.mp4" for item in batch]
        for video_path, video in zip(paths, videos, strict=True):
            write_video(video_path, video, job.fps)
        if job.latents_dir is not None:
            latents = policy.encode(np.stack([read_video(p) for p in paths]))
        for item, latent, video_path in zip(batch, latents, paths, strict=True):
            latent_path = None
            if job.latents_dir is not None:
                latent_path = Path(job.latents_dir) / f"{item['generation_id']}.safetensors"
                atomic_write_bytes(latent_path, save({"latent": latent.detach().to(torch.float32).cpu().contiguous()}))
            rows.append({**item, "video_path": str(video_path), "latent_path": None if latent_path is None else str(latent_path)})
    record = {"version": SHARD_RECORD_VERSION, "cache_key": job.cache_key, "index": job.index, "rows": rows,
              "seconds": time.perf_counter() - started, "compute_seconds": compute, "pid": os.getpid(),
              "node_id": current_node_id(), "guidance_stats": None if steer is None else steer.stats}
    atomic_write_json(Path(job.record_path), record)
    return record


def finished_shard(record_path: Path, cache_key: str, items: Sequence[dict]) -> list[dict] | None:
    """The rows of a shard finished earlier with the same cache key and items, files present; else None."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    rows = record.get("rows") or []
    if record.get("cache_key") != cache_key or [r["generation_id"] for r in rows] != [i["generation_id"] for i in items]:
        return None
    for r in rows:
        if not Path(r["video_path"]).is_file() or (r["latent_path"] and not Path(r["latent_path"]).is_file()):
            return None
    return rows


# ---------------------------------------------------------------------------------------------
# 3. The policy: from the config, or from the `checkpoints` manifest


def policy_from_checkpoints(rows: Sequence[Mapping[str, Any]], layout: RunLayout, where: str) -> tuple[PolicyConfig, str | None, str]:
    """(policy config, LoRA folder or None, policy id) from a `checkpoints` manifest.

    The base row (kind `policy`) points at a folder with `policy.json` (the `PolicyConfig` it was
    saved with, paths relative to the folder); a `policy_lora` row, when present, is applied on top.
    """
    bases = [r for r in rows if r["kind"] == "policy"]
    loras = [r for r in rows if r["kind"] == "policy_lora"]
    if len(bases) != 1 or len(loras) > 1:
        raise ValueError(
            f"`{where}`: expected one `policy` row and at most one `policy_lora` row, found {len(bases)} and "
            f"{len(loras)}; point generate at a bootstrap or finetune checkpoints manifest, or set generate.policy"
        )
    policy_cfg = load_policy_folder_config(layout.resolve(bases[0]["path"]))
    lora = str(layout.resolve(loras[0]["path"])) if loras else None
    policy_id = loras[0]["checkpoint_id"] if loras else bases[0]["checkpoint_id"]
    return policy_cfg, lora, policy_id


def load_sampler(policy_cfg: PolicyConfig, lora: str | None, fold: bool = False) -> Any:
    """The policy with its LoRA; `fold`: folded into the weights (`Policy.fold_lora`): the same
    policy without the adapter's extra matmuls (~15% faster per sample on CPU), and the start of
    a round whose reference moves to it (finetune)."""
    from models.policy import Policy

    policy = Policy.from_pretrained(policy_cfg)
    if lora is not None:
        policy.load_lora(lora)
        if fold:
            policy.fold_lora()
    return policy


# ---------------------------------------------------------------------------------------------
# 4. The edge


def select_prompts(
    inputs: Mapping[str, ManifestRef], split: str, prompt_file: str | None, max_prompts: int | None,
    layout: RunLayout, stage: str,
) -> list[str]:
    """The prompt file's prompts, or the distinct captions of one split of `videos` in sorted
    order; the first `max_prompts`. Shared by `generate` (train split) and `evaluate` (held-out)."""
    if prompt_file is not None:
        prompts = read_prompt_file(Path(prompt_file), stage)
    else:
        if "videos" not in inputs:
            raise ValueError(f"{stage}: no prompts; pass the `videos` manifest or set {stage}.prompt_file")
        videos = read_manifest(inputs["videos"].path, "videos", layout)
        # a caption that ingest recorded as unusable (control characters, too long) is no prompt
        prompts = sorted({r["caption"] for r in videos.rows()
                          if r["split"] == split and r["caption"] and r["reason"] not in CAPTION_REASONS})
        if not prompts:
            raise ValueError(
                f"`{inputs['videos'].path}`: no captions in split `{split}`; ingest with a held-out share "
                f"(ingest.heldout_fraction) or give {stage}.prompt_file"
            )
    prompts = list(dict.fromkeys(prompts))
    return prompts[:max_prompts] if max_prompts is not None else prompts


def run(
    inputs: Mapping[str, ManifestRef],
    cfg: GenerateConfig,
    layout: RunLayout,
    out: StageDir,
    lineage: Lineage,
    *,
    round: int = 1,
    ray_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    worker_cls: type | None = None,
) -> StageResult:
    """Prompts × K samples → mp4s, latents and the `generations` manifest."""
    # 1. the policy and the plan
    if cfg.policy is not None:
        policy_cfg, lora, policy_id = cfg.policy, None, cfg.policy.transformer
    else:
        ckpt = read_manifest(inputs["checkpoints"].path, "checkpoints", layout)
        policy_cfg, lora, policy_id = policy_from_checkpoints(ckpt.rows(), layout, inputs["checkpoints"].path)
    prompts = select_prompts(inputs, cfg.prompts, cfg.prompt_file, cfg.max_prompts, layout, "generate")
    items = plan_samples(prompts, cfg, round)
    frames = prepare_first_frames(prompts, inputs, cfg, policy_cfg, layout, out)
    for item in items:
        item["first_frame_path"] = frames.get(item["prompt"])
    guide, guide_folder = None, None
    if cfg.reward_guidance.enabled:
        if cfg.reward_guidance.reward_model is None:
            raise ValueError(
                "generate.reward_guidance.scale > 0 but reward_guidance.reward_model is not set; name a train_reward "
                "checkpoint folder (e.g. runs/<run>/round-01/train_reward/reward_model)"
            )
        guide, guide_folder = cfg.reward_guidance.model_dump(mode="json"), cfg.reward_guidance.reward_model
    steps = policy_cfg.steps if cfg.steps is None else cfg.steps
    guidance = policy_cfg.guidance_scale if cfg.guidance is None else cfg.guidance
    videos_dir, latents_dir, records_dir = out.files("videos"), out.files("latents"), out.files("shards")
    for d in (videos_dir, latents_dir, records_dir):
        d.mkdir(parents=True, exist_ok=True)
    jobs = [
        ShardJob(
            index=i, items=shard, videos_dir=str(videos_dir), latents_dir=str(latents_dir) if cfg.write_latents else None,
            record_path=str(records_dir / f"shard-{i:05d}.json"), cache_key=lineage.cache_key, steps=steps,
            guidance=guidance, batch_size=cfg.batch_size, fps=policy_fps(policy_cfg), reward_guidance=guide,
            reward_folder=guide_folder,
        )
        for i, shard in enumerate(shards_of(items, cfg.shard_size))
    ]
    # 2. keep shards finished by an earlier attempt, sample the rest on Ray
    done: dict[int, list[dict]] = {}
    for job in [] if out.fresh else jobs:  # forced: sample every shard again
        rows = finished_shard(Path(job.record_path), lineage.cache_key, job.items)
        if rows is not None:
            done[job.index] = rows
    resumed = len(done)
    nodes: set[str] = set()
    todo = [j for j in jobs if j.index not in done]
    busy: dict[int, float] = {}  # sampling seconds per actor process, for compute_s
    steered = {"corrections": 0, "clipped": 0, "nonfinite": 0}
    if todo:
        for record in sample_on_ray(
            todo, policy_cfg, lora, cfg, ray_address, progress, len(done), len(jobs), worker_cls or PolicyWorker
        ):
            done[record["index"]] = record["rows"]
            nodes.add(record["node_id"])
            busy[record.get("pid", 0)] = busy.get(record.get("pid", 0), 0.0) + record.get("compute_seconds", 0.0)
            for k, v in (record.get("guidance_stats") or {}).items():
                steered[k] += v
    # 3. the manifest, in plan order
    rows = []
    for job in jobs:
        for r in done[job.index]:
            rows.append(
                {**r, "video_path": layout.stored_path(Path(r["video_path"])),
                 "latent_path": None if r["latent_path"] is None else layout.stored_path(Path(r["latent_path"])),
                 "first_frame_path": None if not r.get("first_frame_path") else layout.stored_path(Path(r["first_frame_path"])),
                 "policy_id": policy_id, "steps": steps, "guidance": guidance, "round": round}
            )
    ref = write_manifest(rows, "generations", out.manifest_path, layout, lineage)
    counts = {"prompts": len({r["prompt_id"] for r in rows}), "samples": len(rows), "shards": len(jobs),
              "shards_resumed": resumed, "sampling_nodes": len(nodes)}
    if cfg.first_frame != "none":
        counts["first_frame_conditioned"] = sum(1 for r in rows if r["first_frame_path"])
    metrics = {"steps": float(steps), "guidance": float(guidance), "compute_s": sum(busy.values()) / max(len(busy), 1)}
    if guide is not None:
        # counts of the shards sampled in this attempt (resumed shards were counted when they ran)
        counts.update({f"guidance_{k}": v for k, v in steered.items()})
        metrics["reward_guidance_scale"] = cfg.reward_guidance.scale
    return StageResult(ref, counts=counts, metrics=metrics)


def prepare_first_frames(
    prompts: Sequence[str], inputs: Mapping[str, ManifestRef], cfg: GenerateConfig, policy_cfg: PolicyConfig,
    layout: RunLayout, out: StageDir,
) -> dict[str, str]:
    """{prompt: PNG path} of each prompt's first frame, written under the stage's `first_frames/`
    (losslessly, so the held frame is exactly the given one); {} when first_frame=none."""
    import numpy as np

    from tasks.video_io import read_image, read_video, write_image

    if cfg.first_frame == "none":
        return {}
    if cfg.first_frame == "selection":
        if "selection" not in inputs:
            raise ValueError("generate.first_frame=selection needs the `selection` manifest as an input (select's output)")
        rows = read_manifest(inputs["selection"].path, "selection", layout).rows()
        sources = first_frame_sources_from_selection(prompts, rows, inputs["selection"].path)
        load = lambda stored: read_video(layout.resolve(stored), max_frames=1)[0]  # noqa: E731
    else:
        if cfg.first_frame_file is None:
            raise ValueError("generate.first_frame=file needs generate.first_frame_file (a JSON object {prompt: image})")
        sources = first_frame_sources_from_file(prompts, Path(cfg.first_frame_file))
        load = read_image
    folder = out.files("first_frames")
    frames = {}
    for prompt, source in sources.items():
        image = np.ascontiguousarray(load(source))
        if image.shape != (policy_cfg.height, policy_cfg.width, 3):
            raise ValueError(
                f"`{source}`: first frame for {prompt!r} is {image.shape[1]}x{image.shape[0]}, the policy makes "
                f"{policy_cfg.width}x{policy_cfg.height}; resize it or pick a clip of the policy's size"
            )
        frames[prompt] = str(write_image(folder / f"{prompt_id(prompt)}.png", image))
    return frames


def policy_fps(policy_cfg: PolicyConfig) -> float:
    """Frame rate the mp4s are written at: the embedded world's clip rate (8 frames per second)."""
    from models.physics_world import WorldSpec

    return WorldSpec().fps


def sample_on_ray(
    jobs: Sequence[ShardJob],
    policy_cfg: PolicyConfig,
    lora: str | None,
    cfg: GenerateConfig,
    address: str | None,
    progress: Callable[[int, int], None] | None,
    already: int,
    total: int,
    worker_cls: type,
):
    """Yield each shard's record as actors finish it; a dead actor is restarted and its shard retried."""
    import ray

    from infra.ray_cluster import ray_session
    from infra.resources import largest_node_cpus, resources_for, torch_device

    overrides = {k: v for k, v in {"actors": cfg.actors, "num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus}.items()
                 if v is not None}
    with ray_session(address=address):
        res = resources_for("generate", overrides, gpus_available=ray.cluster_resources().get("GPU", 0.0),
                            node_cpus=largest_node_cpus())
        device_cfg = policy_cfg.model_copy(update={"device": torch_device(res.num_gpus)}) if policy_cfg.device == "auto" else policy_cfg
        worker = ray.remote(worker_cls).options(max_restarts=3, max_task_retries=3, **res.ray_options())
        actors = [worker.remote(device_cfg.model_dump(mode="json"), lora) for _ in range(min(res.actors, len(jobs)))]
        queue = list(jobs)
        running = {}
        for actor in actors:
            if queue:
                running[actor.run_shard.remote(queue.pop(0))] = actor
        finished = already
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready[0])
            record = ray.get(ready[0])
            finished += 1
            if progress is not None:
                progress(finished, total)
            yield record
            if queue:
                running[actor.run_shard.remote(queue.pop(0))] = actor
        for actor in actors:
            ray.kill(actor)


class PolicyWorker:
    """A Ray actor holding one policy, loaded once; samples shard after shard."""

    def __init__(self, policy_cfg: dict, lora: str | None) -> None:
        self.policy = load_sampler(PolicyConfig.model_validate(policy_cfg), lora, fold=True)

    def run_shard(self, job: ShardJob) -> dict[str, Any]:
        return sample_shard(self.policy, job)

    def pid(self) -> int:
        import os

        return os.getpid()
