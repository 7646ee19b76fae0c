"""Deployments from infra/deployments.yaml: the file is checked, and a scheduled deployment on a
process work pool gets flow runs from the real Prefect server's scheduler."""

from __future__ import annotations

import datetime
import time

import pytest
import yaml

from flows.cli import main
from infra.deployments import DEFAULT_FILE, FLOW_ENTRYPOINTS, DeploymentSpecError, load_spec, plan


def test_the_shipped_file_deploys_the_loop_nightly_and_every_stage():
    spec = load_spec(DEFAULT_FILE)
    planned = {p.full_name: p for p in plan(spec)}
    nightly = planned["iterative_alignment/nightly"]
    assert nightly.schedules[0].cron == "0 2 * * *" and nightly.work_pool == "prefloop-gpu"
    assert nightly.concurrency_limit.limit == 1 and nightly.parameters["config"] == {"run": {"rounds": 2}}
    assert nightly.parameters["runs_root"] == str(DEFAULT_FILE.parent.parent / "runs")
    stages = {name.split("/")[0] for name in planned if name.endswith("/rerun")}
    assert stages == set(FLOW_ENTRYPOINTS) - {"iterative_alignment"}
    assert spec.work_pools["prefloop-gpu"].concurrency_limit == 1


BASE = {"work_pools": {"gpu": {"concurrency_limit": 1}},
        "deployments": [{"name": "d", "flows": ["generate"], "work_pool": "gpu", "parameters": {"run": "r"}}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cron": "every day"}, "`deployments[d].cron`: Value error, `every day` is not a cron string"),
        ({"work_pool": "tpu"}, "names work pool `tpu`, which `work_pools` does not list"),
        ({"flows": ["generat"]}, "unknown flow(s) ['generat']"),
        ({"schedule": "0 2 * * *"}, "`deployments[d].schedule`: Extra inputs are not permitted"),
        ({"cron": "0 2 * * *", "interval_seconds": 60}, "give `cron` or `interval_seconds`, not both"),
        ({"flows": ["ingest"], "parameters": {"run": "r", "round": 2}}, "flow `ingest` takes no parameter(s) ['round']"),
        ({"parameters": {"run": "r", "config": {"generate": {"stepz": 3}}}}, "`config.generate.stepz`"),
        ({"parameters": {"run": "a b"}}, "run name `a b` is not allowed"),
        ({"parameters": {}}, "give `parameters.run`"),
    ],
)
def test_a_bad_file_is_one_error_naming_the_file_and_the_deployment(tmp_path, change, message):
    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump({**BASE, "deployments": [{**BASE["deployments"][0], **change}]}))
    with pytest.raises(DeploymentSpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_scheduled_deployment_gets_flow_runs_from_the_server(tmp_path, prefect_server, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    path = tmp_path / "deployments.yaml"
    spec = {
        "work_pools": {"test-gpu": {"concurrency_limit": 1, "description": "one run at a time"}},
        "defaults": {"runs_root": str(tmp_path / "runs")},
        "deployments": [{
            "name": "every-2s", "flows": ["iterative_alignment"], "work_pool": "test-gpu", "interval_seconds": 2,
            "concurrency_limit": 1, "parameters": {"run": "sched", "config": {"run": {"rounds": 2}}},
        }],
    }
    path.write_text(yaml.safe_dump(spec))
    assert main(["--runs-root", str(tmp_path / "runs"), "deploy", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "iterative_alignment/every-2s" in out and "every 2 s" in out and "worker start --pool test-gpu" in out

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("test-gpu")
        assert pool.type == "process" and pool.concurrency_limit == 1
        deployment = client.read_deployment_by_name("iterative_alignment/every-2s")
        assert deployment.work_pool_name == "test-gpu" and deployment.entrypoint == "flows.pipeline.iterative_alignment"
        assert deployment.parameters == {"run": "sched", "runs_root": str(tmp_path / "runs"),
                                         "config": {"run": {"rounds": 2}}}
        assert deployment.schedules[0].schedule.interval == datetime.timedelta(seconds=2)
        assert deployment.global_concurrency_limit.limit == 1
        # The scheduler service (not this test) creates the runs; it looks at new deployments every ~5 s.
        deadline, runs = time.monotonic() + 25, []
        while time.monotonic() < deadline and len(runs) < 3:
            time.sleep(1)
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            )
    assert len(runs) >= 3, f"the scheduler created {len(runs)} run(s) in 25 s"
    assert all(r.state.is_scheduled() and r.parameters["run"] == "sched" for r in runs)
    starts = [r.expected_start_time for r in runs[:3]]
    assert [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)] == [2.0, 2.0]

    # Applying again updates in place (one deployment, the pool's new limit)
    spec["work_pools"]["test-gpu"]["concurrency_limit"] = 2
    path.write_text(yaml.safe_dump(spec))
    assert main(["--runs-root", str(tmp_path / "runs"), "deploy", "--file", str(path)]) == 0
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("test-gpu").concurrency_limit == 2
        assert client.read_deployment_by_name("iterative_alignment/every-2s").id == deployment.id
