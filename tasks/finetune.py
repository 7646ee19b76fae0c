"""`finetune`: preference fine-tuning of the round's policy (LoRA) on the round's labelled pairs.

Flow-DPO by default (VideoAlign, arXiv 2501.13918), or Diffusion-DPO, IPO's squared loss, KTO,
Flow-RWR or SFT on winners (`train.method`); `models/preference_training.py` holds the loop and
`models/losses/` the losses. Pairs come from `labels`; a pair is oriented by `prefer` (which
dimensions decide chosen vs. rejected; ties, `invalid` labels and conflicts are left out of DPO,
as IPO keeps ties for the reward model only) and trains on the latents `generate` cached, so no
mp4 is decoded. With `train.lambda2 > 0` the round's selected real videos (PhysHPO, IPO) join as
a flow-matching regulariser. The output `checkpoints` manifest holds the base policy row and the
new LoRA row, which is what `generate` of the next round samples with.

With `real_clips.steps > 0` a real-clip phase comes first: the round's policy (its LoRA merged into
the weights) trains every weight with the rectified-flow loss on the selected real training clips
(`train_on_real_clips`, bootstrap's loop continued), is saved as the round's own policy folder
(`policy/`), and the LoRA then trains on the pairs against it (it is the reference); the manifest's
`policy` row is that folder and the LoRA row sits on it, so the next round and `evaluate` load them
as any base + LoRA. It runs in the stage's process on the policy's device, before the preference
training (local or Ray Train).

From round 2 on the reference moves (`reference_policy: previous_round`, IPO): the previous
round's LoRA is folded into the weights, a fresh LoRA trains against that policy, and the saved
LoRA stacks both (ranks add up; still one diffusers-loadable file over the base). With `base` the
previous LoRA trains further and the reference stays the base. The checkpoint row's
`metrics_json.reference` and the count `reference_moved` say which.

Training runs through Ray Train when there is something to spread (`backend: auto`, the default:
`workers` > 1, or a cluster at `run.ray_address`; `ray_train` always): a `TorchTrainer` whose
workers each load the policy and run `train_preference`, `workers` GPU workers with DDP on a
cluster. One worker on this machine trains in the stage's process instead (`local`), the same
function on the same data with the same LoRA bit for bit (a test): through Ray Train it paid
~20 s of start-up (controller, worker process, imports) and ~15% slower steps here (0.41 vs
0.35 s), ~40 s a round of the default run. Rank 0 alone writes the LoRA and `metrics.json`
into the stage folder (on a cluster that folder must be on storage every node shares); Ray
Train's own run state goes to `ray_train/` beside them. The per-step records reach `on_step`
after training, from the history rank 0 wrote (Ray Train V2 keeps only metrics attached to
checkpoints, and the Prefect logger lives in this process); `local` calls `on_step` live.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, read_manifest, write_manifest
from models.policy import PolicyConfig
from models.preference_training import (
    METRICS_FILE,
    PreferenceData,
    PreferenceTrainConfig,
    save_preference_checkpoint,
    train_preference,
)
from tasks.common import StageConfig, StageResult
from tasks.generate import load_sampler, policy_from_checkpoints

PREFER_RULES = ("mq_ta", "mq", "overall")
PAIRWISE_METHODS = ("flow_dpo", "diffusion_dpo", "ipo")


class RealClipConfig(BaseModel):
    """The real-clip phase: full-parameter flow matching on the selected real training clips before the
    preference loss (PhysHPO's selected real videos, IPO's real-data regulariser taken to every weight)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(
        1000, ge=0,
        description="optimiser steps of the phase (0: off). On the world, continuing the base on its 841 selected "
        "clips: 600 steps +4, 1,200 +11, 2,200 +21 points of plausibility; 1,000 steps take ~120 s on 2 cores "
        "(README, A round)",
    )
    batch_size: int = Field(16, ge=1, description="clips per step (bootstrap's 16)")
    lr: float = Field(2e-3, gt=0, description="AdamW peak rate, warmup then cosine (bootstrap's 2e-3)")
    warmup_steps: int = Field(100, ge=0, description="linear warmup steps")
    ema_decay: float | None = Field(0.995, gt=0, lt=1, description="sample from the weights' moving average (None: the last)")
    first_frame_rate: float = Field(
        0.25, ge=0, lt=1,
        description="share of clips trained to continue their frame 0, when the policy holds first frames clean "
        "(`first_frame_mode=clean`); a `path` policy trains text-to-video only",
    )
    max_clips: int | None = Field(None, ge=1, description="at most this many selected training clips (None: all)")


