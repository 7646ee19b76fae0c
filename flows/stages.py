"""Each stage as its own Prefect flow: a flow run per stage in the UI, deployable and rerunnable.

A stage flow runs one Prefect task whose cache key is the data contract's cache key (input
manifest hashes + config hash), so Prefect shows a stage that is up to date as `Cached`. The
files stay the source of truth: when the stage's marker and manifest are not on disk the task
refreshes its cache and runs, so deleting a stage folder reruns it even if Prefect remembers it.
Tasks take and return manifest references (paths and hashes), never data.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from pydantic import ValidationError

from data_contracts import ContractError, ManifestRef, RunLayout, StageDir, completed_ref
from data_contracts.staleness import clear_stale, mark_downstream_stale
from flows.config import RunConfig
from tasks import bootstrap, evaluate, finetune, generate, ingest, label, select, train_reward
from tasks.common import StageConfig, execute_stage, stage_lineage


def _contract_key(context: Any, parameters: Mapping[str, Any]) -> str:
    return f"prefloop-{parameters['stage_label'].replace('/', '-')}-{parameters['cache_key']}"


def artifact_key(run: str, label: str) -> str:
    """A Prefect artifact key for `label` of `run` (keys allow lower-case letters, digits and dashes)."""
    return f"{run}-{label}".lower().replace("/", "-").replace("_", "-").replace(".", "-")


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Bad input fails the same way every time: retry crashes and transient errors only."""
    return not isinstance(state.data, (ContractError, ValidationError))


@task(cache_key_fn=_contract_key, persist_result=True, retry_condition_fn=_worth_retrying)
def stage_task(
    stage_label: str,
    cache_key: str,
    run_fn: Callable,
    layout: RunLayout,
    out: StageDir,
    cfg: StageConfig,
    inputs: Mapping[str, ManifestRef],
    force: bool,
) -> dict[str, Any]:
    outcome = execute_stage(run_fn, layout, out, cfg, inputs, force=force)
    return {
        "manifest": outcome.manifest.__dict__,
        "cache_key": outcome.cache_key,
        "skipped": outcome.skipped,
        "counts": dict(outcome.counts),
        "metrics": dict(outcome.metrics),
        "seconds": outcome.seconds,
        "images": dict(outcome.images),
    }


class StageFailed(RuntimeError):
    """A stage that failed for good (after its retries), named with its run; the cause is chained."""


def run_stage(
    run_fn: Callable,
    cfg: StageConfig,
    layout: RunLayout,
    out: StageDir,
    inputs: Mapping[str, ManifestRef],
    retries: int,
    force: bool = False,
) -> ManifestRef:
    """Run (or skip) one stage through its Prefect task, then publish its counts."""
    logger = get_run_logger()
    key = stage_lineage(out.stage, inputs, cfg).cache_key
    on_disk = None if force else completed_ref(out, key)
    try:
        result = stage_task.with_options(
            name=out.label, retries=retries, retry_delay_seconds=2, refresh_cache=on_disk is None
        )(out.label, key, run_fn, layout, out, cfg, inputs, force)
    except Exception as err:
        # The flow run's message (and the CLI's last line) then says which stage stopped the run.
        raise StageFailed(f"stage `{out.label}` of run `{layout.run}` failed: {type(err).__name__}: {err}") from err
    ref = ManifestRef(**result["manifest"])
    ran = on_disk is None and not result["skipped"]
    state = f"ran in {result['seconds']:.1f}s" if ran else "up to date (skipped)"
    logger.info("%s %s; cache key %s; manifest %s", out.label, state, key, ref.path)
    # Ran again or proved up to date: no longer stale. What follows was computed from the old output.
    clear_stale(out)
    if ran:
        marked = mark_downstream_stale(layout, out, key)
        if marked:
            logger.info("%s recomputed: marked stale %s", out.label, ", ".join(d.label for d in marked))
    table = [{"count": k, "value": v} for k, v in result["counts"].items()]
    table += [{"count": k, "value": round(v, 4)} for k, v in result["metrics"].items()]
    key_prefix = artifact_key(layout.run, out.label)
    create_table_artifact(
        key=key_prefix,
        table=table,
        description=f"**{out.label}** of run `{layout.run}`: {state}; cache key `{key}`; manifest `{ref.path}`",
    )
    # Prefect's image artifacts take URLs, not files: small PNGs go inline in markdown.
    for i, (title, path) in enumerate(result.get("images", {}).items()):
        if Path(path).exists():
            data = base64.b64encode(Path(path).read_bytes()).decode()
            create_markdown_artifact(
                key=f"{key_prefix}-image-{i}",
                markdown=f"### {out.label}: {title}\n\n![{title}](data:image/png;base64,{data})\n\n`{path}`",
                description=f"{out.label} of run `{layout.run}`: {title}",
            )
    return ref


def _layout(run: str, runs_root: str, config: Mapping[str, Any]) -> tuple[RunConfig, RunLayout]:
    cfg = RunConfig.model_validate(config)
    return cfg, cfg.layout(Path(runs_root), run)


