"""`iterative_alignment`: the whole DAG as one Prefect flow whose stages are subflows.

    ingest ──► [bootstrap] ──► select ──► round k: generate ──► label ──► train_reward ──► finetune ──► evaluate

Stages built so far are wired here: ingest → bootstrap → select → per round generate → label →
train_reward → finetune (evaluate and the gate are not built yet); each is its own flow in
flows/stages.py. `bootstrap` runs for the embedded world only. Round k+1 samples with round k's LoRA.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.config import RunConfig
from flows.stages import (
    bootstrap_flow,
    finetune_flow,
    generate_flow,
    ingest_flow,
    label_flow,
    select_flow,
    train_reward_flow,
)


@flow(name="iterative_alignment", flow_run_name="{run}")
def iterative_alignment(run: str, runs_root: str, config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = RunConfig.model_validate(config)
    outputs: dict[str, Any] = {"videos": ingest_flow(run, runs_root, config, force=force)}
    if cfg.ingest.is_synthetic:
        outputs["checkpoints"] = bootstrap_flow(run, runs_root, config, force=force)
    outputs["selection"] = select_flow(run, runs_root, config, force=force)
    for k in range(1, cfg.run.rounds + 1):
        outputs[f"round-{k:02d}/generations"] = generate_flow(run, runs_root, config, round=k, force=force)
        outputs[f"round-{k:02d}/labels"] = label_flow(run, runs_root, config, round=k, force=force)
        outputs[f"round-{k:02d}/reward_model"] = train_reward_flow(run, runs_root, config, round=k, force=force)
        outputs[f"round-{k:02d}/policy"] = finetune_flow(run, runs_root, config, round=k, force=force)
    for name, ref in outputs.items():
        logger.info("run %s: %s manifest %s", run, name, ref["path"])
    return outputs