class FinetuneConfig(StageConfig):
    real_clips: RealClipConfig = Field(
        default_factory=RealClipConfig,
        description="full-parameter flow matching on the selected real training clips before the preference loss; "
        "the round's policy becomes a full checkpoint plus the round's LoRA (off unless real_clips.steps > 0)",
    )
    train: PreferenceTrainConfig = Field(default_factory=PreferenceTrainConfig, description="method, β, LoRA and optimiser")
    prefer: Literal["mq_ta", "mq", "overall"] = Field(
        "mq_ta",
        description="mq_ta: MQ decides and TA must not disagree (ENVIRONMENT.md: winners on motion alone lost caption "
        "agreement); mq: MQ alone; overall: A is chosen (label's overall-score order) unless a dimension says B",
    )
    reference_policy: Literal["previous_round", "base"] = Field(
        "previous_round",
        description="the Flow-DPO/KTO reference from round 2 on: previous_round (IPO: the previous round's LoRA is "
        "folded into the weights and a fresh LoRA trains against that policy; the saved LoRA stacks both) or base "
        "(the previous LoRA trains further against the base)",
    )
    max_pairs: int | None = Field(None, ge=1, description="use at most this many pairs (None: all usable pairs)")
    real_winners: bool = Field(
        False,
        description="PhysHPO's instance level: each usable pair's loser also loses to a selected real clip of the same "
        "caption (one more pair per pair; pairwise methods only)",
    )
    max_real_videos: int = Field(256, ge=1, description="selected real clips kept for the λ2 regulariser")
    backend: Literal["auto", "ray_train", "local"] = Field(
        "auto",
        description="auto: ray_train when workers > 1 or run.ray_address is set, else local; ray_train: a Ray Train "
        "TorchTrainer (N GPU workers with DDP on a cluster); local: train in this process (on_step is called live)",
    )
    workers: int = Field(
        1, ge=1, description="Ray Train workers; > 1 trains with DDP, each worker on train.batch_size / workers rows a step"
    )
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per Ray Train worker; None: infra/resources.py (clamped to what the cluster has)"
    )
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs (and math threads) per Ray Train worker; None: the largest node's CPUs split "
        "between the workers (2 here: 0.32 s a step instead of 0.53 s with 1)"
    )

    @property
    def reads_selection(self) -> bool:
        """Whether the stage needs select's manifest (λ2, real winners or the real-clip phase)."""
        return self.train.lambda2 > 0 or self.real_winners or self.real_clips.steps > 0

    @model_validator(mode="after")
    def _check_workers(self) -> FinetuneConfig:
        if self.real_winners and self.train.method not in PAIRWISE_METHODS:
            raise ValueError(
                f"finetune.real_winners adds pairs, and finetune.train.method={self.train.method} does not train on "
                f"pairs; use one of {', '.join(PAIRWISE_METHODS)} or set finetune.real_winners=false"
            )
        if self.real_clips.steps > 0 and self.reference_policy == "base":
            raise ValueError(
                "finetune.real_clips.steps > 0 trains every weight, so there is no base for the LoRA to keep training "
                "against; use finetune.reference_policy=previous_round or set finetune.real_clips.steps=0"
            )
        if self.workers > 1 and self.backend == "local":
            raise ValueError(f"finetune.workers={self.workers} needs finetune.backend=ray_train (local is one process)")
        if self.train.batch_size % self.workers:
            raise ValueError(
                f"finetune.train.batch_size={self.train.batch_size} does not split over finetune.workers={self.workers}; "
                "make the batch size a multiple of the number of workers"
            )
        return self


# ---------------------------------------------------------------------------------------------
# 1. The pure core: which way a pair points


def orient(row: Mapping[str, Any], rule: str) -> str | None:
    """`A` or `B` (the chosen video) of a labelled pair under `rule`, or None when the labels do not decide."""
    mq, ta, vq = row.get("label_mq"), row.get("label_ta"), row.get("label_vq")
    if rule == "mq":
        return mq if mq in ("A", "B") else None
    if rule == "mq_ta":
        if mq not in ("A", "B"):
            return None
        other = "B" if mq == "A" else "A"
        return None if ta == other else mq
    if rule == "overall":
        votes = {lab for lab in (vq, mq, ta) if lab in ("A", "B")}
        return votes.pop() if len(votes) == 1 else None
    raise ValueError(f"finetune.prefer={rule!r}: use one of {', '.join(PREFER_RULES)}")