@flow(name="ingest", flow_run_name="{run}/ingest")
def ingest_flow(run: str, runs_root: str, config: dict[str, Any], force: bool = False) -> dict[str, str]:
    """Videos in (synthetic world, folder or listing) → `videos` manifest."""
    cfg, layout = _layout(run, runs_root, config)
    ref = run_stage(ingest.run, cfg.ingest, layout, layout.stage("ingest"), {}, cfg.run.task_retries, force)
    return ref.__dict__


def _upstream(
    layout: RunLayout, stage: str, run: str, runs_root: str, config: dict[str, Any], round: int | None = None
) -> ManifestRef:
    """The output of an earlier stage of this run; a stage that never completed runs first (as a
    subflow), so `prefloop stage select --run demo` works right after `ingest`."""
    from data_contracts import manifest_ref, read_marker

    stage_dir = layout.stage(stage, round)
    marker = read_marker(stage_dir)
    if not marker or marker.get("status") != "complete" or not stage_dir.manifest_path.exists():
        get_run_logger().info("run %s has no complete `%s` stage: running it first", layout.run, stage_dir.label)
        STAGE_FLOWS[stage](run, runs_root, config, **({} if round is None else {"round": round}))
        marker = read_marker(stage_dir) or {}
    return manifest_ref(stage_dir.manifest_path, marker["manifest"]["kind"])


@flow(name="bootstrap", flow_run_name="{run}/bootstrap")
def bootstrap_flow(run: str, runs_root: str, config: dict[str, Any], force: bool = False) -> dict[str, str]:
    """Embedded world only: train the tiny open_clip model on the unselected clips → `checkpoints`."""
    cfg, layout = _layout(run, runs_root, config)
    inputs = {"videos": _upstream(layout, "ingest", run, runs_root, config)}
    ref = run_stage(bootstrap.run, cfg.bootstrap, layout, layout.stage("bootstrap"), inputs, cfg.run.task_retries, force)
    return ref.__dict__


@flow(name="select", flow_run_name="{run}/select")
def select_flow(run: str, runs_root: str, config: dict[str, Any], force: bool = False) -> dict[str, str]:
    """`videos` (+ the world's CLIP checkpoint) → `selection`: scores, reasons, the good clips."""
    cfg, layout = _layout(run, runs_root, config)
    inputs = {"videos": _upstream(layout, "ingest", run, runs_root, config)}
    if cfg.select.text.model == "world":
        inputs["checkpoints"] = _upstream(layout, "bootstrap", run, runs_root, config)
    run_fn = functools.partial(select.run, ray_address=cfg.run.ray_address)
    ref = run_stage(run_fn, cfg.select, layout, layout.stage("select"), inputs, cfg.run.task_retries, force)
    return ref.__dict__


def progress_reporter(layout: RunLayout, out: StageDir, unit: str = "shards") -> Callable[[int, int], None]:
    """A callback that keeps one Prefect progress artifact of the stage up to date."""
    state: dict[str, Any] = {}

    def report(done: int, total: int) -> None:
        value = 100.0 * done / max(total, 1)
        text = f"{out.label} of run `{layout.run}`: {done}/{total} {unit}"
        if "id" not in state:
            key = artifact_key(layout.run, f"{out.label}-progress")
            state["id"] = create_progress_artifact(progress=value, key=key, description=text)
        else:
            update_progress_artifact(state["id"], progress=value, description=text)

    return report


def _policy_checkpoints(layout: RunLayout, round: int, run: str, runs_root: str, config: dict[str, Any]) -> ManifestRef:
    """The policy a round starts from: bootstrap's base in round 1, the previous round's finetune after."""
    if round == 1:
        return _upstream(layout, "bootstrap", run, runs_root, config)
    return _upstream(layout, "finetune", run, runs_root, config, round - 1)


@flow(name="generate", flow_run_name="{run}/round-{round}/generate")
def generate_flow(run: str, runs_root: str, config: dict[str, Any], round: int = 1, force: bool = False) -> dict[str, str]:
    """The round's policy samples K videos per prompt → `generations` (mp4s + latents)."""
    cfg, layout = _layout(run, runs_root, config)
    inputs = {"videos": _upstream(layout, "ingest", run, runs_root, config)}
    if cfg.generate.policy is None:
        inputs["checkpoints"] = _policy_checkpoints(layout, round, run, runs_root, config)
    if cfg.generate.first_frame == "selection":
        inputs["selection"] = _upstream(layout, "select", run, runs_root, config)
    out = layout.stage("generate", round)
    run_fn = functools.partial(
        generate.run, round=round, ray_address=cfg.run.ray_address, progress=progress_reporter(layout, out)
    )
    ref = run_stage(run_fn, cfg.generate, layout, out, inputs, cfg.run.task_retries, force)
    return ref.__dict__


