"""`iterative_alignment`: the whole DAG as one Prefect flow whose stages are subflows.

    ingest ──► [bootstrap] ──► select ──► round k: generate ──► label ──► train_reward ──► finetune ──► evaluate

Only the stages that exist so far are wired here; each is its own flow in flows/stages.py.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.stages import ingest_flow


@flow(name="iterative_alignment", flow_run_name="{run}")
def iterative_alignment(run: str, runs_root: str, config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    videos = ingest_flow(run, runs_root, config, force=force)
    logger.info("run %s: videos manifest %s", run, videos["path"])
    return {"videos": videos}
