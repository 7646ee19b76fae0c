"""`iterative_alignment`: the whole DAG as one Prefect flow whose stages are subflows.

    ingest ──► [bootstrap] ──► select ──► round k: generate ──► label ──► train_reward ──► finetune ──► evaluate

Each stage is its own flow in flows/stages.py. `bootstrap` runs for the embedded world only.
Round k+1 samples with round k's LoRA. After each round's `evaluate`, the gate keeps the round's
policy only if its held-out judge plausibility beats the previous one by `evaluate.gate_margin`;
otherwise the loop stops there and says why (the run still completes; `run.gate=false` goes on).
After each round's gate, the round's report (flows/report.py) is written and published.
The stages share one Ray cluster (`infra.ray_cluster.ray_kept`), started by the first stage
that needs it and stopped when the flow ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from data_contracts import read_marker
from flows.config import RunConfig
from flows.report import report_task
from flows.stages import (
    bootstrap_flow,
    evaluate_flow,
    finetune_flow,
    generate_flow,
    ingest_flow,
    label_flow,
    select_flow,
    train_reward_flow,
)
from infra.ray_cluster import ray_kept
from tasks.evaluate import gate


@flow(name="iterative_alignment", flow_run_name="{run}")
def iterative_alignment(run: str, runs_root: str, config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = RunConfig.model_validate(config)
    # one Ray for all the stages of this run (started by the first that needs it)
    with ray_kept():
        outputs: dict[str, Any] = {"videos": ingest_flow(run, runs_root, config, force=force)}
        if cfg.ingest.is_synthetic:
            outputs["checkpoints"] = bootstrap_flow(run, runs_root, config, force=force)
        outputs["selection"] = select_flow(run, runs_root, config, force=force)
        layout = cfg.layout(Path(runs_root), run)
        previous = None
        for k in range(1, cfg.run.rounds + 1):
            outputs[f"round-{k:02d}/generations"] = generate_flow(run, runs_root, config, round=k, force=force)
            outputs[f"round-{k:02d}/labels"] = label_flow(run, runs_root, config, round=k, force=force)
            if cfg.reward_round(k) == k:  # run.train_reward: every round, the first only, or never
                outputs[f"round-{k:02d}/reward_model"] = train_reward_flow(run, runs_root, config, round=k, force=force)
            outputs[f"round-{k:02d}/policy"] = finetune_flow(run, runs_root, config, round=k, force=force)
            outputs[f"round-{k:02d}/evaluation"] = evaluate_flow(run, runs_root, config, round=k, force=force)
            current = (read_marker(layout.stage("evaluate", k)) or {}).get("metrics", {})
            keep, reason = gate(current, previous, cfg.evaluate.gate_margin)
            logger.info("run %s round %d gate: %s", run, k, reason)
            outputs[f"round-{k:02d}/gate"] = reason
            outputs[f"round-{k:02d}/report"] = report_task(layout, k)
            if not keep and cfg.run.gate:
                break
            previous = current
    for name, ref in outputs.items():
        logger.info("run %s: %s %s", run, name, ref["path"] if isinstance(ref, dict) else ref)
    return outputs
