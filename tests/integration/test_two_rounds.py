"""Integration tier (`pytest -m integration`): the whole tiny DAG for two rounds through `prefloop`,
a real Prefect server this session starts (free port) and a local Ray per stage; then one stage
rerun with another config, and the run again.

Checked through the Prefect API: the parent flow run, one subflow run per stage and round named
`<run>/round-<k>/<stage>`, each stage's table artifact and each round's report artifact. Checked on
disk: after `prefloop stage`, only that stage was recomputed and every stage after it is marked
stale; the next `prefloop run` recomputes exactly the stages whose inputs changed, clears every
mark, and leaves the stages before the rerun one untouched.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from data_contracts import RunLayout
from data_contracts.staleness import changed_inputs, read_stale, run_stages
from tests.test_cli import TINY, prefloop

pytestmark = pytest.mark.integration

ROUND_STAGES = ("generate", "label", "train_reward", "finetune", "evaluate")
# a run name no other test uses: the Prefect server is one per pytest session, and the checks below
# find flow runs by name (the two-node fault test's run is called `two`)
RUN = "integration-two-rounds"
# run.gate=false: the tiny policy never improves, and the test is about the second round running
TWO_ROUNDS = (*TINY, "--set", "run.rounds=2", "--set", "run.gate=false", "--set", "run.train_reward=every_round")


def _api(call):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await call(client)

    return asyncio.run(go())


def _markers(layout: RunLayout) -> dict[str, dict]:
    return {d.label: json.loads(d.marker_path.read_text()) for d in run_stages(layout)}


def _latest_artifact(key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    found = _api(lambda c: c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))
    assert found, f"no artifact `{key}`"
    return found[0]


def test_two_rounds_then_one_stage_rerun(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    layout = RunLayout(runs, RUN)

    # 1. the whole DAG, two rounds
    out = prefloop("run", "--run", RUN, *TWO_ROUNDS, runs_root=runs)
    assert prefect_server.ui_url in out.stdout
    flow_runs = _api(lambda c: c.read_flow_runs())
    by_name = {r.name: r for r in flow_runs}
    parent = by_name[RUN]
    assert parent.state.is_completed()
    labels = ["ingest", "bootstrap", "select"] + [f"round-{k}/{s}" for k in (1, 2) for s in ROUND_STAGES]
    for label in labels:
        child = by_name[f"{RUN}/{label}"]
        assert child.state.is_completed(), label
        parent_task = _api(lambda c, child=child: c.read_task_run(child.parent_task_run_id))
        assert parent_task.flow_run_id == parent.id, f"{label} is not a subflow of the run's flow run"
    for k in (1, 2):
        for stage in ROUND_STAGES:
            table = _latest_artifact(f"{RUN}-round-0{k}-{stage.replace('_', '-')}")
            assert table.type == "table" and table.flow_run_id == by_name[f"{RUN}/round-{k}/{stage}"].id
        report = _latest_artifact(f"{RUN}-round-0{k}-report")
        assert report.type == "markdown" and report.flow_run_id == parent.id
        assert f"through round {k}" in report.data and "data:image/png;base64," in report.data
        assert (layout.round_report_dir(k) / "report.md").exists()
    first = _markers(layout)
    assert list(first) == [label.replace("round-1", "round-01").replace("round-2", "round-02") for label in labels]

    # 2. rerun round 1's generate with another config: it alone is recomputed, what follows is marked
    out = prefloop("stage", "generate", "--run", RUN, "--round", "1", "--set", "generate.steps=3", runs_root=runs)
    after_stage = _markers(layout)
    changed = [s for s in first if after_stage[s]["finished_at"] != first[s]["finished_at"]]
    assert changed == ["round-01/generate"]
    later = list(first)[list(first).index("round-01/generate") + 1:]
    assert [d.label for d in run_stages(layout) if read_stale(d)] == later
    assert len(re.findall(r"stale: round-01/generate was recomputed", out.stdout)) == len(later)
    # lineage says which of them the next run must recompute: label reads the new generations
    must_rerun = {d.label for d in run_stages(layout) if changed_inputs(d)}
    assert "round-01/label" in must_rerun and must_rerun <= set(later)
    listing = prefloop("runs", runs_root=runs).stdout
    assert "round-01/label" in listing and "inputs changed since it ran: generations" in listing

    # 3. the run again, with the config the run saved (generate.steps=3 now): recomputes what follows
    # as far as its inputs changed, and clears every mark
    prefloop("run", "--run", RUN, runs_root=runs)
    final = _markers(layout)
    recomputed = [s for s in final if final[s]["finished_at"] != after_stage[s]["finished_at"]]
    print(f"recomputed by the second run: {recomputed}; inputs had changed for: {sorted(must_rerun)}")
    assert must_rerun <= set(recomputed) <= set(later)
    for label in list(first)[: list(first).index("round-01/generate")]:  # before the rerun stage: untouched
        assert final[label] == first[label] and label not in recomputed
    assert not any(read_stale(d) for d in run_stages(layout))
    assert "stale" not in prefloop("runs", runs_root=runs).stdout
    for label in later:  # each stage table says whether it ran or was found up to date
        key = f"{RUN}-{label.replace('/', '-').replace('_', '-')}"
        verdict = "ran in" if label in recomputed else "up to date (skipped)"
        assert verdict in _latest_artifact(key).description, label
    assert sum(r.name == RUN for r in _api(lambda c: c.read_flow_runs())) == 2

    # 4. the whole report as one HTML file
    prefloop("report", "--run", RUN, runs_root=runs)
    page = layout.report_path.read_text()
    assert "round 2" in page and page.count('src="data:image/png;base64,') >= 4 and 'src="/' not in page
