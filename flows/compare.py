"""`compare`: several fine-tuning methods trained on the same round's pairs, evaluated side by side.

For each method: `finetune` with only `finetune.train.method` changed (same pairs, same steps, same
seed), then `evaluate` on the same held-out (prompt, seed) pairs against the same base policy.
Each variant is written beside the round's own stages, under `round-NN/compare/<method>/`, with
its own cache key, so a rerun skips finished methods. The result is a table (a Prefect table
artifact and `round-NN/compare/compare.md`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from data_contracts import read_marker
from data_contracts.lineage import atomic_write_bytes
from flows.stages import _layout, _policy_checkpoints, _upstream, run_stage, step_logger
from tasks import evaluate, finetune
from tasks.finetune import PAIRWISE_METHODS

COLUMNS = (
    ("plausibility_round", "plausibility"),
    ("plausibility_round_ci_low", "ci low"),
    ("plausibility_round_ci_high", "ci high"),
    ("caption_agreement_round", "caption agreement"),
)


@flow(name="compare", flow_run_name="{run}/round-{round}/compare")
def compare_flow(
    run: str, runs_root: str, config: dict[str, Any], round: int = 1, methods: Sequence[str] = ("flow_dpo", "sft", "rwr"),
    force: bool = False,
) -> list[dict[str, Any]]:
    cfg, layout = _layout(run, runs_root, config)
    logger = get_run_logger()
    inputs = {
        "labels": _upstream(layout, "label", run, runs_root, config, round),
        "generations": _upstream(layout, "generate", run, runs_root, config, round),
        "checkpoints": _policy_checkpoints(layout, round, run, runs_root, config),
    }
    if cfg.finetune.reads_selection:
        inputs["selection"] = _upstream(layout, "select", run, runs_root, config)
    videos = _upstream(layout, "ingest", run, runs_root, config)
    baseline = _policy_checkpoints(layout, 1, run, runs_root, config)
    eval_cfg = cfg.evaluate.model_copy(update={"win_rates": False})
    rows: list[dict[str, Any]] = []
    for method in methods:
        # 1. the same pairs, only the method changes
        train = cfg.finetune.train.model_copy(update={"method": method})
        # real winners are pairs: the pointwise methods (sft, rwr, kto) train without them
        ft_cfg = cfg.finetune.model_copy(update={"train": type(train).model_validate(train.model_dump()),
                                                 "real_winners": cfg.finetune.real_winners and method in PAIRWISE_METHODS})
        ft_out = layout.variant("finetune", round, method)
        ft_fn = functools.partial(
            finetune.run, round=round, on_step=step_logger(ft_out.label), ray_address=cfg.run.ray_address
        )
        policy = run_stage(ft_fn, ft_cfg, layout, ft_out, inputs, cfg.run.task_retries, force)
        # 2. the same held-out pairs against the same base
        ev_out = layout.variant("evaluate", round, method)
        run_stage(
            functools.partial(evaluate.run, round=round), eval_cfg, layout, ev_out,
            {"videos": videos, "policy": policy, "baseline": baseline}, cfg.run.task_retries, force,
        )
        metrics = (read_marker(ev_out) or {}).get("metrics", {})
        if not rows:
            rows.append({"policy": "base", **_row(metrics, "base")})
        rows.append({"policy": method, **_row(metrics, "round")})
    _publish(layout, round, rows, cfg.finetune.train.steps)
    logger.info("compare %s round %d: %s", run, round, rows)
    return rows


def _row(metrics: dict[str, float], role: str) -> dict[str, float | None]:
    out = {}
    for key, name in COLUMNS:
        value = metrics.get(key.replace("_round", f"_{role}"))
        out[name] = None if value is None else round(float(value), 4)
    return out


def _publish(layout, round_: int, rows: list[dict[str, Any]], steps: int) -> None:
    header = "| policy | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = ["—" if r[name] is None else f"{100 * r[name]:.1f}%" for _, name in COLUMNS]
        lines.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
    text = f"Round {round_} of run `{layout.run}`: same pairs, {steps} steps each, same held-out pairs.\n\n" + "\n".join(lines) + "\n"
    path = layout.stage("finetune", round_).path.parent / "compare" / "compare.md"
    atomic_write_bytes(path, text.encode())
    create_table_artifact(
        key=f"{layout.run}-round-{round_:02d}-compare".lower().replace("_", "-").replace(".", "-"),
        table=rows,
        description=f"fine-tuning methods compared on round {round_} of `{layout.run}` (`{path}`)",
    )
    print(text)
