"""The policy over diffusers' video transformers: tiny Wan and CogVideoX saved, loaded, LoRA'd, sampled."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
)

from models.policy import TRANSFORMER_CLASSES, Policy, PolicyConfig, build_tiny
from models.text_encoder import build_text_encoder

CAPTIONS = [
    "a red ball is thrown to the left and bounces twice",
    "a red ball and a yellow ball roll toward each other and collide",
    "a green ball falls",
    "a blue ball rolls to the right",
]
FAMILIES = ("wan", "cogvideox")
# Small enough for 2 cores: 2 layers of width 64 keep a forward pass at a few ms.
TINY = dict(layers=2, dim=64, head_dim=32)
PIPELINES = {
    "wan": (WanPipeline, FlowMatchEulerDiscreteScheduler),
    "cogvideox": (CogVideoXPipeline, CogVideoXDDIMScheduler),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    text = build_text_encoder(CAPTIONS, root / "text_encoder")
    paths = {f: build_tiny(f, root / f, text_len=text.max_length, **TINY) for f in FAMILIES}
    return root, paths


def load(saved, family: str) -> Policy:
    root, paths = saved
    return Policy.from_pretrained(
        PolicyConfig(family=family, transformer=str(paths[family]), text_encoder=str(root / "text_encoder"), device="cpu")
    )


def randomise_lora_b(policy: Policy, seed: int = 1) -> None:
    """A fresh LoRA has B = 0 (no effect); give it an effect so that tests can see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def probe(policy: Policy, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *policy.latent_shape), generator=g)
    t = torch.rand(batch, generator=g)
    text = policy.encode_text(CAPTIONS[:batch])
    return x, t, text


