"""Prefect tasks that fail: a transient failure is retried and the stage completes; a permanent
one stops the run with the stage and the reason, and the stages before it stay complete (and are
reused, not recomputed, when the run is started again). Two runs on one run directory: the second
is refused by the run lock."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from prefect import flow

from data_contracts import RunLayout, read_manifest
from flows.config import resolve_config
from flows.stages import run_stage
from tasks import ingest
from tests.test_cli import REPO, TINY, prefloop

pytestmark = pytest.mark.faults


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(go())


def test_a_transient_failure_is_retried_and_the_stage_completes(tmp_path, prefect_server):
    cfg = resolve_config(overrides=["ingest.world.num_clips=12"])
    layout = cfg.layout(tmp_path / "runs", "flaky")
    outage = tmp_path / "storage-outage"
    outage.write_text("the first attempt finds the storage unreachable")

    def ingest_behind_flaky_storage(inputs, stage_cfg, layout, out, lineage):
        if outage.exists():
            outage.unlink()  # the outage is over by the retry
            raise ConnectionError("storage unreachable (transient)")
        return ingest.run(inputs, stage_cfg, layout, out, lineage)

    @flow(name="flaky-ingest")
    def flaky():
        return run_stage(ingest_behind_flaky_storage, cfg.ingest, layout, layout.stage("ingest"), {}, retries=1).path

    state = flaky(return_state=True)
    assert state.is_completed()
    path = state.result()
    assert len(read_manifest(path, "videos", layout)) == 12
    (task,) = _task_runs(state.state_details.flow_run_id)
    assert task.name.startswith("ingest") and task.run_count == 2 and task.state.is_completed()


def test_a_permanent_failure_stops_the_run_naming_stage_and_reason_and_keeps_earlier_stages(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    missing = tmp_path / "no-such-reward-model"
    bad = ("--set", "label.critic=reward_model", "--set", f"label.reward_model={missing}")
    out = prefloop("run", "--run", "perm", *TINY, *bad, runs_root=runs, check=False)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "stage `round-01/label` of run `perm` failed: FileNotFoundError" in last and "is not a folder" in last and str(missing) in last, last
    assert "Retry 1/1" in out.stdout + out.stderr, "retried once (run.task_retries), then given up"
    layout = RunLayout(runs, "perm")
    finished = {}
    for stage, rnd in (("ingest", None), ("bootstrap", None), ("select", None), ("generate", 1)):
        marker = json.loads(layout.stage(stage, rnd).marker_path.read_text())
        assert marker["status"] == "complete", stage
        finished[stage] = marker["finished_at"]
    label_dir = layout.stage("label", 1)
    assert not label_dir.manifest_path.exists() and not label_dir.marker_path.exists()
    assert not layout.stage("train_reward", 1).path.exists(), "nothing after the failed stage ran"
    # fixed and started again: the finished stages are reused as they are
    again = prefloop("stage", "label", "--run", "perm", "--round", "1", "--set", "label.critic=annotators",
                     runs_root=runs)
    assert again.returncode == 0
    for stage, at in finished.items():
        rnd = 1 if stage == "generate" else None
        assert json.loads(layout.stage(stage, rnd).marker_path.read_text())["finished_at"] == at, stage
    assert json.loads(label_dir.marker_path.read_text())["status"] == "complete"


def test_a_second_run_on_the_same_run_directory_is_refused(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    layout = RunLayout(runs, "same")
    cmd = [sys.executable, "-m", "flows.cli", "--runs-root", str(runs)]
    first = subprocess.Popen([*cmd, "stage", "ingest", "--run", "same", "--set", "ingest.world.num_clips=1500"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if layout.lock_path.exists() and layout.lock_path.read_text().strip() == f"pid {first.pid}":
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run holds the lock while it works"
        config_before = layout.config_path.read_bytes() if layout.config_path.exists() else None
        second = subprocess.run([*cmd, "run", "--run", "same", "--set", "ingest.world.num_clips=7"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the second was refused while the first still ran"
        assert second.returncode == 1
        assert f"run `same` is in use by another prefloop process (pid {first.pid})" in second.stderr
        assert "use another --run name" in second.stderr
        if config_before is not None:
            assert layout.config_path.read_bytes() == config_before, "the refused run changed nothing"
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-2000:]
    assert len(read_manifest(layout.stage("ingest").manifest_path, "videos", layout)) == 1500
    # the lock goes with its process: the next command on the run proceeds
    after = subprocess.run([*cmd, "stage", "ingest", "--run", "same"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]
