"""`finetune` as a stage: which way labelled pairs point, and a LoRA trained from cached latents that
the next round's `generate` loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_contracts import Lineage, RunLayout, read_manifest, write_manifest
from models.policy import LORA_WEIGHT_NAME, PolicyConfig, build_tiny, save_policy_folder
from models.preference_training import METRICS_FILE, PreferenceTrainConfig, _Rows
from models.text_encoder import build_text_encoder
from tasks import finetune
from tasks.finetune import FinetuneConfig, RealClipConfig, orient, preference_pairs
from tasks.generate import load_sampler, policy_from_checkpoints

PROMPTS = ["a red ball falls", "a blue ball rolls to the right"]
# rounds without a `selection` input: no real-clip phase (its own test below)
NO_REAL = RealClipConfig(steps=0)
HELDOUT = "a green ball bounces"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module's Ray Train runs (the stage joins it rather than starting its own)."""
    from infra.ray_cluster import ray_session

    with ray_session(num_cpus=2):
        yield


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


def test_finetune_writes_a_lora_the_next_round_samples_with(tmp_path, ray_local):
    layout, inputs = tiny_round(tmp_path)
    cfg = FinetuneConfig(real_clips=NO_REAL, train=PreferenceTrainConfig(steps=20, batch_size=4, lr=1e-3), backend="local")
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


@pytest.mark.parametrize("reference_policy", ["previous_round", "base"])
def test_round_two_reference_moves_to_the_previous_round_or_stays(tmp_path, reference_policy):
    """Round 2 trains on round 1's checkpoints: with `previous_round` round 1's LoRA is folded in and
    a fresh one trains against that policy (logged); either way one LoRA over the base comes out
    and its round-2 policy differs from round 1's."""
    layout, inputs = tiny_round(tmp_path)
    cfg = FinetuneConfig(real_clips=NO_REAL, train=PreferenceTrainConfig(steps=10, batch_size=4, lr=1e-3, lora_rank=4),
                         backend="local", reference_policy=reference_policy)
    results = {}
    for rnd in (1, 2):
        out = layout.stage("finetune", round=rnd)
        out.path.mkdir(parents=True)
        results[rnd] = finetune.run(inputs, cfg, layout, out, Lineage("finetune", {}, cfg.hash()), round=rnd)
        inputs = {**inputs, "checkpoints": results[rnd].manifest}
    moved = reference_policy == "previous_round"
    assert results[1].counts["reference_moved"] == 0 and results[2].counts["reference_moved"] == int(moved)
    row = read_manifest(results[2].manifest.path, "checkpoints", layout).rows()[1]
    assert json.loads(row["metrics_json"])["reference"] == ("lora-r01" if moved else "base") and row["base_id"] == "lora-r01"
    saved = load_file(str(layout.resolve(row["path"]) / LORA_WEIGHT_NAME))
    ranks = {v.shape[0] for k, v in saved.items() if k.endswith("lora_A.weight")}
    assert ranks == ({8} if moved else {4}), "a moved reference stacks round 1's rank-4 LoRA with round 2's"
    policies = []
    for rnd in (1, 2):
        rows = read_manifest(results[rnd].manifest.path, "checkpoints", layout).rows()
        policy_cfg, lora, _ = policy_from_checkpoints(rows, layout, "test")
        policies.append(load_sampler(policy_cfg.model_copy(update={"device": "cpu"}), lora))
    x = torch.randn((1, *policies[0].latent_shape), generator=torch.Generator().manual_seed(1))
    text = policies[0].encode_text([PROMPTS[0]])
    v1, v2 = (p.velocity(x, torch.tensor([0.5]), text.embeddings, text.mask) for p in policies)
    assert not torch.allclose(v1, v2, atol=1e-6)


def test_labels_that_decide_nothing_keep_the_policy_unchanged(tmp_path):
    layout, inputs = tiny_round(tmp_path, n_pairs=4)
    out = layout.stage("finetune", round=1)
    out.path.mkdir(parents=True)
    cfg = FinetuneConfig(real_clips=NO_REAL, prefer="overall", train=PreferenceTrainConfig(steps=1, batch_size=2), backend="local")
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
    cfg = FinetuneConfig(real_clips=NO_REAL, train=PreferenceTrainConfig(steps=1, batch_size=2), backend="local")
    with pytest.raises(ValueError, match="no cached latent .* rerun generate with generate.write_latents=true"):
        finetune.run({**inputs, "generations": bad}, cfg, layout, layout.stage("finetune", round=1), Lineage("f", {}, "x"))


