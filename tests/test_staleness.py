"""Stale marks and lineage: a recomputed stage marks what follows it; the next run clears them.

The stages here are real `execute_stage` runs of a small stand-in stage that writes a
`checkpoints` manifest whose content depends on its config and its input, so a changed config
changes its output hash exactly as a real stage's would.
"""

from __future__ import annotations

import json

from data_contracts import RunLayout, read_manifest, write_manifest
from data_contracts.staleness import (
    changed_inputs,
    clear_stale,
    downstream,
    mark_downstream_stale,
    read_stale,
    run_stages,
    stage_status,
)
from tasks.common import StageConfig, StageResult, execute_stage


class StandInConfig(StageConfig):
    value: int = 0


def stand_in(inputs, cfg, layout, out, lineage):
    upstream = ""
    if "prev" in inputs:
        upstream = read_manifest(inputs["prev"].path, "checkpoints", layout).rows()[0]["metrics_json"]
    weights = out.files("weights")
    weights.mkdir(parents=True, exist_ok=True)
    (weights / "w.safetensors").write_bytes(b"w")
    row = {
        "checkpoint_id": out.label, "kind": "policy", "format": "safetensors",
        "path": layout.stored_path(weights / "w.safetensors"),
        "metrics_json": json.dumps({"value": cfg.value, "upstream": upstream}),
    }
    return StageResult(write_manifest([row], "checkpoints", out.manifest_path, layout, lineage))


# ingest → select → round 1: generate → label → round 2: generate (each reads the one before)
CHAIN = [("ingest", None), ("select", None), ("generate", 1), ("label", 1), ("generate", 2)]


def run_chain(layout: RunLayout, values: dict[str, int] | None = None) -> dict[str, bool]:
    """Run every stage of CHAIN in order, as a whole run does; returns label -> recomputed."""
    ran, prev = {}, None
    for stage, rnd in CHAIN:
        out = layout.stage(stage, rnd)
        cfg = StandInConfig(value=(values or {}).get(out.label, 0))
        outcome = execute_stage(stand_in, layout, out, cfg, {} if prev is None else {"prev": prev})
        clear_stale(out)
        if not outcome.skipped:
            mark_downstream_stale(layout, out, outcome.cache_key)
        ran[out.label], prev = not outcome.skipped, outcome.manifest
    return ran


def test_rerun_of_one_stage_marks_what_follows_and_the_next_run_clears_it(tmp_path):
    layout = RunLayout(tmp_path, "r")
    assert all(run_chain(layout).values())
    assert [d.label for d in run_stages(layout)] == ["ingest", "select", "round-01/generate", "round-01/label", "round-02/generate"]
    assert all(stage_status(d) == ("complete", "") for d in run_stages(layout))
    before = {d.label: d.marker_path.stat().st_mtime_ns for d in run_stages(layout)}

    # 1. `prefloop stage generate --round 1` with a changed config: it alone reruns
    gen1 = layout.stage("generate", 1)
    inputs = {"prev": read_marker_ref(layout, "select")}
    outcome = execute_stage(stand_in, layout, gen1, StandInConfig(value=7), inputs)
    assert not outcome.skipped
    marked = mark_downstream_stale(layout, gen1, outcome.cache_key)
    assert [d.label for d in marked] == ["round-01/label", "round-02/generate"]
    assert read_stale(layout.stage("ingest")) is None and read_stale(layout.stage("select")) is None
    assert read_stale(layout.stage("label", 1))["cause"] == "round-01/generate"

    # 2. status is honest: label's input changed; round 2 reads label, which has not changed yet
    status, why = stage_status(layout.stage("label", 1))
    assert status == "stale" and "inputs changed since it ran: prev" in why and "round-01/generate" in why
    assert changed_inputs(layout.stage("generate", 2)) == []
    status, why = stage_status(layout.stage("generate", 2))
    assert status == "stale" and "inputs are unchanged so far" in why
    # a stage that reads a marked stage keeps its own mark even when found up to date
    assert clear_stale(layout.stage("generate", 2)) is False and read_stale(layout.stage("generate", 2))

    # 3. the next whole run recomputes what follows, leaves earlier stages alone, clears the marks
    ran = run_chain(layout, {"round-01/generate": 7})
    assert ran == {"ingest": False, "select": False, "round-01/generate": False, "round-01/label": True, "round-02/generate": True}
    assert all(stage_status(d) == ("complete", "") for d in run_stages(layout))
    after = {d.label: d.marker_path.stat().st_mtime_ns for d in run_stages(layout)}
    assert after["ingest"] == before["ingest"] and after["select"] == before["select"]
    assert after["round-01/label"] != before["round-01/label"]


