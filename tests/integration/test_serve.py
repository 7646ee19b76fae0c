"""Integration tier: `prefloop serve` runs a scheduled deployment's runs (no worker, no pool).

An `ingest` deployment on a 5-second interval, served by `prefloop serve --pool` in a subprocess
against this session's Prefect server: the scheduler creates runs, the runner executes them one at
a time (the pool's limit), the stage writes its manifest, and stopping the server pauses the schedule.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from data_contracts import RunLayout, read_marker
from tests.test_cli import REPO

pytestmark = pytest.mark.integration


def test_served_deployment_runs_on_its_schedule(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = tmp_path / "runs"
    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump({
        "work_pools": {"serve-cpu": {"concurrency_limit": 1}},
        "defaults": {"runs_root": str(runs)},
        "deployments": [{"name": "every-5s", "flows": ["ingest"], "work_pool": "serve-cpu", "interval_seconds": 5,
                         "parameters": {"run": "served", "config": {"ingest": {"world": {"num_clips": 12}}}}}],
    }))
    cmd = [sys.executable, "-m", "flows.cli", "--runs-root", str(runs), "serve", "--file", str(path), "--pool", "serve-cpu"]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, done = time.monotonic() + 150, []
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline and not done:
                time.sleep(2)
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    deployment = client.read_deployment_by_name("ingest/every-5s")
                except Exception:
                    continue  # not registered yet
                done = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
                )
        assert done, f"no served run completed in 150 s\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        assert done[0].parameters["run"] == "served" and done[0].auto_scheduled
        layout = RunLayout(runs, "served")
        assert read_marker(layout.stage("ingest"))["counts"]["videos"] == 12
    finally:
        server.send_signal(signal.SIGINT)  # the runner pauses the schedules it served as it stops
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("ingest/every-5s").paused
