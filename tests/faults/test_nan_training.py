"""NaN in training, through the finetune stage: one cached latent of the round is corrupt (finite
but enormous, as a bad disk or a broken encoder leaves it), so the step that first draws its pair
produces a non-finite loss. That step is not applied; the stage completes with the LoRA of the
last good step (exactly what a run of only those steps gives), and says so in its counts and its
checkpoint row."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_contracts import Lineage, read_manifest, write_manifest
from models.policy import LORA_WEIGHT_NAME
from models.preference_training import PreferenceTrainConfig
from tasks import finetune
from tasks.common import execute_stage
from tasks.finetune import FinetuneConfig, RealClipConfig
from tasks.generate import GenerateConfig
from tests.test_generate import generate_run
from tests.test_generate import run as gen_run  # noqa: F401 - fixture

NO_REAL = RealClipConfig(steps=0)  # no `selection` input here: no real-clip phase

pytestmark = pytest.mark.faults

STEPS = 6
BAD_STEP = 2  # the batch order's third pair carries the corrupt latent


@pytest.fixture(scope="module")
def ray_local():
    from infra.ray_cluster import ray_session

    with ray_session(num_cpus=2):
        yield


def _finetune(layout, inputs, steps: int, force: bool = False):
    cfg = FinetuneConfig(real_clips=NO_REAL, train=PreferenceTrainConfig(steps=steps, batch_size=1, seed=0))
    out = layout.stage("finetune", 1)
    return execute_stage(finetune.run, layout, out, cfg, inputs, force=force), out


def test_a_non_finite_loss_keeps_the_last_good_lora(gen_run, ray_local):  # noqa: F811
    layout, inputs = gen_run
    # 1. the round's samples (2 prompts x 4) and labels: four disjoint pairs, video A preferred
    gen, _ = generate_run(layout, inputs, GenerateConfig(samples_per_prompt=4, shard_size=4, batch_size=4, actors=1))
    gens = read_manifest(gen.manifest.path, "generations", layout).rows()
    pairs = [(gens[i], gens[i + 1]) for i in range(0, len(gens), 2)]
    labels = [
        {"pair_id": f"p{i}", "prompt": a["prompt"], "video_a": a["video_path"], "video_b": b["video_path"],
         "label_vq": "A", "label_mq": "A", "label_ta": "A", "score_vq": 1.0, "score_mq": 1.0, "score_ta": 1.0,
         "critic": "test", "rationale": None, "raw_response": None, "round": 1}
        for i, (a, b) in enumerate(pairs)
    ]
    label_dir = layout.stage("label", 1)
    labels_ref = write_manifest(labels, "labels", label_dir.manifest_path, layout, Lineage("label"))
    stage_inputs = {"labels": labels_ref, "generations": gen.manifest, "checkpoints": inputs["checkpoints"]}
    # 2. corrupt the rejected latent of the pair the batch order reaches at BAD_STEP
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    latent_path = layout.resolve(pairs[int(order[BAD_STEP])][1]["latent_path"])
    good_latent = load_file(latent_path)
    save_file({"latent": torch.full_like(good_latent["latent"], 3e38)}, latent_path)
    # 3. the stage completes; training stopped before applying the bad step
    outcome, out = _finetune(layout, stage_inputs, STEPS)
    assert outcome.counts["stopped_on_nonfinite"] == 1 and outcome.counts["steps_done"] == BAD_STEP
    rows = read_manifest(outcome.manifest.path, "checkpoints", layout).rows()
    lora_row = next(r for r in rows if r["kind"] == "policy_lora")
    stopped = json.loads(lora_row["metrics_json"])["stopped_on_nonfinite"]
    assert stopped.startswith(f"step {BAD_STEP}: loss is") and f"keeps the weights after step {BAD_STEP - 1}" in stopped
    kept = load_file(layout.resolve(lora_row["path"]) / LORA_WEIGHT_NAME)
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert any(t.abs().sum() > 0 for k, t in kept.items() if "lora_B" in k), "the good steps were kept, not thrown away"
    # 4. exactly the LoRA of a run of the good steps alone, on the intact latent
    save_file(good_latent, latent_path)
    reference, _ = _finetune(layout, stage_inputs, BAD_STEP, force=True)
    assert "stopped_on_nonfinite" not in reference.counts and reference.counts["steps_done"] == BAD_STEP
    again = load_file(layout.resolve(lora_row["path"]) / LORA_WEIGHT_NAME)
    assert kept.keys() == again.keys()
    for key in kept:
        torch.testing.assert_close(kept[key], again[key], rtol=0, atol=0)