def _finetune(layout, inputs, cfg, name: str, on_step=None):
    out = layout.variant("finetune", 1, name)
    out.path.mkdir(parents=True)
    result = finetune.run(inputs, cfg, layout, out, Lineage("finetune", {}, cfg.hash()), round=1, on_step=on_step)
    rows = read_manifest(result.manifest.path, "checkpoints", layout).rows()
    lora_dir = layout.resolve(rows[1]["path"])
    return out, load_file(str(lora_dir / LORA_WEIGHT_NAME)), json.loads((lora_dir / METRICS_FILE).read_text())


def test_ray_train_gives_the_lora_local_gives(tmp_path, ray_local):
    """One Ray Train worker runs the same code on the same data: the same LoRA, bit for bit, and
    the same per-step records, which reach on_step after training."""
    layout, inputs = tiny_round(tmp_path)
    train = PreferenceTrainConfig(steps=4, batch_size=4, lr=1e-3)
    steps = []
    _, local, local_metrics = _finetune(layout, inputs, FinetuneConfig(real_clips=NO_REAL, train=train, backend="local"), "local")
    out, ray, ray_metrics = _finetune(layout, inputs, FinetuneConfig(real_clips=NO_REAL, train=train, backend="ray_train"), "ray",
                                      on_step=steps.append)
    assert local.keys() == ray.keys() and all(torch.equal(local[k], ray[k]) for k in local)
    assert any(t.abs().sum() > 0 for k, t in ray.items() if "lora_B" in k), "the LoRA trained"
    assert ray_metrics["history"] == local_metrics["history"] == steps
    assert "distributed" not in ray_metrics, "one worker is the single-process path"
    assert (out.files("ray_train") / "finetune").is_dir(), "Ray Train's run state lives under the stage folder"
    # the default (auto) trains one worker without a cluster address in this process: the same LoRA
    auto_out, auto, _ = _finetune(layout, inputs, FinetuneConfig(real_clips=NO_REAL, train=train), "auto")
    assert all(torch.equal(auto[k], local[k]) for k in local) and not (auto_out.path / "ray_train").exists()


@pytest.mark.parametrize("method", ["flow_dpo", "kto"])
def test_two_workers_train_with_ddp_on_disjoint_rows(tmp_path, ray_local, method):
    """Two CPU workers (DDP over gloo): each takes its half of every global batch, the gradients and
    KTO's reference point are all-reduced, so the LoRA is the one a single process trains on the
    same batches (up to float summation order); only rank 0 wrote the LoRA and metrics."""
    layout, inputs = tiny_round(tmp_path)
    train = PreferenceTrainConfig(method=method, steps=3, batch_size=4, lr=1e-3)
    _, local, local_metrics = _finetune(layout, inputs, FinetuneConfig(real_clips=NO_REAL, train=train, backend="local"), "local")
    out, ddp, ddp_metrics = _finetune(layout, inputs, FinetuneConfig(real_clips=NO_REAL, train=train, workers=2), "ddp")
    # 1. each step's global batch split between the ranks, disjoint, the same batches as one process
    dist_info = ddp_metrics["distributed"]
    assert dist_info["world_size"] == 2 and dist_info["rank"] == 0, "rank 0 wrote metrics.json"
    rank0, rank1 = dist_info["rows_by_rank"]
    assert len(rank0) == len(rank1) == 3
    gen = torch.Generator().manual_seed(train.seed)
    rows_of = _Rows(16 if method == "kto" else 8, train.batch_size, gen)
    for step, (a, b) in enumerate(zip(rank0, rank1, strict=True)):
        assert len(a) == len(b) == 2 and not set(a) & set(b), f"step {step}: the ranks share rows {a} {b}"
        if method == "flow_dpo" and step == 0:  # later draws also depend on t, ε of earlier steps
            assert a + b == rows_of.next().tolist()
    # 2. the same training as one process: per-step losses and the LoRA agree closely
    for mine, ref in zip(ddp_metrics["history"], local_metrics["history"], strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
        if method == "kto":
            assert mine["reference_point"] == pytest.approx(ref["reference_point"], rel=1e-4, abs=1e-7)
    assert ddp.keys() == local.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], local[k], rtol=1e-3, atol=1e-5)
    assert any(t.abs().sum() > 0 for k, t in ddp.items() if "lora_B" in k), "the LoRA trained"
    # 3. the stage folder holds what rank 0 wrote and Ray Train's run state, nothing per worker
    assert sorted(p.name for p in out.files("lora").iterdir()) == sorted([LORA_WEIGHT_NAME, METRICS_FILE])
    assert sorted(p.name for p in out.path.iterdir()) == ["figures", "lora", "manifest.parquet", "ray_train"]


