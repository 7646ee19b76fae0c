"""The driver (`prefloop run`) SIGKILLed while `finetune` trains on Ray Train, with everything it
started, then the same command again: the stages before finetune are not recomputed (their
markers and manifests are untouched), finetune trains again from the start, and the run ends
complete with every manifest free of duplicated or missing rows: the checkpoints manifest holds
the base policy and exactly one LoRA."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pyarrow.parquet as pq
import pytest

from data_contracts import RunLayout, read_manifest
from data_contracts.manifest import META_KIND
from data_contracts.schemas import contract
from models.preference_training import METRICS_FILE
from tests.faults.helpers import kill_all, processes_with_env
from tests.test_cli import REPO, TINY

pytestmark = pytest.mark.faults

# 400 steps of 2 pairs: finetune trains for tens of seconds, so the kill lands mid-training; on Ray
# Train (one worker would train in the driver by default), whose processes must not survive the kill.
SLOW_FINETUNE = ("--set", "finetune.train.steps=400", "--set", "finetune.prefer=mq", "--set", "finetune.backend=ray_train")
BEFORE = [("ingest", None), ("bootstrap", None), ("select", None), ("generate", 1), ("label", 1), ("train_reward", 1)]


def _ray_train_workers(tag: str) -> list[int]:
    """PIDs of the run's Ray Train worker processes (Ray names a worker's process after its actor)."""
    found = []
    for pid in processes_with_env(tag):
        try:
            if b"RayTrainWorker" in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(pid)
        except OSError:
            continue
    return found


def _manifests(layout: RunLayout) -> dict[str, str]:
    """Every manifest of the run and the sha256 of its bytes."""
    return {str(p.relative_to(layout.run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(layout.run_dir.rglob("manifest.parquet"))}


def reward_model_critic(folder) -> tuple[str, ...]:
    """A fresh reward model as round 1's critic, so that every pair is decided: the annotators find
    the tiny base's samples equally implausible and tie every pair, which finetune cannot train on."""
    import torch

    from models.reward_model import Normalisation, RewardModel, RewardModelConfig

    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(device="cpu"))
    model.normalisation = Normalisation(("VQ", "MQ", "TA"), (0.0, 0.0, 0.0), (0.05, 0.05, 0.05), 2)
    saved = model.save_pretrained(folder)
    return ("--set", "label.critic=reward_model", "--set", f"label.reward_model={saved}", "--set", "label.tie_margin=0")


def test_driver_killed_mid_finetune_then_resumed(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    layout = RunLayout(runs, "crash")
    tag = f"PREFLOOP_FAULT_TEST={uuid.uuid4().hex}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    critic = reward_model_critic(tmp_path / "critic")
    cmd = [sys.executable, "-m", "flows.cli", "--runs-root", str(runs), "run", "--run", "crash", *TINY, *SLOW_FINETUNE,
           *critic]
    ft = layout.stage("finetune", 1)
    # 1. run, and SIGKILL the CLI's whole process group once a Ray Train worker of finetune trains
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None and not _ray_train_workers(tag):
            time.sleep(0.05)
        time.sleep(3)  # the worker loads the policy and starts its steps
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    assert ft.path.is_dir() and not ft.marker_path.exists(), "the kill landed in finetune"
    assert not (ft.files("lora") / METRICS_FILE).exists(), "the kill landed before training ended"
    assert not ft.manifest_path.exists(), "no manifest of an unfinished stage"
    # nothing the killed run started survives it (Ray Train's controller and workers included)
    time.sleep(5)
    survivors = processes_with_env(tag)
    kill_all(survivors)
    assert survivors == [], "processes of the killed run were still alive"

    finished = {(s, r): json.loads(layout.stage(s, r).marker_path.read_text())["finished_at"] for s, r in BEFORE}
    manifests = _manifests(layout)
    assert len(manifests) == len(BEFORE)
    # 2. the same command again: completes
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    kill_all(processes_with_env(tag))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for (stage, round_), at in finished.items():
        marker = json.loads(layout.stage(stage, round_).marker_path.read_text())
        assert marker["finished_at"] == at, f"{stage} was recomputed"
    after = _manifests(layout)
    assert {k: after[k] for k in manifests} == manifests, "a finished stage's manifest changed"
    marker = json.loads(ft.marker_path.read_text())
    assert marker["status"] == "complete" and marker["counts"]["pairs"] == 4 and marker["counts"]["steps_done"] == 400
    ckpts = read_manifest(ft.manifest_path, "checkpoints", layout).rows()
    assert [r["kind"] for r in ckpts] == ["policy", "policy_lora"] and ckpts[1]["checkpoint_id"] == "lora-r01"
    assert layout.resolve(ckpts[1]["path"]) == ft.files("lora")
    # 3. no duplicated or missing rows in any manifest of the run
    for rel in after:
        path = layout.run_dir / rel
        kind = pq.read_schema(path).metadata[META_KIND].decode()
        ids = [r[contract(kind).id_column] for r in read_manifest(path, kind, layout).rows()]
        assert ids and len(ids) == len(set(ids)), f"{rel}: duplicated rows"
    gens = read_manifest(layout.stage("generate", 1).manifest_path, "generations", layout).rows()
    assert len(gens) == 8, "4 prompts x 2 samples, each once"
    assert not [p for p in layout.run_dir.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert json.loads(layout.stage("evaluate", 1).marker_path.read_text())["status"] == "complete"
