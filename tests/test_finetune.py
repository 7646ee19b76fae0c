"""`finetune` as a stage: which way labelled pairs point, and a LoRA trained from cached latents that
the next round's `generate` loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from data_contracts import Lineage, RunLayout, read_manifest, write_manifest
from models.policy import PolicyConfig, build_tiny, save_policy_folder
from models.preference_training import PreferenceTrainConfig
from models.text_encoder import build_text_encoder
from tasks import finetune
from tasks.finetune import FinetuneConfig, orient, preference_pairs
from tasks.generate import load_sampler, policy_from_checkpoints

PROMPTS = ["a red ball falls", "a blue ball rolls to the right"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_orientation_rules():
    row = lambda vq, mq, ta: {"label_vq": vq, "label_mq": mq, "label_ta": ta}  # noqa: E731
    assert orient(row("tie", "A", "tie"), "mq_ta") == "A"
    assert orient(row("tie", "B", "tie"), "mq_ta") == "B"
    assert orient(row("A", "A", "B"), "mq_ta") is None, "text alignment disagrees: left out"
    assert orient(row("A", "A", "B"), "mq") == "A"
    assert orient(row("A", "tie", "A"), "mq_ta") is None and orient(row("A", "invalid", "A"), "mq") is None
    assert orient(row("A", "tie", "A"), "overall") == "A" and orient(row("A", "B", "tie"), "overall") is None
    rows = [{"prompt": "p", "video_a": "a", "video_b": "b", **row("tie", "B", "tie")},
            {"prompt": "p", "video_a": "c", "video_b": None, **row("A", "A", "A")},
            {"prompt": "p", "video_a": "d", "video_b": "e", **row("tie", "tie", "tie")}]
    pairs, left_out = preference_pairs(rows, "mq_ta")
    assert pairs == [("p", "b", "a")] and left_out == {"no_second_video": 1, "undecided": 1}


def tiny_round(tmp_path, n_pairs: int = 8):
    """A run with a tiny base policy and a round whose generations have cached latents and labels."""
    layout = RunLayout(tmp_path / "runs", "ft")
    boot = layout.stage("bootstrap")
    folder = boot.files("policy")
    text = build_text_encoder(PROMPTS, folder / "text_encoder")
    build_tiny("wan", folder / "transformer", text_dim=text.hidden_size, text_len=text.max_length, layers=1, dim=32, head_dim=16)
    save_policy_folder(folder, PolicyConfig(family="wan", transformer=str(folder / "transformer"), text_encoder=str(folder / "text_encoder")))
    ckpt = write_manifest(
        [{"checkpoint_id": "base", "kind": "policy", "format": "diffusers", "path": layout.stored_path(folder),
          "base_id": "tiny", "round": None, "metrics_json": None}],
        "checkpoints", boot.manifest_path, layout, Lineage("bootstrap", {}, "x"),
    )
    gen = layout.stage("generate", round=1)
    g = torch.Generator().manual_seed(0)
    gens, labels = [], []
    for i in range(n_pairs):
        prompt = PROMPTS[i % 2]
        paths = []
        for k, level in enumerate((0.5, -0.5)):  # the "good" sample is bright, the bad one dark
            gid = f"r01-p{i}-{k:02d}"
            latent = torch.full((3, 8, 16, 16), level) + 0.1 * torch.randn((3, 8, 16, 16), generator=g)
            lpath, vpath = gen.files("latents") / f"{gid}.safetensors", gen.files("videos") / f"{gid}.mp4"
            lpath.parent.mkdir(parents=True, exist_ok=True)
            vpath.parent.mkdir(parents=True, exist_ok=True)
            save_file({"latent": latent}, str(lpath))
            vpath.write_bytes(b"")  # finetune reads latents only
            gens.append({"generation_id": gid, "prompt_id": f"p{i}", "prompt": prompt, "sample_index": k, "seed": k,
                         "video_path": layout.stored_path(vpath), "latent_path": layout.stored_path(lpath),
                         "first_frame_path": None, "policy_id": "base", "steps": 3, "guidance": 2.0, "round": 1})
            paths.append(layout.stored_path(vpath))
        # odd pairs list the bad video first and say B: orientation must swap them
        a, b, mq = (paths[0], paths[1], "A") if i % 2 == 0 else (paths[1], paths[0], "B")
        labels.append({"pair_id": f"pair{i}", "prompt": prompt, "video_a": a, "video_b": b, "label_vq": "tie",
                       "label_mq": mq, "label_ta": "tie", "score_vq": None, "score_mq": None, "score_ta": None,
                       "critic": "test", "rationale": None, "raw_response": None, "round": 1})
    gref = write_manifest(gens, "generations", gen.manifest_path, layout, Lineage("generate", {}, "x"))
    lab = layout.stage("label", round=1)
    lref = write_manifest(labels, "labels", lab.manifest_path, layout, Lineage("label", {}, "x"))
    return layout, {"labels": lref, "generations": gref, "checkpoints": ckpt}


def test_finetune_writes_a_lora_the_next_round_samples_with(tmp_path):
    layout, inputs = tiny_round(tmp_path)
    cfg = FinetuneConfig(train=PreferenceTrainConfig(steps=20, batch_size=4, lr=1e-3))
    out = layout.stage("finetune", round=1)
    out.path.mkdir(parents=True)
    steps = []
    result = finetune.run(inputs, cfg, layout, out, Lineage("finetune", {}, cfg.hash()), round=1, on_step=steps.append)
    assert result.counts["pairs"] == 8 and result.counts["steps_done"] == 20 and len(steps) == 20
    assert {"loss", "implicit_accuracy", "grad_norm", "e_w", "e_l", "e_w_ref", "e_l_ref", "inside"} <= set(steps[0])
    rows = read_manifest(result.manifest.path, "checkpoints", layout).rows()
    assert [r["kind"] for r in rows] == ["policy", "policy_lora"] and rows[1]["base_id"] == "base"
    assert json.loads(rows[1]["metrics_json"])["method"] == "flow_dpo"
    # the next round loads base + LoRA from this manifest, and the LoRA changes the velocity
    policy_cfg, lora, policy_id = policy_from_checkpoints(rows, layout, "test")
    assert policy_id == "lora-r01" and lora is not None
    tuned, base = load_sampler(policy_cfg.model_copy(update={"device": "cpu"}), lora), load_sampler(policy_cfg.model_copy(update={"device": "cpu"}), None)
    x = torch.randn((1, *base.latent_shape), generator=torch.Generator().manual_seed(1))
    text = base.encode_text([PROMPTS[0]])
    t = torch.tensor([0.5])
    assert not torch.allclose(tuned.velocity(x, t, text.embeddings, text.mask), base.velocity(x, t, text.embeddings, text.mask))
    assert (out.path / "figures" / "training_curves.png").stat().st_size > 1000


def test_labels_that_decide_nothing_keep_the_policy_unchanged(tmp_path):
    layout, inputs = tiny_round(tmp_path, n_pairs=4)
    out = layout.stage("finetune", round=1)
    out.path.mkdir(parents=True)
    cfg = FinetuneConfig(prefer="overall", train=PreferenceTrainConfig(steps=1, batch_size=2))
    # VQ now contradicts MQ in every pair: `overall` decides none of them
    rows = read_manifest(inputs["labels"].path, "labels", layout).rows()
    for r in rows:
        r["label_vq"] = "B" if r["label_mq"] == "A" else "A"
    bad = write_manifest(rows, "labels", inputs["labels"].path, layout, Lineage("label", {}, "y"))
    result = finetune.run({**inputs, "labels": bad}, cfg, layout, out, Lineage("finetune", {}, "x"))
    assert result.counts["pairs"] == 0 and result.counts["left_out_undecided"] == 4 and result.counts["policy_unchanged"] == 1
    kept = read_manifest(result.manifest.path, "checkpoints", layout).rows()
    assert kept == read_manifest(inputs["checkpoints"].path, "checkpoints", layout).rows()


def test_a_labelled_video_without_cached_latent_is_a_clear_error(tmp_path):
    layout, inputs = tiny_round(tmp_path, n_pairs=2)
    gens = read_manifest(inputs["generations"].path, "generations", layout).rows()
    gens[0]["latent_path"] = None
    bad = write_manifest(gens, "generations", inputs["generations"].path, layout, Lineage("generate", {}, "y"))
    cfg = FinetuneConfig(train=PreferenceTrainConfig(steps=1, batch_size=2))
    with pytest.raises(ValueError, match="no cached latent .* rerun generate with generate.write_latents=true"):
        finetune.run({**inputs, "generations": bad}, cfg, layout, layout.stage("finetune", round=1), Lineage("f", {}, "x"))