def test_more_workers_than_the_batch_splits_into_is_refused():
    with pytest.raises(ValueError, match="batch_size=3 does not split over finetune.workers=2"):
        FinetuneConfig(train=PreferenceTrainConfig(batch_size=3), workers=2)
    with pytest.raises(ValueError, match="needs finetune.backend=ray_train"):
        FinetuneConfig(workers=2, backend="local")


def with_selection(layout, inputs, clips_per_prompt: int = 2):
    """A `selection` manifest with bright real clips of the first prompt only (selected), plus a
    rejected clip of it, a clip of another shape and a selected clip of a held-out prompt."""
    import numpy as np

    from tasks.video_io import write_video

    sel = layout.stage("select")
    rows = []
    for i, (caption, selected, size) in enumerate(
        [(PROMPTS[0], True, 16)] * clips_per_prompt + [(PROMPTS[0], False, 16), (PROMPTS[0], True, 32), (HELDOUT, True, 16)]
    ):
        path = sel.files("clips") / f"real{i}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, np.full((8, size, size, 3), 200 + i, dtype=np.uint8), fps=8.0)
        rows.append({"video_id": f"real{i}", "video_path": layout.stored_path(path), "caption": caption,
                     "split": "heldout" if caption == HELDOUT else "train",
                     **{f"score_{k}": None for k in ("motion", "static", "scene_cut", "flicker", "sharpness", "quality",
                                                     "clip", "physics", "caption")},
                     "final_score": 1.0, "passed_json": "{}", "reason": None if selected else "blurry",
                     "selected": selected})
    ref = write_manifest(rows, "selection", sel.manifest_path, layout, Lineage("select", {}, "x"))
    return {**inputs, "selection": ref}


def test_real_winners_add_one_instance_pair_per_pair_with_a_real_clip(tmp_path, monkeypatch):
    """PhysHPO's instance level: each usable pair's loser also loses to a selected real clip of its
    prompt. Only the first prompt has clips (of the policy's shape, selected), so only its 4 pairs
    get one; they take its two clips in turn; the worker encodes the clips."""
    layout, inputs = tiny_round(tmp_path)
    inputs = with_selection(layout, inputs)
    seen = {}

    def capture(policy, data, cfg, **kw):
        seen["data"] = data
        return real_train(policy, data, cfg, **kw)

    real_train = finetune.train_preference
    monkeypatch.setattr(finetune, "train_preference", capture)
    cfg = FinetuneConfig(real_clips=NO_REAL, train=PreferenceTrainConfig(steps=2, batch_size=4), backend="local", real_winners=True)
    out = layout.stage("finetune", round=1)
    out.path.mkdir(parents=True)
    result = finetune.run(inputs, cfg, layout, out, Lineage("finetune", {}, cfg.hash()), round=1)
    assert result.counts["pairs"] == 8 and result.counts["real_winner_pairs"] == 4
    data = seen["data"]
    assert len(data.prompts) == 12 and data.prompts[8:] == [PROMPTS[0]] * 4
    # the real winners are the two bright selected clips in turn, as decoded (mp4 moves 200 a little) and
    # encoded to [-1, 1]; the losers are the dark latents of those pairs
    from tasks.video_io import read_video

    decoded = [read_video(layout.stage("select").files("clips") / f"real{i}.mp4").mean() / 127.5 - 1 for i in (0, 1)]
    levels = data.chosen[8:].mean(dim=(1, 2, 3, 4))
    assert torch.allclose(levels, torch.tensor(decoded * 2, dtype=levels.dtype), atol=1e-3) and decoded[0] != decoded[1]
    assert (data.rejected[8:].mean(dim=(1, 2, 3, 4)) < 0).all()
    assert torch.equal(data.rejected[8:], data.rejected[[0, 2, 4, 6]])
    with pytest.raises(ValueError, match="real_winners adds pairs, and finetune.train.method=sft does not train on pairs"):
        FinetuneConfig(train=PreferenceTrainConfig(method="sft"), real_winners=True)


