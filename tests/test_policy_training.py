"""Training the tiny base policy: weights move, the loss falls, saving round-trips, judging reports rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.physics_world import WorldSpec, make_clip
from models.policy import build_tiny
from models.policy_training import (
    BasePolicyTrainConfig,
    frame_strip_png,
    judge_samples,
    load_policy,
    lr_factor,
    sample_timesteps,
    train_base_policy,
    wilson_interval,
)
from models.text_encoder import build_text_encoder

SPEC = WorldSpec()
# 2 layers of width 64: a step on 16 clips takes a few ms on 2 cores.
TINY = dict(layers=2, dim=64, head_dim=32, batch_size=8, lr=3e-3, warmup_steps=0, seed=0)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    made = [make_clip(rng, SPEC, violation="teleport" if i % 4 == 0 else None) for i in range(16)]
    return [c.frames for c in made], [c.caption for c in made]


def fixed_batch_loss(policy, frames, captions) -> float:
    """The loss on all 16 clips with t and ε fixed by a seed, so two policies see the same problem."""
    g = torch.Generator().manual_seed(123)
    x0 = policy.encode(np.stack(frames))
    t = torch.rand(len(frames), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return float(policy.flow_matching_loss(x0, list(captions), t=t, noise=noise).mean())


def untrained_policy(captions, out_dir):
    """The weights `train_base_policy` starts from: the same builders with the same seed."""
    text = build_text_encoder(sorted(set(captions)), out_dir / "text_encoder", seed=TINY["seed"])
    build_tiny("wan", out_dir / "transformer", text_dim=text.hidden_size, text_len=text.max_length,
               layers=TINY["layers"], dim=TINY["dim"], head_dim=TINY["head_dim"], seed=TINY["seed"])
    return load_policy(out_dir)


def test_training_changes_every_weight_and_lowers_the_loss(clips, tmp_path):
    frames, captions = clips
    untrained = untrained_policy(captions, tmp_path / "untrained")
    trained, info = train_base_policy(frames, captions, tmp_path / "trained", BasePolicyTrainConfig(steps=40, **TINY))
    assert info["steps_done"] == 40 and not info["stopped_early"]
    assert info["params"] == sum(p.numel() for p in trained.transformer.parameters())
    # 1. every trainable parameter moved (trl's smoke test)
    before = dict(untrained.transformer.named_parameters())
    for name, p in trained.transformer.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    # 2. the loss on one fixed batch fell
    assert fixed_batch_loss(trained, frames, captions) < 0.8 * fixed_batch_loss(untrained, frames, captions)


def test_saved_policy_samples_the_same_videos(clips, tmp_path):
    frames, captions = clips
    policy, _ = train_base_policy(frames, captions, tmp_path, BasePolicyTrainConfig(steps=3, **TINY))
    loaded = load_policy(tmp_path)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    prompts, seeds = captions[:2], [7, 8]
    a = policy.sample(prompts, seeds, steps=4)
    b = loaded.sample(prompts, seeds, steps=4)
    assert a.shape == (2, 8, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_training_continues_from_a_saved_policy_and_leaves_it_alone(clips, tmp_path):
    frames, captions = clips
    first, _ = train_base_policy(frames, captions, tmp_path / "first", BasePolicyTrainConfig(steps=40, **TINY))
    saved = (tmp_path / "first" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    cfg = BasePolicyTrainConfig(steps=5, init_from=str(tmp_path / "first"), **{**TINY, "lr": 1e-4})
    more, _ = train_base_policy(frames, captions, tmp_path / "more", cfg)
    fresh, _ = train_base_policy(frames, captions, tmp_path / "fresh", BasePolicyTrainConfig(steps=5, **TINY))
    # 1. it started from the saved weights: 5 small steps keep it near them, far from a fresh start
    near = max(float((a - b).abs().max()) for a, b in zip(more.transformer.parameters(), first.transformer.parameters(), strict=True))
    far = max(float((a - b).abs().max()) for a, b in zip(fresh.transformer.parameters(), first.transformer.parameters(), strict=True))
    assert 0 < near < 0.05 * far
    assert fixed_batch_loss(more, frames, captions) < 0.8 * fixed_batch_loss(fresh, frames, captions)
    # 2. the source is untouched and the text encoder is the same one
    assert (tmp_path / "first" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == saved
    assert (tmp_path / "more" / "text_encoder" / "tokenizer.json").read_bytes() == (
        tmp_path / "first" / "text_encoder" / "tokenizer.json").read_bytes()
    with pytest.raises(FileNotFoundError, match="no text_encoder/"):
        train_base_policy(frames, captions, tmp_path / "x", BasePolicyTrainConfig(steps=1, init_from=str(tmp_path / "nothing"), **TINY))


def test_time_budget_stops_training_early_and_says_so(clips, tmp_path):
    frames, captions = clips
    cfg = BasePolicyTrainConfig(steps=10_000, time_budget_s=0.5, **TINY)
    _, info = train_base_policy(frames, captions, tmp_path, cfg)
    assert info["stopped_early"] and 0 < info["steps_done"] < 10_000
    assert "time budget" in info["stop_reason"]
    assert (tmp_path / "transformer" / "config.json").is_file()


def test_judge_samples_reports_rates_inside_their_intervals(clips, tmp_path):
    frames, captions = clips
    policy, _ = train_base_policy(frames, captions, tmp_path, BasePolicyTrainConfig(steps=2, **TINY))
    result = judge_samples(policy, captions[:4], [0, 1, 2, 3], SPEC)
    assert result["n"] == 4 and len(result["frames"]) == 4
    for rate in ("plausibility", "caption_agreement"):
        low, high = result[f"{rate}_ci"]
        assert 0.0 <= low <= result[rate] <= high <= 1.0
    png = frame_strip_png(result["frames"], tmp_path / "strip.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_frame_training_gives_a_policy_that_holds_a_clean_frame(clips, tmp_path):
    frames, captions = clips
    plain, _ = train_base_policy(frames, captions, tmp_path / "plain",
                                 BasePolicyTrainConfig(steps=3, first_frame_rate=0.0, **TINY))
    held, _ = train_base_policy(frames, captions, tmp_path / "held",
                                BasePolicyTrainConfig(steps=3, first_frame_rate=0.5, **TINY))
    assert plain.cfg.first_frame_mode == "path" and held.cfg.first_frame_mode == "clean"
    assert load_policy(tmp_path / "held", first_frame_mode="clean").cfg.first_frame_mode == "clean"
    w_plain = dict(plain.transformer.named_parameters())
    assert any(not torch.equal(p, w_plain[n]) for n, p in held.transformer.named_parameters()), \
        "rows trained with frame 0 held change what is learnt"
    given = [f[0] for f in frames[:4]]
    result = judge_samples(held, captions[:4], [0, 1, 2, 3], SPEC, first_frames=given)
    assert result["frame0_exact"] == 4
    assert judge_samples(held, captions[:4], [0, 1, 2, 3], SPEC)["frame0_exact"] is None


def test_wilson_interval_by_hand():
    """n=10, k=5, z=1.96: centre 0.5, half = 1.96·sqrt(0.025 + 0.0096)/1.384 = 0.2634 → (0.2366, 0.7634)."""
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_schedule_and_timesteps():
    cfg = BasePolicyTrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=0.01)
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        t = sample_timesteps(1000, kind, g)
        assert ((t > 0) & (t < 1)).all()
    with pytest.raises(ValueError, match="uniform"):
        sample_timesteps(2, "cosine", g)


def test_config_rejects_unknown_fields_and_bad_widths():
    with pytest.raises(ValueError):
        BasePolicyTrainConfig(stpes=10)
    with pytest.raises(ValueError, match="head_dim"):
        BasePolicyTrainConfig(dim=100, head_dim=32)
