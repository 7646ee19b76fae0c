"""The disk fills up while a stage writes its manifest. Simulated for real: the stage runs in a
process whose file-size limit (RLIMIT_FSIZE) lets its videos through but not its manifest, so the
manifest's `write` fails inside the kernel as it would on a full disk. No partial manifest may be
left, an older complete manifest stays as it was, and the next run (with room) completes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_contracts import RunLayout, read_manifest
from tests.test_cli import REPO

pytestmark = pytest.mark.faults

INGEST = """
import resource, sys
from pathlib import Path
from flows.config import resolve_config
from tasks import ingest
from tasks.common import execute_stage
limit = int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: write() fails
cfg = resolve_config(overrides=["ingest.world.num_clips=40"])
layout = cfg.layout(Path(sys.argv[1]), "full")
execute_stage(ingest.run, layout, layout.stage("ingest"), cfg.ingest, {}, force=True)
"""


def _ingest(runs: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INGEST, str(runs), str(limit)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_a_full_disk_on_manifest_write_leaves_no_partial_manifest(tmp_path):
    runs = tmp_path / "runs"
    layout = RunLayout(runs, "full")
    stage = layout.stage("ingest")
    # 1. with room: the sizes the limit is set between
    assert _ingest(runs, 0).returncode == 0
    manifest = stage.manifest_path.read_bytes()
    truth = layout.truth_path.read_bytes()
    largest_video = max(p.stat().st_size for p in stage.files("videos").glob("*.mp4"))
    limit = largest_video + 512
    assert limit < min(len(manifest), len(truth)), "the limit lets videos through and stops the manifests"
    # 2. the same stage again, forced, on a "full disk": it fails at the first manifest
    failed = _ingest(runs, limit)
    assert failed.returncode != 0 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert stage.manifest_path.read_bytes() == manifest, "the older complete manifest is untouched"
    assert layout.truth_path.read_bytes() == truth
    assert not stage.marker_path.exists(), "a stage that did not finish is not marked complete"
    assert _leftovers(layout.run_dir) == [], "no partial file left behind"
    # 3. a fresh run directory on a full disk: no manifest at all
    fresh = RunLayout(tmp_path / "fresh", "full")
    assert _ingest(tmp_path / "fresh", limit).returncode != 0
    assert not fresh.stage("ingest").manifest_path.exists() and not fresh.truth_path.exists()
    assert not fresh.stage("ingest").marker_path.exists() and _leftovers(fresh.run_dir) == []
    # 4. with room again, the stage completes (the marker was gone, so it is not skipped)
    assert _ingest(tmp_path / "fresh", 0).returncode == 0
    assert json.loads(fresh.stage("ingest").marker_path.read_text())["status"] == "complete"
    assert len(read_manifest(fresh.stage("ingest").manifest_path, "videos", fresh)) == 40
