"""Shared fixtures. Expensive services start once per test session (ENVIRONMENT.md: a Prefect
server takes ~9 s to become healthy), on a free port and in a temporary folder we own."""

from __future__ import annotations

import os

import numpy as np
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


def small_frames(n: int = 8, size: int = 32, seed: int = 0) -> np.ndarray:
    """A few frames of a moving coloured block: a tiny, valid video."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        frames[i, 8:16, 4 + i : 12 + i] = rng.integers(100, 255, 3)
    return frames


@pytest.fixture()
def messy_folder(tmp_path):
    from tasks.video_io import write_video

    """A good clip, a truncated mp4, a zero-byte file, a text file named .mp4, a clip without caption."""
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    write_video(root / "good.mp4", small_frames(), 8)
    (root / "good.txt").write_text("a red ball falls\n")
    write_video(root / "sub" / "nocaption.mp4", small_frames(seed=1), 8)
    full = root / "full.mp4"
    write_video(full, small_frames(n=24, seed=2), 8)
    data = full.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])
    full.unlink()
    (root / "truncated.txt").write_text("a blue ball rolls to the left")
    (root / "empty.mp4").write_bytes(b"")
    (root / "empty.txt").write_text("a green ball falls")
    (root / "notes.mp4").write_text("these are my notes, not a video\n")
    (root / "notes.txt").write_text("a yellow ball falls")
    return root