def preference_pairs(rows: Sequence[Mapping[str, Any]], rule: str) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """(prompt, chosen video, rejected video) of every pair the rule decides, and why the rest were left out."""
    pairs, left_out = [], {"no_second_video": 0, "undecided": 0}
    for r in rows:
        if r["video_b"] is None:
            left_out["no_second_video"] += 1
            continue
        side = orient(r, rule)
        if side is None:
            left_out["undecided"] += 1
            continue
        chosen, rejected = (r["video_a"], r["video_b"]) if side == "A" else (r["video_b"], r["video_a"])
        pairs.append((r["prompt"], chosen, rejected))
    return pairs, left_out


# ---------------------------------------------------------------------------------------------
# 2. The edge


def load_latents(paths: Sequence[Path]):
    import torch
    from safetensors.torch import load_file

    return torch.stack([load_file(str(p))["latent"] for p in paths])


def pair_latents(pairs, gens: Sequence[Mapping[str, Any]], layout: RunLayout, where: str):
    """Cached latents of each pair's chosen and rejected video, found through `generations`."""
    latent_of = {g["video_path"]: g["latent_path"] for g in gens}
    missing = [v for _, c, r in pairs for v in (c, r) if not latent_of.get(v)]
    if missing:
        raise ValueError(
            f"`{where}`: {len(missing)} labelled videos have no cached latent in the round's generations (first: "
            f"{missing[0]}); rerun generate with generate.write_latents=true"
        )
    chosen = load_latents([layout.resolve(latent_of[c]) for _, c, _ in pairs])
    rejected = load_latents([layout.resolve(latent_of[r]) for _, _, r in pairs])
    return chosen, rejected


def real_videos(inputs: Mapping[str, ManifestRef], policy_cfg: PolicyConfig, max_clips: int | None, layout: RunLayout,
                off: str = "finetune.train.lambda2=0"):
    """Frames and captions of the selected real training clips (λ2, the real-clip phase); held-out clips
    (their prompts stay unseen by every model) and clips of another shape than the policy's are left
    out. `off` names the setting that turns their user off, for the error when there are none."""
    from tasks.video_io import read_video

    rows = [r for r in read_manifest(inputs["selection"].path, "selection", layout).rows()
            if r["selected"] and r["split"] == "train"]
    frames, captions = [], []
    shape = (policy_cfg.frames, policy_cfg.height, policy_cfg.width, 3)
    for r in rows[:max_clips]:
        clip = read_video(layout.resolve(r["video_path"]))
        if clip.shape == shape:
            frames.append(clip)
            captions.append(r["caption"])
    if not frames:
        raise ValueError(
            f"`{inputs['selection'].path}`: no selected training clip of shape {shape}; ingest clips select keeps, "
            f"or set {off}"
        )
    return np.stack(frames), captions


def real_winner_clips(inputs: Mapping[str, ManifestRef], policy_cfg: PolicyConfig, prompts: Sequence[str],
                      layout: RunLayout, round_: int) -> tuple[np.ndarray, list[int]]:
    """Frames of one selected real clip per pair (PhysHPO's instance-level winner) and the pairs that got one.

    A pair's clip is a selected clip whose caption is the pair's prompt, of the policy's shape; a prompt's
    pairs take its clips in turn, starting at an offset that moves with the round, so rounds see
    different clips. Pairs whose prompt has no such clip get none."""
    from tasks.video_io import read_video

    shape = (policy_cfg.frames, policy_cfg.height, policy_cfg.width, 3)
    wanted = set(prompts)
    by_caption: dict[str, list[str]] = {}
    for r in read_manifest(inputs["selection"].path, "selection", layout).rows():
        if r["selected"] and r["caption"] in wanted:
            by_caption.setdefault(r["caption"], []).append(r["video_path"])
    for paths in by_caption.values():
        paths.sort()
    frames, kept, used = [], [], dict.fromkeys(by_caption, 0)
    for i, prompt in enumerate(prompts):
        paths = by_caption.get(prompt, [])
        for _ in range(len(paths)):
            path = paths[(round_ - 1 + used[prompt]) % len(paths)]
            used[prompt] += 1
            clip = read_video(layout.resolve(path))
            if clip.shape == shape:
                frames.append(clip)
                kept.append(i)
                break
    empty = np.zeros((0, *shape), dtype=np.uint8)
    return (np.stack(frames) if frames else empty), kept


