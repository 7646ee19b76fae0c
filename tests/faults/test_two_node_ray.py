"""A real two-node Ray cluster on this machine: `ray start --head` plus a second `ray start
--address=…` node, each with its own temp dir, one CPU, one logical GPU and a resource that names
it. `select` and `generate` join it through `run.ray_address` and ask for one GPU per model actor
(`select.num_gpus`, `generate.num_gpus`), which is how a run maps onto N GPU nodes: Ray places one
actor per GPU, so both nodes must work. The cluster is protected by a token of its own (Ray 2.60's
token auth) and is stopped by killing exactly the processes it started (marked by an environment
variable they inherit), never with `ray stop`, which would stop every Ray on the machine.

Tier: `faults` (pytest -m faults): it starts and stops a cluster and takes ~2 minutes."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from data_contracts import RunLayout, read_manifest
from tests.faults.helpers import kill_all, processes_with_env
from tests.test_cli import REPO, TINY

pytestmark = pytest.mark.faults

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict) -> str:
    out = subprocess.run([RAY, "start", *args, "--disable-usage-stats", "--object-store-memory=200000000"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def two_nodes():
    """(address, env for clients, {"head": node id, "worker": node id}); torn down by PID."""
    marker = f"PREFLOOP_TWO_NODE={uuid.uuid4().hex}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "OMP_NUM_THREADS": "1",
           marker.split("=")[0]: marker.split("=")[1]}
    temp_dirs = [tempfile.mkdtemp(prefix="pfl-2n-", dir="/tmp") for _ in range(2)]
    try:
        text = _start(["--head", f"--port={_free_port()}", f"--temp-dir={temp_dirs[0]}", "--num-cpus=1",
                       "--num-gpus=1", "--resources", '{"prefloop_head": 1}', "--include-dashboard=false"], env)
        address = re.search(r"ray start --address='([^']+)'", text).group(1)
        _start([f"--address={address}", f"--temp-dir={temp_dirs[1]}", "--num-cpus=1", "--num-gpus=1",
                "--resources", '{"prefloop_worker": 1}'], env)
        nodes = json.loads(subprocess.run(
            [sys.executable, "-c", f"import json, ray; ray.init(address='{address}', logging_level='ERROR'); "
             "print(json.dumps([n['Resources'] | {'id': n['NodeID']} for n in ray.nodes() if n['Alive']]))"],
            env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip().splitlines()[-1])
        ids = {("head" if "prefloop_head" in n else "worker"): n["id"] for n in nodes}
        assert len(nodes) == 2 and set(ids) == {"head", "worker"}, nodes
        yield address, env, ids
    finally:
        pids = processes_with_env(marker)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        kill_all(processes_with_env(marker))
        time.sleep(1)
        left = processes_with_env(marker)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        assert left == [], "the cluster's processes are gone"


def _prefloop(*args: str, runs: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--runs-root", str(runs), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _actor_nodes(address: str, env: dict) -> dict[str, set[str]]:
    """Node ids of every actor the cluster ever ran, by class (GCS keeps dead actors)."""
    code = (
        f"import json, ray; from ray._private.state import state; ray.init(address='{address}', logging_level='ERROR'); "
        "rows = [(a['ActorClassName'], a['Address']['NodeID']) for a in state.actor_table(None).values()]; "
        "print(json.dumps(rows))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    found: dict[str, set[str]] = {}
    for name, node in json.loads(out.stdout.strip().splitlines()[-1]):
        found.setdefault(name, set()).add(node)
    return found


def test_select_and_generate_run_on_both_nodes(tmp_path, prefect_server, two_nodes):
    address, env, ids = two_nodes
    runs = tmp_path / "runs"
    joined = ("--set", f"run.ray_address={address}")
    # 1. select: decode tasks spread by Ray Data, one open_clip actor per (logical) GPU
    _prefloop("stage", "select", "--run", "two", *TINY, *joined, "--set", "select.clip_actors=2",
              "--set", "select.num_gpus=1", "--set", "select.batch_size=4", runs=runs, env=env)
    layout = RunLayout(runs, "two")
    sel = json.loads(layout.stage("select").marker_path.read_text())
    assert sel["counts"]["decoded"] == 24 and sel["counts"]["scoring_nodes"] == 2
    assert len(read_manifest(layout.stage("select").manifest_path, "selection", layout)) == 24
    # 2. generate: one policy actor per GPU, 4 shards
    _prefloop("stage", "generate", "--run", "two", "--round", "1", *joined, "--set", "generate.actors=2",
              "--set", "generate.num_gpus=1", "--set", "generate.shard_size=2", runs=runs, env=env)
    gen = json.loads(layout.stage("generate", 1).marker_path.read_text())
    assert gen["counts"]["samples"] == 8 and gen["counts"]["sampling_nodes"] == 2
    records = [json.loads(p.read_text()) for p in sorted(layout.stage("generate", 1).files("shards").glob("*.json"))]
    assert {r["node_id"] for r in records} == set(ids.values()), "shards were sampled on both nodes"
    rows = read_manifest(layout.stage("generate", 1).manifest_path, "generations", layout).rows()
    assert len({r["generation_id"] for r in rows}) == 8
    # 3. the cluster's own record: each node held a CLIP actor and a policy actor
    actors = _actor_nodes(address, env)
    assert actors["PolicyWorker"] == set(ids.values())
    clip = [nodes for name, nodes in actors.items() if "ClipScorer" in name]
    assert clip and clip[0] == set(ids.values())