def test_real_videos_are_the_selected_training_clips_of_the_policy_shape(tmp_path):
    """λ2's real clips: selected, of the policy's shape, and never a held-out prompt's clip."""
    layout, inputs = tiny_round(tmp_path)
    inputs = with_selection(layout, inputs, clips_per_prompt=3)
    policy_cfg, _, _ = policy_from_checkpoints(read_manifest(inputs["checkpoints"].path, "checkpoints", layout).rows(),
                                               layout, "test")
    frames, captions = finetune.real_videos(inputs, policy_cfg, None, layout)
    assert frames.shape == (3, 8, 16, 16, 3) and captions == [PROMPTS[0]] * 3
    frames, _ = finetune.real_videos(inputs, policy_cfg, 2, layout)
    assert len(frames) == 2


def test_the_real_clip_phase_trains_every_weight_and_the_next_round_starts_from_it(tmp_path):
    """finetune.real_clips: the round's policy is trained in full on the selected real training clips,
    saved as its own policy folder (the LoRA's base and the DPO reference); round 2 starts from round
    1's policy with its LoRA merged in."""
    from models.policy import Policy, load_policy_folder_config
    from models.preference_training import PreferenceTrainConfig as PT
    layout, inputs = tiny_round(tmp_path)
    inputs = with_selection(layout, inputs, clips_per_prompt=3)
    cfg = FinetuneConfig(train=PT(steps=3, batch_size=4, lr=1e-3, lora_rank=4), backend="local",
                         real_clips=RealClipConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=0))
    results = {}
    for rnd in (1, 2):
        if rnd == 2:  # a phase that barely moves: round 2's full weights are round 1's policy, LoRA merged
            cfg = cfg.model_copy(update={"real_clips": RealClipConfig(steps=1, lr=1e-12, warmup_steps=0, ema_decay=None)})
        out = layout.stage("finetune", round=rnd)
        out.path.mkdir(parents=True)
        results[rnd] = finetune.run(inputs, cfg, layout, out, Lineage("finetune", {}, cfg.hash()), round=rnd)
        inputs = {**inputs, "checkpoints": results[rnd].manifest}
    assert results[1].counts["real_clips"] == 3 and results[1].counts["real_clip_steps"] == 6
    assert results[1].counts["reference_moved"] == 1 and results[1].metrics["compute_s"] > results[1].metrics["real_clip_seconds"]
    rows = read_manifest(results[1].manifest.path, "checkpoints", layout).rows()
    assert [(r["checkpoint_id"], r["kind"], r["base_id"]) for r in rows] == [
        ("policy-r01", "policy", "base"), ("lora-r01", "policy_lora", "policy-r01")]
    assert json.loads(rows[1]["metrics_json"])["reference"] == "policy-r01"
    folder = layout.resolve(rows[0]["path"])
    saved = json.loads((folder / "policy.json").read_text())
    assert saved["transformer"] == "transformer" and saved["text_encoder"] == "../../../bootstrap/policy/text_encoder"
    # 1. every weight moved from the base, and no LoRA layer was saved with them
    cpu = {"device": "cpu"}
    base_cfg = policy_from_checkpoints(read_manifest(layout.stage("bootstrap").manifest_path, "checkpoints", layout).rows(), layout, "t")[0]
    base = Policy.from_pretrained(base_cfg.model_copy(update=cpu))
    tuned = Policy.from_pretrained(load_policy_folder_config(folder).model_copy(update=cpu))
    before = dict(base.transformer.named_parameters())
    assert set(before) == {n for n, _ in tuned.transformer.named_parameters()}
    assert all(not torch.equal(p, before[n]) for n, p in tuned.transformer.named_parameters())
    # 2. round 2 started from round 1's policy: its full weights are round 1's with the LoRA merged in
    r1_cfg, r1_lora, _ = policy_from_checkpoints(rows, layout, "t")
    r1 = load_sampler(r1_cfg.model_copy(update=cpu), r1_lora)
    r2_rows = read_manifest(results[2].manifest.path, "checkpoints", layout).rows()
    assert r2_rows[0]["base_id"] == "lora-r01"
    r2_start = Policy.from_pretrained(load_policy_folder_config(layout.resolve(r2_rows[0]["path"])).model_copy(update=cpu))
    x = torch.randn((1, *r1.latent_shape), generator=torch.Generator().manual_seed(1))
    text = r1.encode_text([PROMPTS[0]])
    v1, v2 = (p.velocity(x, torch.tensor([0.5]), text.embeddings, text.mask) for p in (r1, r2_start))
    assert torch.allclose(v1, v2, atol=1e-5)
    with pytest.raises(ValueError, match="no base for the LoRA to keep training against"):
        FinetuneConfig(real_clips=RealClipConfig(steps=1), reference_policy="base")