def velocity(policy: Policy, x, t, text) -> torch.Tensor:
    with torch.no_grad():
        return policy.velocity(x, t, text.embeddings, text.mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_round_trip_with_and_without_lora(saved, family, tmp_path):
    # 1. the base loads as the real diffusers class and is deterministic across loads
    a, b = load(saved, family), load(saved, family)
    assert type(a.transformer) is TRANSFORMER_CLASSES[family]
    x, t, text = probe(a)
    base = velocity(a, x, t, text)
    assert base.shape == x.shape  # latents stay (B, C, F, H, W) whatever the family's layout
    assert torch.equal(base, velocity(b, x, t, text))
    # 2. a LoRA saved and loaded into a fresh policy gives the same output, different from the base
    a.add_lora(rank=4, alpha=8)
    randomise_lora_b(a)
    tuned = velocity(a, x, t, text)
    a.save_lora(tmp_path)
    b.load_lora(tmp_path)
    assert torch.equal(tuned, velocity(b, x, t, text))
    assert not torch.allclose(tuned, base, atol=1e-4)
    assert all(p.requires_grad for p in b.lora_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapter_gives_the_base_exactly(saved, family):
    policy = load(saved, family)
    x, t, text = probe(policy)
    base = velocity(policy, x, t, text)
    policy.add_lora(rank=4, alpha=8)
    randomise_lora_b(policy)
    with policy.disable_adapter():
        assert torch.equal(velocity(policy, x, t, text), base)
    assert not torch.allclose(velocity(policy, x, t, text), base, atol=1e-4)
    assert all(p.requires_grad for p in policy.lora_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_lora_is_the_new_reference_and_saves_stacked(saved, family, tmp_path):
    """Round k's LoRA folded in: disabling the next adapter gives round k's policy, and the one
    saved LoRA (ranks stacked) loads over the base as the current policy, also in diffusers."""
    policy = load(saved, family)
    x, t, text = probe(policy)
    base = velocity(policy, x, t, text)
    policy.add_lora(rank=4, alpha=16)
    randomise_lora_b(policy, seed=1)
    first = velocity(policy, x, t, text)
    policy.fold_lora()
    assert not policy.has_lora
    torch.testing.assert_close(velocity(policy, x, t, text), first, rtol=0, atol=1e-5)
    policy.add_lora(rank=2, alpha=2)
    randomise_lora_b(policy, seed=2)
    second = velocity(policy, x, t, text)
    with policy.disable_adapter():
        torch.testing.assert_close(velocity(policy, x, t, text), first, rtol=0, atol=1e-5)
    assert not torch.allclose(second, first, atol=1e-4)
    policy.save_lora(tmp_path)
    fresh = load(saved, family)
    fresh.load_lora(tmp_path)
    torch.testing.assert_close(velocity(fresh, x, t, text), second, rtol=0, atol=1e-5)
    assert fresh.transformer.peft_config["default"].r == 6
    with fresh.disable_adapter():
        assert torch.equal(velocity(fresh, x, t, text), base)
    root, paths = saved
    pipeline_cls, scheduler_cls = PIPELINES[family]
    enc = policy.text_encoder
    pipe = pipeline_cls(tokenizer=enc.tokenizer, text_encoder=enc.model, vae=None,
                        transformer=TRANSFORMER_CLASSES[family].from_pretrained(paths[family]), scheduler=scheduler_cls())
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(velocity(Policy(policy.cfg, pipe.transformer, enc), x, t, text), second, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_with_the_diffusers_pipeline(saved, family, tmp_path):
    """diffusers' own `load_lora_weights` reads our file and changes the output as the peft model does."""
    root, paths = saved
    policy = load(saved, family)
    policy.add_lora(rank=4, alpha=16)  # alpha ≠ rank: the scale must come from the saved metadata
    randomise_lora_b(policy)
    policy.save_lora(tmp_path)
    x, t, text = probe(policy)
    ours = velocity(policy, x, t, text)

    pipeline_cls, scheduler_cls = PIPELINES[family]
    transformer = TRANSFORMER_CLASSES[family].from_pretrained(paths[family])
    enc = policy.text_encoder
    pipe = pipeline_cls(
        tokenizer=enc.tokenizer, text_encoder=enc.model, vae=None, transformer=transformer, scheduler=scheduler_cls()
    )
    pipe.load_lora_weights(tmp_path)
    theirs = Policy(policy.cfg, pipe.transformer, enc)
    torch.testing.assert_close(velocity(theirs, x, t, text), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_deterministic_per_seed_whatever_the_batch(saved, family):
    policy = load(saved, family)
    prompts, seeds = [CAPTIONS[0], CAPTIONS[2], CAPTIONS[3]], [7, 8, 9]
    batch = policy.sample_latents(prompts, seeds, steps=3, guidance=3.0)
    alone = policy.sample_latents([CAPTIONS[2]], [8], steps=3, guidance=3.0)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)  # BLAS blocking differs with batch size
    reordered = policy.sample_latents(prompts[::-1], seeds[::-1], steps=3, guidance=3.0)
    torch.testing.assert_close(batch[0], reordered[2], rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[2])  # other seeds, other videos
    videos = policy.sample(prompts[:1], seeds[:1], steps=3, guidance=3.0)
    assert videos.shape == (1, 8, 16, 16, 3) and videos.dtype.name == "uint8"
    assert abs(videos[0].astype(int) - policy.decode(batch[:1])[0]).max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_every_lora_parameter_and_no_base_parameter(saved, family):
    policy = load(saved, family)
    policy.add_lora(rank=4, alpha=8)
    base = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if ".lora_" not in n}
    lora = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if ".lora_" in n}
    x0 = policy.encode(policy.sample(CAPTIONS[:2], [0, 1], steps=1, guidance=1.0))
    opt = torch.optim.Adam(policy.lora_parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    # Two steps: B starts at zero, so A's gradient is zero until B has moved once.
    for _ in range(2):
        loss = policy.flow_matching_loss(x0, CAPTIONS[:2], generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(policy.transformer.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    unchanged = [n for n, v in lora.items() if torch.equal(after[n], v)]
    assert not unchanged, unchanged


def test_flow_matching_loss_by_hand(saved):
    """With t and ε given: x_t = (1-t)·x0 + t·ε, e = mean((v_θ(x_t) - (ε - x0))²) per sample."""
    policy = load(saved, "wan")
    x0, t, text = probe(policy, batch=3)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    expected = ((velocity(policy, x_t, t, text) - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    with torch.no_grad():
        got = policy.flow_matching_loss(x0, text, t=t, noise=noise)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_pixel_space_encode_decode_round_trip(saved):
    policy = load(saved, "wan")
    frames = torch.randint(0, 256, (2, 8, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    latents = policy.encode(frames)
    assert latents.shape == (2, 3, 8, 16, 16) and latents.min() >= -1 and latents.max() <= 1
    assert (policy.decode(latents) == frames.numpy()).all()
    with pytest.raises(ValueError, match=r"expected uint8 frames \(B, 8, 16, 16, 3\)"):
        policy.encode(frames[:, :4])


def test_wan_vae_latent_path(saved, tmp_path):
    """A latent-space Wan policy: frames through a tiny AutoencoderKLWan loaded by `from_pretrained`."""
    root, _ = saved
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    vae.save_pretrained(tmp_path / "vae")
    build_tiny("wan", tmp_path / "transformer", channels=16, frames=2, height=2, width=2, patch_size=(1, 1, 1), **TINY)
    cfg = PolicyConfig(
        family="wan",
        transformer=str(tmp_path / "transformer"),
        text_encoder=str(root / "text_encoder"),
        pixel_space=False,
        vae=str(tmp_path / "vae"),
        channels=16,
        frames=5,
        height=16,
        width=16,
        device="cpu",
    )
    policy = Policy.from_pretrained(cfg)
    assert policy.latent_shape == (16, 2, 2, 2)  # 5 frames -> 1 + 4/4; 16 px / 8
    frames = torch.randint(0, 256, (1, 5, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    latents = policy.encode(frames)
    assert latents.shape == (1, 16, 2, 2, 2)
    assert policy.flow_matching_loss(latents, CAPTIONS[:1]).shape == (1,)
    video = policy.sample(CAPTIONS[:1], [3], steps=2, guidance=2.0)
    assert video.shape == (1, 5, 16, 16, 3) and video.dtype.name == "uint8"
    with pytest.raises(ValueError, match="frames = 4k\\+1"):
        Policy.from_pretrained(cfg.model_copy(update={"frames": 6}))


def test_config_and_loading_errors_say_how_to_fix(saved, tmp_path):
    root, paths = saved
    common = dict(transformer=str(paths["wan"]), text_encoder=str(root / "text_encoder"), device="cpu")
    with pytest.raises(ValueError, match="set pixel_space=false"):
        PolicyConfig(family="wan", vae="some/vae", **common)
    with pytest.raises(ValueError, match="needs `vae`"):
        PolicyConfig(family="wan", pixel_space=False, channels=16, **common)
    with pytest.raises(ValueError, match="v-prediction"):
        PolicyConfig(family="cogvideox", pixel_space=False, vae="v", channels=16, **common)
    with pytest.raises(ValueError, match="extra"):
        PolicyConfig(family="wan", learning_rate=1.0, **common)
    with pytest.raises(OSError, match="AutoencoderKLWan"):
        Policy.from_pretrained(PolicyConfig(family="wan", pixel_space=False, vae=str(tmp_path / "no_vae"), channels=16, **common))
    with pytest.raises(OSError, match="build_tiny"):
        Policy.from_pretrained(PolicyConfig(family="wan", **{**common, "transformer": str(tmp_path / "nothing")}))
    with pytest.raises(ValueError, match=r"patch_size=\(1, 2, 2\)"):
        Policy.from_pretrained(PolicyConfig(family="wan", patch_size=(1, 2, 2), **common))
    policy = Policy.from_pretrained(PolicyConfig(family="wan", **common))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        with policy.disable_adapter():
            pass
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        policy.load_lora(tmp_path)
    with pytest.raises(ValueError, match="one seed per prompt"):
        policy.sample(CAPTIONS[:2], [1])


def test_policy_folder_paths_are_relative_inside_the_run_and_absolute_outside(tmp_path):
    """A policy folder stores local paths inside `within` (a run directory) relative to itself, so the
    run can move; a folder outside it (a shared model store) and a hub id stay as given."""
    from models.policy import PolicyConfig, load_policy_folder_config, save_policy_folder

    run, store = tmp_path / "run", tmp_path / "store"
    own, other = run / "round-01/finetune/policy", run / "bootstrap/policy/text_encoder"
    for d in (own / "transformer", other, store / "vae"):
        d.mkdir(parents=True)
    cfg = PolicyConfig(family="wan", transformer=str(own / "transformer"), text_encoder=str(other), vae=str(store / "vae"),
                       pixel_space=False)
    saved = json.loads(save_policy_folder(own, cfg, within=run).read_text())
    assert (saved["transformer"], saved["text_encoder"], saved["vae"]) == (
        "transformer", "../../../bootstrap/policy/text_encoder", str(store / "vae"))
    loaded = load_policy_folder_config(own)
    assert (loaded.text_encoder, loaded.vae) == (str(own / "../../../bootstrap/policy/text_encoder"), str(store / "vae"))
    # without `within`, only paths inside the folder itself are relative (bootstrap's case)
    alone = json.loads(save_policy_folder(own, cfg.model_copy(update={"text_encoder": "org/hub-id"})).read_text())
    assert (alone["transformer"], alone["text_encoder"], alone["vae"]) == ("transformer", "org/hub-id", str(store / "vae"))