@flow(name="label", flow_run_name="{run}/round-{round}/label")
def label_flow(run: str, runs_root: str, config: dict[str, Any], round: int = 1, force: bool = False) -> dict[str, str]:
    """The critic scores the round's generations and labels best-vs-worst pairs → `labels`."""
    cfg, layout = _layout(run, runs_root, config)
    inputs = {"generations": _upstream(layout, "generate", run, runs_root, config, round)}
    if cfg.label.critic == "reward_model" and cfg.label.reward_model is None:
        # the reward model of an earlier round: this round's is trained on these very labels
        reward_round = cfg.reward_round(round, for_label=True)
        if reward_round is None:
            raise ValueError(
                f"label.critic=reward_model in round {round}: no earlier round trained a reward model "
                f"(run.train_reward={cfg.run.train_reward}); set label.reward_model to a reward model folder"
            )
        inputs["checkpoints"] = _upstream(layout, "train_reward", run, runs_root, config, reward_round)
    out = layout.stage("label", round)
    run_fn = functools.partial(label.run, round=round, ray_address=cfg.run.ray_address, progress=progress_reporter(layout, out, "batches"))
    ref = run_stage(run_fn, cfg.label, layout, out, inputs, cfg.run.task_retries, force)
    return ref.__dict__


@flow(name="train_reward", flow_run_name="{run}/round-{round}/train_reward")
def train_reward_flow(run: str, runs_root: str, config: dict[str, Any], round: int = 1, force: bool = False) -> dict[str, str]:
    """Bradley-Terry-with-ties reward model on the round's labels → `checkpoints` (reward_model)."""
    cfg, layout = _layout(run, runs_root, config)
    inputs = {"labels": _upstream(layout, "label", run, runs_root, config, round)}
    if cfg.train_reward.init_clip == "world":
        inputs["checkpoints"] = _upstream(layout, "bootstrap", run, runs_root, config)
    run_fn = functools.partial(train_reward.run, round=round)
    ref = run_stage(run_fn, cfg.train_reward, layout, layout.stage("train_reward", round), inputs, cfg.run.task_retries, force)
    return ref.__dict__


def step_logger(label: str, every: int = 25) -> Callable[[dict], None]:
    """Log a training step's record to the flow run every `every` steps (and the first)."""
    logger = get_run_logger()

    def log(record: dict) -> None:
        if record["step"] % every == 0:
            shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items() if v is not None}
            logger.info("%s step %s", label, shown)

    return log


@flow(name="finetune", flow_run_name="{run}/round-{round}/finetune")
def finetune_flow(run: str, runs_root: str, config: dict[str, Any], round: int = 1, force: bool = False) -> dict[str, str]:
    """LoRA preference fine-tuning (Flow-DPO by default) on the round's pairs → `checkpoints` (policy + LoRA)."""
    cfg, layout = _layout(run, runs_root, config)
    inputs = {
        "labels": _upstream(layout, "label", run, runs_root, config, round),
        "generations": _upstream(layout, "generate", run, runs_root, config, round),
        "checkpoints": _policy_checkpoints(layout, round, run, runs_root, config),
    }
    if cfg.finetune.reads_selection:
        inputs["selection"] = _upstream(layout, "select", run, runs_root, config)
    out = layout.stage("finetune", round)
    run_fn = functools.partial(
        finetune.run, round=round, on_step=step_logger(out.label), ray_address=cfg.run.ray_address
    )
    ref = run_stage(run_fn, cfg.finetune, layout, out, inputs, cfg.run.task_retries, force)
    return ref.__dict__


@flow(name="evaluate", flow_run_name="{run}/round-{round}/evaluate")
def evaluate_flow(run: str, runs_root: str, config: dict[str, Any], round: int = 1, force: bool = False) -> dict[str, str]:
    """Held-out prompts: the round's policy vs. the base and the previous round, same seeds → `evaluation`."""
    cfg, layout = _layout(run, runs_root, config)
    inputs = {
        "videos": _upstream(layout, "ingest", run, runs_root, config),
        "policy": _upstream(layout, "finetune", run, runs_root, config, round),
        "baseline": _policy_checkpoints(layout, 1, run, runs_root, config),
    }
    if round > 1:
        inputs["previous"] = _upstream(layout, "finetune", run, runs_root, config, round - 1)
        inputs["previous_evaluation"] = _upstream(layout, "evaluate", run, runs_root, config, round - 1)
    if cfg.evaluate.win_rates:
        inputs["reward_model"] = _upstream(layout, "train_reward", run, runs_root, config, cfg.reward_round(round))
    out = layout.stage("evaluate", round)
    run_fn = functools.partial(evaluate.run, round=round, progress=progress_reporter(layout, out, "batches"))
    ref = run_stage(run_fn, cfg.evaluate, layout, out, inputs, cfg.run.task_retries, force)
    return ref.__dict__


STAGE_FLOWS = {
    "ingest": ingest_flow,
    "bootstrap": bootstrap_flow,
    "select": select_flow,
    "generate": generate_flow,
    "label": label_flow,
    "train_reward": train_reward_flow,
    "finetune": finetune_flow,
    "evaluate": evaluate_flow,
}
