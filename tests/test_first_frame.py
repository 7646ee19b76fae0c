"""First-frame conditioning (HuViDPO): frame 0 held while sampling, generate's first frames, and
sparse-causal attention for the Wan family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from data_contracts import RunLayout
from models.policy import Policy, PolicyConfig, build_tiny
from models.sparse_causal_attention import SparseCausalWanAttnProcessor, sparse_causal_mask
from models.text_encoder import build_text_encoder
from tasks.generate import (
    GenerateConfig,
    ShardJob,
    first_frame_sources_from_file,
    first_frame_sources_from_selection,
    prepare_first_frames,
    sample_shard,
)
from tasks.video_io import read_image, write_image

PROMPTS = ["a red ball falls", "a blue ball rolls to the right"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ff")
    text = build_text_encoder(PROMPTS, root / "text_encoder")
    build_tiny("wan", root / "wan", text_dim=text.hidden_size, text_len=text.max_length, layers=2, dim=64, head_dim=32)
    return root


def policy(folders, **overrides) -> Policy:
    cfg = dict(family="wan", transformer=str(folders / "wan"), text_encoder=str(folders / "text_encoder"),
               device="cpu", steps=4, guidance_scale=2.0)
    return Policy.from_pretrained(PolicyConfig(**{**cfg, **overrides}))


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_first_frame_is_reproduced_exactly_and_the_rest_is_generated(folders):
    pol = policy(folders)
    given = images(2)
    plain = pol.sample(PROMPTS, [1, 2])
    held = pol.sample(PROMPTS, [1, 2], first_frame=given)
    np.testing.assert_array_equal(held[:, 0], given)
    assert not np.array_equal(plain[:, 0], given), "unconditioned samples do not start from the given frame"
    assert not np.array_equal(held[:, 1:], plain[:, 1:]), "frame 0 conditions the later frames"
    with pytest.raises(ValueError, match="one per prompt"):
        pol.sample(PROMPTS, [1, 2], first_frame=given[:1])
    with pytest.raises(ValueError, match="resize the first frames"):
        pol.sample(PROMPTS, [1, 2], first_frame=np.zeros((2, 8, 8, 3), np.uint8))


def test_per_frame_times_reach_each_frames_tokens(folders):
    pol = policy(folders)
    x = torch.randn(2, *pol.latent_shape, generator=torch.Generator().manual_seed(0))
    text = pol.encode_text(PROMPTS)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        scalar = pol.velocity(x, t, text.embeddings, text.mask)
        same = pol.velocity(x, t.view(-1, 1).repeat(1, x.shape[2]), text.embeddings, text.mask)
        frame0_clean = t.view(-1, 1).repeat(1, x.shape[2])
        frame0_clean[:, 0] = 0.0
        other = pol.velocity(x, frame0_clean, text.embeddings, text.mask)
    torch.testing.assert_close(same, scalar, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, scalar, atol=1e-4), "frame 0's time reaches the network"
    with pytest.raises(ValueError, match="per-frame t must be"):
        pol.velocity(x, torch.zeros(2, 3), text.embeddings, text.mask)


def test_clean_first_frame_training_loss_ignores_frame_0_and_sampling_holds_it(folders):
    pol = policy(folders, first_frame_mode="clean")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, *pol.latent_shape, generator=gen) * 2 - 1
    t, noise = torch.tensor([0.4, 0.4]), torch.randn(x0.shape, generator=gen)
    held = torch.tensor([True, False])
    with torch.no_grad():
        e = pol.flow_matching_loss(x0, PROMPTS, t=t, noise=noise, clean_first_frame=held)
        # frame 0 is given, not predicted: its noise must not enter a held row's input or error
        moved_noise = noise.clone()
        moved_noise[:, :, 0] += 1.0
        e2 = pol.flow_matching_loss(x0, PROMPTS, t=t, noise=moved_noise, clean_first_frame=held)
        plain = pol.flow_matching_loss(x0, PROMPTS, t=t, noise=noise)
    assert torch.isclose(e[0], e2[0], atol=1e-6), "a held row's frame 0 noise neither enters x_t nor the error"
    assert not torch.isclose(e[1], e2[1]), "an unheld row still learns frame 0"
    torch.testing.assert_close(e[1], plain[1])
    given = images(2)
    out = pol.sample(PROMPTS, [1, 2], first_frame=given)
    np.testing.assert_array_equal(out[:, 0], given)
    path = policy(folders).sample(PROMPTS, [1, 2], first_frame=given)
    assert not np.array_equal(out[:, 1:], path[:, 1:]), "clean mode samples differently from the noisy-path hold"
    with pytest.raises(ValueError, match="only the Wan family"):
        PolicyConfig(family="cogvideox", transformer="x", text_encoder="y", first_frame_mode="clean")


def test_sparse_causal_frame_i_depends_only_on_frames_0_i_minus_1_and_i():
    torch.manual_seed(0)
    frames, tokens, dim = 5, 4, 32
    attn = WanAttention(dim=dim, heads=2, dim_head=16, processor=WanAttnProcessor()).eval()
    sparse = SparseCausalWanAttnProcessor(tokens)
    x = torch.randn(1, frames * tokens, dim)

    def out(proc, h):
        attn.set_processor(proc)
        with torch.no_grad():
            return attn(h).view(1, frames, tokens, dim)

    base = out(sparse, x)
    for i in range(frames):
        for j in range(frames):
            y = x.clone().view(1, frames, tokens, dim)
            y[:, j] += torch.randn(1, tokens, dim)
            moved = not torch.allclose(out(sparse, y.view(1, -1, dim))[:, i], base[:, i], atol=1e-6)
            assert moved == (j in {0, max(i - 1, 0), i}), (i, j)
    # the full processor lets every frame see every other (so the check above can fail)
    y = x.clone().view(1, frames, tokens, dim)
    y[:, 2] += 1.0
    assert not torch.allclose(out(WanAttnProcessor(), y.view(1, -1, dim))[:, 4], out(WanAttnProcessor(), x)[:, 4])
    mask = sparse_causal_mask(3, 1)
    assert mask.tolist() == [[True, False, False], [True, False, False], [True, True, False]]


def test_sparse_causal_policy_option(folders):
    pol = policy(folders, attention="sparse_causal")
    procs = [b.attn1.processor for b in pol.transformer.blocks]
    assert all(isinstance(p, SparseCausalWanAttnProcessor) and p.tokens_per_frame == 16 for p in procs)
    assert all(not isinstance(b.attn2.processor, SparseCausalWanAttnProcessor) for b in pol.transformer.blocks)
    full = policy(folders)
    assert not np.array_equal(pol.sample(PROMPTS, [1, 2]), full.sample(PROMPTS, [1, 2]))
    with pytest.raises(ValueError, match="Wan family"):
        PolicyConfig(family="cogvideox", transformer="x", text_encoder="y", attention="sparse_causal")


def test_first_frame_sources_and_generate_shard(folders, tmp_path):
    # 1. from selection: the first selected clip of the caption; a prompt without one is an error
    rows = [
        {"video_id": "b", "video_path": "b.mp4", "caption": PROMPTS[0], "selected": True},
        {"video_id": "a", "video_path": "a.mp4", "caption": PROMPTS[0], "selected": True},
        {"video_id": "c", "video_path": "c.mp4", "caption": PROMPTS[1], "selected": False},
    ]
    assert first_frame_sources_from_selection(PROMPTS[:1], rows, "sel") == {PROMPTS[0]: "a.mp4"}
    with pytest.raises(ValueError, match="no selected real video"):
        first_frame_sources_from_selection(PROMPTS, rows, "sel")
    # 2. from a file: the images are copied as PNGs and held by the sampler
    given = images(2, seed=3)
    for k in range(2):
        write_image(tmp_path / f"img{k}.png", given[k])
    mapping = tmp_path / "frames.json"
    mapping.write_text(json.dumps({PROMPTS[0]: "img0.png", PROMPTS[1]: str(tmp_path / "img1.png")}))
    layout = RunLayout(tmp_path / "runs", "ff")
    out = layout.stage("generate", round=1)
    pol = policy(folders)
    cfg = GenerateConfig(first_frame="file", first_frame_file=str(mapping))
    frames = prepare_first_frames(PROMPTS, {}, cfg, pol.cfg, layout, out)
    assert set(frames) == set(PROMPTS)
    np.testing.assert_array_equal(read_image(frames[PROMPTS[1]]), given[1])
    items = [{"generation_id": f"g{k}", "prompt_id": "p", "prompt": p, "sample_index": 0, "seed": k,
              "first_frame_path": frames[p]} for k, p in enumerate(PROMPTS)]
    job = ShardJob(0, items, str(tmp_path / "v"), None, str(tmp_path / "r.json"), "key", 4, 2.0, 2, 8.0)
    record = sample_shard(pol, job)
    assert [r["first_frame_path"] for r in record["rows"]] == [frames[p] for p in PROMPTS]
    with pytest.raises(ValueError, match="no image for"):
        first_frame_sources_from_file(PROMPTS + ["a green ball"], mapping)


@pytest.mark.parametrize("conditioned, mode", [(False, "path"), (True, "path"), (True, "clean")])
def test_finetune_drops_frame_0_when_generations_were_first_frame_conditioned(tmp_path, monkeypatch, conditioned, mode):
    from data_contracts import Lineage, read_manifest, write_manifest
    from models.policy import load_policy_folder_config, save_policy_folder
    from models.preference_training import PreferenceTrainConfig
    from tasks import finetune
    from tests.test_finetune import tiny_round

    layout, inputs = tiny_round(tmp_path, n_pairs=2)
    folder = layout.stage("bootstrap").files("policy")
    saved = load_policy_folder_config(folder)
    save_policy_folder(folder, saved.model_copy(update={"first_frame_mode": mode}))
    if conditioned:
        gens = read_manifest(inputs["generations"].path, "generations", layout).rows()
        png = write_image(layout.stage("generate", round=1).files("first_frames") / "p.png", images(1)[0])
        for g in gens:
            g["first_frame_path"] = layout.stored_path(png)
        inputs["generations"] = write_manifest(gens, "generations", inputs["generations"].path, layout,
                                               Lineage("generate", {}, "ff"))
    seen = []
    real = finetune.train_and_save
    monkeypatch.setattr(finetune, "train_and_save", lambda job, **kw: seen.append(job.train) or real(job, **kw))
    cfg = finetune.FinetuneConfig(real_clips=finetune.RealClipConfig(steps=0), backend="local", train=PreferenceTrainConfig(steps=1, batch_size=2))
    out = layout.stage("finetune", round=1)
    out.path.mkdir(parents=True)
    finetune.run(inputs, cfg, layout, out, Lineage("finetune", {}, cfg.hash()), round=1)
    assert [t.exclude_first_frame for t in seen] == [conditioned]
    # a policy that holds a given frame clean is trained with it held that way (frame 0 at t = 0)
    assert [t.hold_first_frame for t in seen] == [conditioned and mode == "clean"]
