"""The critic answers garbage for every pair: a VLM critic (the tiny Qwen2-VL, loaded by path
through transformers like a hub model) whose output layer was zeroed, so every answer is the same
meaningless token. Every label is `invalid` with the raw answer kept, finetune has nothing to
learn from and keeps the policy, the gate stops the loop, and the run completes: nothing crashes."""

from __future__ import annotations

import json

import pytest
import torch

from data_contracts import RunLayout, read_manifest
from tests.test_cli import TINY, prefloop

pytestmark = pytest.mark.faults


def garbage_vlm(folder):
    from transformers import AutoModelForImageTextToText

    from models.vlm import build_tiny_vlm

    build_tiny_vlm(folder, seed=0)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy decoding says the same token forever
    model.save_pretrained(folder)
    return folder


def test_a_critic_that_answers_garbage_gates_the_round_off(tmp_path, prefect_server):
    vlm = garbage_vlm(tmp_path / "garbage-vlm")
    runs = tmp_path / "runs"
    critic = ("--set", "label.critic=vlm", "--set", f"label.vlm.model={vlm}", "--set", "label.vlm.device=cpu",
              "--set", "label.vlm.max_new_tokens=8", "--set", "label.pairing=all_pairs", "--set", "label.actors=1",
              "--set", "run.rounds=2")
    out = prefloop("run", "--run", "garbage", *TINY, *critic, runs_root=runs, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    layout = RunLayout(runs, "garbage")
    labels = read_manifest(layout.stage("label", 1).manifest_path, "labels", layout).rows()
    assert len(labels) == 4, "4 prompts x 2 samples: one pair per prompt"
    assert all(r[f"label_{d}"] == "invalid" for r in labels for d in ("vq", "mq", "ta"))
    assert all(r["raw_response"] is not None and r["critic"] == f"vlm:{vlm}" for r in labels), "the raw answer is kept"
    marker = json.loads(layout.stage("label", 1).marker_path.read_text())
    assert marker["counts"]["invalid_mq"] == marker["counts"]["pairs"] == 4
    finetune = json.loads(layout.stage("finetune", 1).marker_path.read_text())
    assert finetune["counts"]["policy_unchanged"] == 1 and finetune["counts"]["pairs"] == 0
    ckpts = read_manifest(layout.stage("finetune", 1).manifest_path, "checkpoints", layout).rows()
    assert [r["kind"] for r in ckpts if r["kind"].startswith("policy")] == ["policy"], "no LoRA from garbage"
    assert "no change, stop: finetune left the policy unchanged" in out.stdout + out.stderr
    assert not (layout.run_dir / "round-02").exists(), "the gate stopped the loop after round 1 of 2"
