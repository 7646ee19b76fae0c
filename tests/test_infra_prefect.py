"""The local Prefect server: start, find, reuse, run a flow against it, stop.

One real server for the whole session (~9 s to healthy on 2 cores with a new
database, ~230 MB RSS). The tests run in file order; the last one stops it.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import pytest

from infra.prefect_server import (
    SERVER_JSON,
    ServerInfo,
    _pid_listens_on,
    ensure_server,
    find_server,
    start_server,
    stop_server,
    use_server,
)

# Variables use_server sets; saved and restored so other test modules keep their
# own Prefect settings.
_CLIENT_VARS = (
    "PREFECT_API_URL",
    "PREFECT_UI_URL",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_SERVER_EPHEMERAL_ENABLED",
)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> tuple[ServerInfo, Path, float]:
    """A started server, its state dir and the seconds it took to answer /health."""
    state_dir = tmp_path_factory.mktemp("prefect-state")
    started = time.monotonic()
    info = start_server(state_dir)
    seconds_to_healthy = time.monotonic() - started
    print(f"\nprefect server: healthy after {seconds_to_healthy:.1f} s, "
          f"RSS {_rss_mib(info.pid):.0f} MiB, {info.ui_url}")
    yield info, state_dir, seconds_to_healthy
    stop_server(state_dir)


@pytest.fixture
def client_env(server):
    """Prefect in this process points at the test server; restored afterwards."""
    saved = {name: os.environ.get(name) for name in _CLIENT_VARS}
    use_server(server[0])
    yield server[0]
    _drain_api_logs()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    import prefect.context

    prefect.context.refresh_global_settings_context()


def test_server_answers_health_on_loopback(server):
    info, state_dir, seconds_to_healthy = server
    with urllib.request.urlopen(f"{info.api_url}/health", timeout=5) as response:
        assert response.read().strip() == b"true"
    assert info.api_url == f"http://127.0.0.1:{info.port}/api"
    assert info.ui_url == f"http://127.0.0.1:{info.port}"
    assert _pid_listens_on(info.pid, info.port) is True
    assert info.home == state_dir.resolve() / "home"
    assert (state_dir / "prefect.db").exists()
    assert ServerInfo.from_json((state_dir / SERVER_JSON).read_text()) == info
    assert seconds_to_healthy < 60


def test_flow_run_is_recorded_by_the_server(client_env):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    @flow(name="prefloop-infra-smoke")
    def add(a: int, b: int) -> int:
        return a + b

    assert get_current_settings().api.url == client_env.api_url
    state = add(2, 3, return_state=True)
    assert state.result() == 5

    run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == client_env.api_url
        run = client.read_flow_run(run_id)
        while not run.state.is_completed() and time.monotonic() < deadline:
            time.sleep(0.5)
            run = client.read_flow_run(run_id)
    assert run.state.is_completed(), run.state


def test_find_server_and_ensure_server_reuse_it(server, monkeypatch):
    info, state_dir, _ = server
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert find_server(state_dir) == info
    assert ensure_server(state_dir) == (info, False)

    # An explicit PREFECT_API_URL naming the recorded server keeps its record.
    monkeypatch.setenv("PREFECT_API_URL", info.api_url)
    assert ensure_server(state_dir) == (info, False)


def test_stop_server_stops_it_and_find_server_forgets_it(server, monkeypatch):
    info, state_dir, _ = server
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert stop_server(state_dir) is True
    assert find_server(state_dir) is None
    assert not (state_dir / SERVER_JSON).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(info.pid, 0)
    assert stop_server(state_dir) is False


def test_find_server_removes_a_stale_record(tmp_path):
    dead = ServerInfo("http://127.0.0.1:9/api", "http://127.0.0.1:9", 2**22 + 7, 9, tmp_path)
    (tmp_path / SERVER_JSON).write_text(dead.to_json())
    assert find_server(tmp_path) is None
    assert not (tmp_path / SERVER_JSON).exists()


def _rss_mib(pid: int | None) -> float:
    """Resident memory of `pid` in MiB, from /proc (0 where unavailable)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(rss[0]) / 1024 if rss else 0.0


def _drain_api_logs() -> None:
    """Send queued flow-run logs now, so none are sent after the server stops."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