def train_on_real_clips(
    inputs: Mapping[str, ManifestRef], policy_cfg: PolicyConfig, lora: str | None, cfg: RealClipConfig,
    layout: RunLayout, out: StageDir, round_: int, on_step: Callable[[dict], None] | None = None,
) -> tuple[PolicyConfig, dict]:
    """The real-clip phase: the round's policy (its LoRA merged in) trained in full on the selected real
    training clips, saved as a policy folder (`out/policy`: policy.json + transformer; the text encoder
    and VAE stay where the start policy had them). Returns the folder's config and the training info."""
    from models.policy import Policy, load_policy_folder_config, save_policy_folder
    from models.policy_training import TRANSFORMER_DIR, BasePolicyTrainConfig, train_flow_matching

    if "selection" not in inputs:
        raise ValueError("finetune.real_clips.steps > 0 needs the `selection` input (select's manifest)")
    frames, captions = real_videos(inputs, policy_cfg, cfg.max_clips, layout, "finetune.real_clips.steps=0")
    policy = Policy.from_pretrained(policy_cfg)
    if lora is not None:
        policy.load_lora(lora)
        policy.merge_lora()
    rate = cfg.first_frame_rate if policy_cfg.first_frame_mode == "clean" else 0.0
    train_cfg = BasePolicyTrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                      ema_decay=cfg.ema_decay, first_frame_rate=rate, seed=round_)
    on_log = None if on_step is None else (lambda step, loss: on_step({"phase": "real_clips", "step": step, "loss": loss}))
    info = train_flow_matching(policy, frames, captions, train_cfg, on_log)
    folder = out.files("policy")
    policy.transformer.save_pretrained(folder / TRANSFORMER_DIR, safe_serialization=True)
    save_policy_folder(folder, policy_cfg.model_copy(update={"transformer": str(folder / TRANSFORMER_DIR),
                                                             "transformer_subfolder": None}), within=layout.run_dir)
    return load_policy_folder_config(folder), info


@dataclass(frozen=True)
class RealWinners:
    """PhysHPO's instance-level pairs: real clips (uint8 frames, encoded by the worker's policy) over
    generated losers (latents), one prompt each."""

    frames: np.ndarray
    prompts: list[str]
    rejected: Any  # torch.Tensor (N, C, F, H, W)


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs, sent to it whole: it reads no manifest."""

    policy_cfg: PolicyConfig
    lora: str | None  # the previous round's LoRA folder
    data: PreferenceData
    train: PreferenceTrainConfig
    real_frames: np.ndarray | None
    real_prompts: list[str] | None
    lora_dir: Path  # where rank 0 writes the new LoRA and metrics.json
    fold: bool = False  # fold `lora` into the weights and train a fresh LoRA against it (the reference moves)
    real_winners: RealWinners | None = None  # pairs appended to `data` once the worker has encoded the clips


def train_and_save(job: TrainJob, on_step: Callable[[dict], None] | None = None, device: str | None = None) -> dict:
    """Load the policy, train it on the job's data, and (on rank 0 only) write the LoRA and metrics.

    The same function is the local backend and each Ray Train worker's loop; `device` replaces the
    policy's `auto` device with the one Ray Train gave the worker."""
    policy_cfg = job.policy_cfg
    if device is not None and policy_cfg.device == "auto":
        policy_cfg = policy_cfg.model_copy(update={"device": device})
    policy = load_sampler(policy_cfg, job.lora, fold=job.fold)
    real_latents = None if job.real_frames is None else policy.encode(job.real_frames)
    data = job.data
    if job.real_winners is not None:
        import torch

        w = job.real_winners
        real = policy.encode(np.array(w.frames)).to(data.chosen.dtype)  # a copy: Ray hands workers read-only arrays
        data = PreferenceData(prompts=list(data.prompts) + w.prompts, chosen=torch.cat([data.chosen, real]),
                              rejected=torch.cat([data.rejected, w.rejected]))
    info = train_preference(policy, data, job.train, on_step=on_step, real_latents=real_latents,
                            real_prompts=job.real_prompts)
    if info.get("distributed", {}).get("rank", 0) == 0:
        save_preference_checkpoint(policy, job.lora_dir, info)
    return info


def _train_loop_per_worker(config: dict) -> None:
    import ray.train.torch

    train_and_save(config["job"], device=str(ray.train.torch.get_device()))


