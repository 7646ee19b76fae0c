"""Shared fixtures. Expensive services start once per test session (ENVIRONMENT.md: a Prefect
server takes ~9 s to become healthy), on a free port and in a temporary folder we own."""

from __future__ import annotations

import os

import pytest

# Keep torch and OpenCV to the two cores the tests are given.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server for this test session; this process and its children use it."""
    from infra.prefect_server import start_server, stop_server, use_server

    state_dir = tmp_path_factory.mktemp("prefect")
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    info = start_server(state_dir)
    use_server(info)
    yield info
    stop_server(state_dir)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
