"""The driver (`prefloop run`) SIGKILLed in the middle of `generate`, with everything it started,
then the same command again: finished stages are not recomputed, generate keeps its finished
shards and samples only the rest, and the run ends complete with every sample exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from data_contracts import RunLayout, read_manifest
from tests.faults.helpers import kill_all, processes_with_env
from tests.test_cli import REPO, TINY

pytestmark = pytest.mark.faults

# 4 shards of 2 samples, one actor, 60 Euler steps: each shard takes a noticeable moment, so the
# kill lands after the first shard's record and before the last.
SLOW_GENERATE = ("--set", "generate.shard_size=2", "--set", "generate.batch_size=2", "--set", "generate.actors=1",
                 "--set", "generate.steps=60")


def _marker(layout: RunLayout, stage: str, round: int | None = None) -> dict:
    return json.loads(layout.stage(stage, round).marker_path.read_text())


def test_driver_killed_mid_generate_then_resumed(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    layout = RunLayout(runs, "crash")
    tag = f"PREFLOOP_FAULT_TEST={uuid.uuid4().hex}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    cmd = [sys.executable, "-m", "flows.cli", "--runs-root", str(runs), "run", "--run", "crash", *TINY, *SLOW_GENERATE]
    shards = layout.stage("generate", 1).files("shards")
    # 1. run, and SIGKILL the CLI's whole process group once generate has recorded a shard
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None and not list(shards.glob("shard-*.json")):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        recorded = sorted(p.name for p in shards.glob("shard-*.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    assert 1 <= len(recorded) < 4, f"the kill landed mid-generate (shards recorded: {recorded})"
    assert not layout.stage("generate", 1).marker_path.exists()
    assert not layout.stage("generate", 1).manifest_path.exists(), "no manifest of an unfinished stage"
    # nothing the killed run started survives it (Ray's processes share the driver's fate)
    time.sleep(5)
    survivors = processes_with_env(tag)
    kill_all(survivors)
    assert survivors == [], "processes of the killed run were still alive"

    finished = {s: _marker(layout, s)["finished_at"] for s in ("ingest", "bootstrap", "select")}
    kept = {r: (shards / r).stat().st_mtime_ns for r in recorded}
    kept_videos = {
        Path(row["video_path"]).name: Path(row["video_path"]).stat().st_mtime_ns
        for r in recorded for row in json.loads((shards / r).read_text())["rows"]
    }
    # 2. the same command again: resumes
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    kill_all(processes_with_env(tag))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage, at in finished.items():
        assert _marker(layout, stage)["finished_at"] == at, f"{stage} was recomputed"
    gen = _marker(layout, "generate", 1)
    assert gen["status"] == "complete" and gen["counts"]["shards_resumed"] == len(recorded)
    assert {r: (shards / r).stat().st_mtime_ns for r in recorded} == kept, "finished shards are not redone"
    gen_dir = layout.stage("generate", 1)
    assert {n: (gen_dir.files("videos") / n).stat().st_mtime_ns for n in kept_videos} == kept_videos
    rows = read_manifest(gen_dir.manifest_path, "generations", layout).rows()
    ids = [r["generation_id"] for r in rows]
    assert len(ids) == 8 and len(set(ids)) == 8, "4 prompts x 2 samples, each once"
    assert sorted(p.stem for p in gen_dir.files("videos").glob("*.mp4")) == sorted(ids)
    assert not [p for p in layout.run_dir.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    for stage in ("label", "train_reward", "finetune", "evaluate"):
        assert _marker(layout, stage, 1)["status"] == "complete", stage