def train_on_ray(job: TrainJob, cfg: FinetuneConfig, out: StageDir, address: str | None) -> dict:
    """Run `train_and_save` on `cfg.workers` Ray Train workers; returns the info rank 0 wrote."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra.ray_cluster import ray_session
    from infra.resources import largest_node_cpus, resources_for

    storage = out.files("ray_train")
    # Ray Train restores the state of a run it finds under the same name; every attempt of the
    # stage trains from the start (the LoRA is published only by the manifest), so none is kept.
    shutil.rmtree(storage, ignore_errors=True)
    overrides = {k: v for k, v in {"actors": cfg.workers, "num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus}.items()
                 if v is not None}
    with ray_session(address=address):
        res = resources_for("finetune", overrides, gpus_available=ray.cluster_resources().get("GPU", 0.0),
                            node_cpus=largest_node_cpus())
        per_worker = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus > 0 else {})}
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=res.num_gpus > 0,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name="finetune", storage_path=str(storage),
                                 worker_runtime_env=res.ray_options().get("runtime_env")),
        )
        trainer.fit()
    return json.loads((job.lora_dir / METRICS_FILE).read_text())


def run(
    inputs: Mapping[str, ManifestRef],
    cfg: FinetuneConfig,
    layout: RunLayout,
    out: StageDir,
    lineage: Lineage,
    *,
    round: int = 1,
    on_step: Callable[[dict], None] | None = None,
    ray_address: str | None = None,
) -> StageResult:
    """`labels` + `generations` (+ `selection`) + the round's policy → a LoRA checkpoint and its curves."""
    # 1. pairs and their cached latents
    labels = read_manifest(inputs["labels"].path, "labels", layout).rows()
    gens = read_manifest(inputs["generations"].path, "generations", layout).rows()
    pairs, left_out = preference_pairs(labels, cfg.prefer)
    if cfg.max_pairs is not None:
        pairs = pairs[: cfg.max_pairs]
    ckpt_rows = read_manifest(inputs["checkpoints"].path, "checkpoints", layout).rows()
    counts = {"pairs": len(pairs), "labels": len(labels), **{f"left_out_{k}": v for k, v in left_out.items()}}
    if not pairs:
        # Nothing to learn from (every label a tie, invalid or in conflict): the round keeps its
        # policy unchanged rather than failing the DAG; the counts say why, the gate decides.
        ref = write_manifest(ckpt_rows, "checkpoints", out.manifest_path, layout, lineage)
        return StageResult(ref, counts={**counts, "steps_done": 0, "policy_unchanged": 1}, metrics={"compute_s": 0.0})
    chosen, rejected = pair_latents(pairs, gens, layout, inputs["generations"].path)
    prompts = [p for p, _, _ in pairs]
    # 2. the round's policy (base + the previous round's LoRA, if any), loaded by the trainer
    policy_cfg, lora, policy_id = policy_from_checkpoints(ckpt_rows, layout, inputs["checkpoints"].path)
    if any(g["first_frame_path"] for g in gens):
        # HuViDPO: generate held frame 0 at the given frame, so its error says nothing of the preference;
        # a policy that holds it clean (first_frame_mode=clean) is trained with it held the same way
        held = {"exclude_first_frame": True, "hold_first_frame": policy_cfg.first_frame_mode == "clean"}
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=held)})
    if cfg.train.method == "kto":
        data = PreferenceData.pointwise_from_pairs(chosen, rejected, prompts)
    elif cfg.train.method == "rwr":
        import torch

        data = PreferenceData(prompts=prompts + prompts, videos=torch.cat([chosen, rejected]),
                              rewards=torch.cat([torch.ones(len(pairs)), torch.zeros(len(pairs))]))
    else:
        data = PreferenceData(prompts=prompts, chosen=chosen, rejected=rejected)
    real_frames, real_prompts = (None, None)
    if cfg.train.lambda2 > 0:
        real_frames, real_prompts = real_videos(inputs, policy_cfg, cfg.max_real_videos, layout)
    winners = None
    if cfg.real_winners:
        frames, kept = real_winner_clips(inputs, policy_cfg, prompts, layout, round)
        winners = RealWinners(frames, [prompts[i] for i in kept], rejected[kept])
        counts["real_winner_pairs"] = len(kept)
    # 3. train (rank 0 saves), plot
    batch = cfg.train.batch_size
    rows = len(pairs) + (len(winners.prompts) if winners is not None else 0)
    if rows < batch:  # a multiple of the workers, so each takes an equal share
        batch = rows - rows % cfg.workers
        if batch == 0:
            raise ValueError(
                f"`{inputs['labels'].path}`: {rows} usable pairs cannot be split over finetune.workers="
                f"{cfg.workers}; label more pairs or use fewer workers"
            )
    train_cfg = cfg.train if batch == cfg.train.batch_size else cfg.train.model_copy(update={"batch_size": batch})
    base = next(r for r in ckpt_rows if r["kind"] == "policy")
    real_phase = None
    if cfg.real_clips.steps > 0:
        # the round's policy trained in full on real clips becomes the LoRA's base and the DPO reference
        policy_cfg, real_phase = train_on_real_clips(inputs, policy_cfg, lora, cfg.real_clips, layout, out, round,
                                                    on_step)
        base = {
            "checkpoint_id": f"policy-r{round:02d}", "kind": "policy", "format": "diffusers",
            "path": layout.stored_path(out.files("policy")), "base_id": policy_id, "round": round,
            "metrics_json": json.dumps({"real_clips": real_phase["clips"], "steps": real_phase["steps_done"],
                                        "final_loss": real_phase["final_loss"], "seconds": real_phase["seconds"]},
                                       sort_keys=True),
        }
        lora, policy_id = None, base["checkpoint_id"]
        counts.update(real_clip_steps=int(real_phase["steps_done"]), real_clips=int(real_phase["clips"]))
    lora_dir = out.files("lora")
    fold = lora is not None and cfg.reference_policy == "previous_round"
    job = TrainJob(policy_cfg, lora, data, train_cfg, real_frames, real_prompts, lora_dir, fold, winners)
    if cfg.backend == "local" or (cfg.backend == "auto" and cfg.workers == 1 and ray_address is None):
        info = train_and_save(job, on_step=on_step)
    else:
        info = train_on_ray(job, cfg, out, ray_address)
        for record in info["history"] if on_step is not None else ():
            on_step(record)
    curves = training_curves_png(info["history"], out.files("figures") / "training_curves.png", cfg.train.method)
    final = {k: float(v) for k, v in info["final"].items() if isinstance(v, (int, float)) and v is not None}
    metrics = {**{f"final_{k}": v for k, v in final.items()}, "seconds_per_step": float(info["seconds_per_step"]),
               "compute_s": float(info["seconds"])}
    if real_phase is not None:
        metrics.update(real_clip_seconds=float(real_phase["seconds"]), real_clip_final_loss=float(real_phase["final_loss"]),
                       compute_s=metrics["compute_s"] + float(real_phase["seconds"]))
    # the policy the DPO reference was (logged in the checkpoint row and the counts)
    reference = policy_id if fold else base["checkpoint_id"]
    rows = [
        dict(base),
        {
            "checkpoint_id": f"lora-r{round:02d}", "kind": "policy_lora", "format": "peft",
            "path": layout.stored_path(lora_dir), "base_id": policy_id, "round": round,
            "metrics_json": json.dumps({"method": cfg.train.method, **metrics, "reference": reference,
                                        "stopped_on_nonfinite": info["stopped_on_nonfinite"]}, sort_keys=True),
        },
    ]
    ref = write_manifest(rows, "checkpoints", out.manifest_path, layout, lineage)
    counts.update(steps_done=int(info["steps_done"]), real_videos=int(info["real_videos"]),
                  reference_moved=int(fold or real_phase is not None))
    if info["stopped_on_nonfinite"]:
        counts["stopped_on_nonfinite"] = 1
    return StageResult(ref, counts=counts, metrics=metrics, images={"loss and implicit accuracy": str(curves)})


def training_curves_png(history: Sequence[Mapping[str, Any]], path: Path, method: str) -> Path:
    """Loss and implicit accuracy per step (a 10-step moving average over the raw points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_contracts.lineage import atomic_write_bytes

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    for ax, key in zip(axes, ("loss", "implicit_accuracy"), strict=True):
        values = np.array([np.nan if h.get(key) is None else h[key] for h in history], dtype=float)
        ax.plot(steps, values, color="0.75", linewidth=0.8)
        if len(values) >= 10 and np.isfinite(values).any():
            smooth = np.convolve(np.nan_to_num(values), np.ones(10) / 10, mode="valid")
            ax.plot(steps[9:], smooth, color="C0")
        ax.set_title(f"{method}: {key.replace('_', ' ')}")
        ax.set_xlabel("step")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
