"""The `prefloop` command as a user runs it, against a real Prefect server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from data_contracts import RunLayout, read_manifest

REPO = Path(__file__).resolve().parent.parent


def prefloop(*args: str, runs_root: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "--runs-root", str(runs_root), *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


# A whole run in seconds: a small world, a CLIP trained for a few steps.
TINY = (
    "--set", "ingest.world.num_clips=24", "--set", "bootstrap.clip.steps=3", "--set", "bootstrap.clip.batch_size=8",
    "--set", "bootstrap.policy.steps=2", "--set", "bootstrap.policy.batch_size=4", "--set", "bootstrap.policy.layers=1",
    "--set", "bootstrap.policy.dim=32", "--set", "bootstrap.policy.head_dim=16", "--set", "bootstrap.judge_samples=4",
    "--set", "generate.max_prompts=4", "--set", "generate.samples_per_prompt=2", "--set", "generate.steps=2",
    "--set", "train_reward.model.steps=3", "--set", "train_reward.model.batch_size=2",
    "--set", "finetune.train.steps=2", "--set", "finetune.train.batch_size=2", "--set", "evaluate.samples=4",
    "--set", "finetune.real_clips.steps=2", "--set", "finetune.real_clips.batch_size=2",
)


def test_help_is_fast_and_imports_no_framework():
    code = "import flows.cli, sys; print(sorted(m for m in ('torch','prefect','ray','cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_set_key_is_one_clear_error(tmp_path):
    out = prefloop("stage", "ingest", "--run", "x", "--set", "ingest.sorce=/data", runs_root=tmp_path, check=False)
    assert out.returncode != 0
    assert "unknown key `ingest.sorce`" in out.stderr and "source" in out.stderr


def _flow_runs(api_url: str) -> list:
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await client.read_flow_runs()

    return asyncio.run(go())


def test_stage_ingest_through_prefect_then_rerun_is_skipped(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    out = prefloop("stage", "ingest", "--run", "demo", "--set", "ingest.world.num_clips=40", runs_root=runs)
    assert prefect_server.ui_url in out.stdout and "/runs/flow-run/" in out.stdout
    layout = RunLayout(runs, "demo")
    m = read_manifest(layout.stage("ingest").manifest_path, "videos", layout)
    assert len(m) == 40
    assert (layout.run_dir / "config.yaml").read_text().count("num_clips: 40") == 1

    again = prefloop("stage", "ingest", "--run", "demo", runs_root=runs)
    assert "ingest" in again.stdout and "complete" in again.stdout
    listing = prefloop("runs", runs_root=runs)
    assert "demo" in listing.stdout and "ingest" in listing.stdout and "videos=40" in listing.stdout

    names = {r.name: r for r in _flow_runs(prefect_server.api_url)}
    assert names["demo/ingest"].state.is_completed()


def test_stage_select_right_after_ingest_runs_bootstrap_first(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    prefloop("stage", "ingest", "--run", "sel", *TINY, runs_root=runs)
    out = prefloop("stage", "select", "--run", "sel", runs_root=runs)
    assert "bootstrap" in out.stdout and "select" in out.stdout
    layout = RunLayout(runs, "sel")
    sel = read_manifest(layout.stage("select").manifest_path, "selection", layout)
    assert len(sel) == 24 and sum(sel.table.column("selected").to_pylist()) > 0
    names = {r.name: r for r in _flow_runs(prefect_server.api_url)}
    assert names["sel/select"].state.is_completed() and names["sel/bootstrap"].state.is_completed()


def test_folder_with_bad_files_exits_zero_and_keeps_them(tmp_path, prefect_server, messy_folder):
    runs = tmp_path / "runs"
    out = prefloop("stage", "ingest", "--run", "messy", "--set", f"ingest.source={messy_folder}", runs_root=runs)
    assert out.returncode == 0
    layout = RunLayout(runs, "messy", extra_roots=(messy_folder,))
    rows = read_manifest(layout.stage("ingest").manifest_path, "videos", layout).rows()
    reasons = {r["video_id"]: r["reason"] for r in rows}
    assert reasons["good"] is None and reasons["empty"] == "empty_file" and reasons["notes"] == "not_a_video"
    assert reasons["sub/nocaption"] == "missing_caption" and reasons["truncated"] is not None


def test_listing_without_caption_column_is_one_clear_error(tmp_path, prefect_server):
    data = tmp_path / "data"
    data.mkdir()
    listing = data / "list.csv"
    listing.write_text("path,title\na.mp4,a red ball falls\n")
    runs = tmp_path / "runs"
    out = prefloop("stage", "ingest", "--run", "bad", "--set", f"ingest.source={listing}", runs_root=runs, check=False)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert str(listing) in last and "column `caption`" in last and "ingest.caption_column" in last
    assert "Retrying" not in out.stdout + out.stderr  # bad input is not retried


def _artifacts() -> list:
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await client.read_artifacts()

    return asyncio.run(go())


def test_run_is_a_flow_with_a_subflow_per_stage_and_compare_tabulates_methods(tmp_path, prefect_server):
    prefloop("run", "--run", "whole", *TINY, runs_root=tmp_path)
    runs = {r.name: r for r in _flow_runs(prefect_server.api_url)}
    assert runs["whole"].state.is_completed()
    stages = ["ingest", "bootstrap", "select"] + [f"round-1/{s}" for s in ("generate", "label", "train_reward", "finetune", "evaluate")]
    for stage in stages:
        child = runs[f"whole/{stage}"]
        assert child.state.is_completed(), stage
        assert child.parent_task_run_id is not None  # a subflow of the whole-DAG flow run
    artifacts = _artifacts()
    tables = [a for a in artifacts if a.key == "whole-ingest"]
    assert tables and tables[0].type == "table"
    assert "videos" in str(tables[0].data) and "24" in str(tables[0].data)
    sheets = [a for a in artifacts if a.key == "whole-select-image-0"]
    assert sheets and sheets[0].type == "markdown" and "data:image/png;base64," in sheets[0].data
    progress = [a for a in artifacts if a.key == "whole-round-01-generate-progress"]
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    finetune = [a for a in artifacts if a.key == "whole-round-01-finetune"]
    assert finetune and finetune[0].type == "table" and "pairs" in str(finetune[0].data)
    # `prefloop compare` trains each method on the same round's pairs (sharing this run's stages)
    out = prefloop("compare", "--run", "whole", "--round", "1", "--methods", "flow_dpo,sft", *TINY, runs_root=tmp_path)
    table = (tmp_path / "whole" / "round-01" / "compare" / "compare.md").read_text()
    assert "| base |" in table and "| flow_dpo |" in table and "| sft |" in table and "| sft |" in out.stdout
    for method in ("flow_dpo", "sft"):
        for stage in ("finetune", "evaluate"):
            marker = tmp_path / "whole" / "round-01" / "compare" / method / stage / "stage.json"
            assert json.loads(marker.read_text())["status"] == "complete", (method, stage)
    assert any(a.key == "whole-round-01-compare" and a.type == "table" for a in _artifacts())
    bad = prefloop("compare", "--run", "whole", "--methods", "dpo", runs_root=tmp_path, check=False)
    assert bad.returncode != 0 and "unknown method(s) ['dpo']" in bad.stderr


def test_a_command_without_a_configured_server_starts_its_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    cmd = [sys.executable, "-m", "flows.cli", "--runs-root", str(tmp_path)]
    try:
        out = subprocess.run(
            [*cmd, "stage", "ingest", "--run", "own", "--set", "ingest.world.num_clips=12"],
            cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert "started Prefect server http://127.0.0.1:" in out.stdout and "/runs/flow-run/" in out.stdout
        status = subprocess.run([*cmd, "server", "--status"], cwd=REPO, capture_output=True, text=True, env=env)
        assert status.returncode == 0 and "api_url" in status.stdout
    finally:
        subprocess.run([*cmd, "server", "--stop"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    status = subprocess.run([*cmd, "server", "--status"], cwd=REPO, capture_output=True, text=True, env=env)
    assert status.returncode == 1