def test_a_rerun_that_gives_the_same_output_leaves_followers_up_to_date(tmp_path):
    layout = RunLayout(tmp_path, "same")
    run_chain(layout)
    sel = layout.stage("select")
    outcome = execute_stage(stand_in, layout, sel, StandInConfig(), {"prev": read_marker_ref(layout, "ingest")}, force=True)
    assert not outcome.skipped
    mark_downstream_stale(layout, sel, outcome.cache_key)
    # marked, but the output hash is the same: no input of any follower changed
    assert all(changed_inputs(d) == [] for d in downstream(layout, sel))
    assert stage_status(layout.stage("generate", 1))[0] == "stale"
    assert not any(run_chain(layout).values())  # nothing recomputed: the cache keys held
    assert all(read_stale(d) is None for d in run_stages(layout))


def test_a_missing_input_manifest_counts_as_changed(tmp_path):
    layout = RunLayout(tmp_path, "gone")
    run_chain(layout)
    layout.stage("select").manifest_path.unlink()
    assert changed_inputs(layout.stage("generate", 1)) == ["prev"]
    assert stage_status(layout.stage("generate", 1))[0] == "stale"
    assert stage_status(layout.stage("select")) == ("incomplete", "manifest.parquet is missing; the next run recomputes the stage")


def read_marker_ref(layout: RunLayout, stage: str, rnd: int | None = None):
    from data_contracts import manifest_ref

    return manifest_ref(layout.stage(stage, rnd).manifest_path, "checkpoints")


def test_only_stages_that_read_the_recomputed_one_are_marked(tmp_path):
    """Marks follow what each stage read, not the DAG order: round 1 here reads ingest, not select,
    so recomputing select leaves round 1 alone (as a round's finetune, which does not read
    train_reward, is left alone when train_reward runs after it)."""
    layout = RunLayout(tmp_path, "branch")
    ingest = execute_stage(stand_in, layout, layout.stage("ingest"), StandInConfig(), {}).manifest
    select = execute_stage(stand_in, layout, layout.stage("select"), StandInConfig(), {"prev": ingest}).manifest
    gen = execute_stage(stand_in, layout, layout.stage("generate", 1), StandInConfig(), {"prev": ingest}).manifest
    execute_stage(stand_in, layout, layout.stage("label", 1), StandInConfig(), {"prev": gen})
    execute_stage(stand_in, layout, layout.stage("generate", 2), StandInConfig(), {"prev": select})
    execute_stage(stand_in, layout, layout.stage("label", 2), StandInConfig(), {"prev": read_marker_ref(layout, "generate", 2)})

    sel = layout.stage("select")
    outcome = execute_stage(stand_in, layout, sel, StandInConfig(value=3), {"prev": ingest})
    marked = mark_downstream_stale(layout, sel, outcome.cache_key)
    # round 2's label reads select only through round 2's generate: marked as well
    assert [d.label for d in marked] == ["round-02/generate", "round-02/label"]
    assert stage_status(layout.stage("generate", 1)) == ("complete", "")
    assert stage_status(layout.stage("label", 1)) == ("complete", "")
