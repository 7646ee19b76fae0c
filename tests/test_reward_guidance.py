"""Reward guidance (Flow-NRG): w = 0 is plain sampling, guidance raises the reward, the guard clips
and reports, and a real (tiny, noisy-latent) reward model guides through `from_reward_model`."""

from __future__ import annotations

import logging

import pytest
import torch

from models.policy import Policy, PolicyConfig, build_tiny
from models.reward_guidance import RewardGuidance, RewardGuidanceConfig, parse_weights
from models.reward_model import Normalisation, RewardModel, RewardModelConfig
from models.text_encoder import build_text_encoder

PROMPTS = ["a red ball falls", "a blue ball rolls to the right", "a green ball falls", "a red ball falls"]
SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def pol(tmp_path_factory) -> Policy:
    root = tmp_path_factory.mktemp("guide")
    text = build_text_encoder(PROMPTS, root / "text_encoder")
    build_tiny("wan", root / "wan", text_dim=text.hidden_size, text_len=text.max_length, layers=2, dim=64, head_dim=32)
    return Policy.from_pretrained(PolicyConfig(family="wan", transformer=str(root / "wan"),
                                               text_encoder=str(root / "text_encoder"), device="cpu", steps=6,
                                               guidance_scale=2.0))


def brightness(x: torch.Tensor, t: float, prompts) -> torch.Tensor:
    """A toy reward: the mean value of the video (brighter is better)."""
    return x.flatten(1).mean(1)


def test_weight_zero_equals_plain_sampling(pol):
    steer = RewardGuidance(brightness, RewardGuidanceConfig(scale=0.0), "clean_x0")
    plain = pol.sample_latents(PROMPTS, SEEDS)
    guided = pol.sample_latents(PROMPTS, SEEDS, reward_guidance=steer)
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)
    assert steer.stats["corrections"] == len(SEEDS) * 5, "every step but t = 1 is guided"


@pytest.mark.parametrize("mode", ["clean_x0", "noisy"])
def test_guidance_raises_a_toy_reward(pol, mode):
    plain = pol.sample_latents(PROMPTS, SEEDS).float()
    cfg = RewardGuidanceConfig(scale=50.0, max_ratio=10.0)  # ∇ of a mean over 768 values is 1/768 each
    guided = pol.sample_latents(PROMPTS, SEEDS, reward_guidance=RewardGuidance(brightness, cfg, mode)).float()
    gain = brightness(guided, 0, PROMPTS) - brightness(plain, 0, PROMPTS)
    assert bool((gain > 0.005).all()), gain  # measured 0.012 per video; w = 0 gives exactly 0


def test_clip_guard_fires_and_is_reported(pol, caplog):
    steer = RewardGuidance(brightness, RewardGuidanceConfig(scale=1e4, max_ratio=0.5), "clean_x0")
    with caplog.at_level(logging.WARNING, logger="models.reward_guidance"):
        pol.sample_latents(PROMPTS, SEEDS, reward_guidance=steer)
    assert steer.stats["clipped"] == steer.stats["corrections"] == 20
    assert "20 of 20 corrections clipped" in caplog.text
    assert steer.summary()["guidance_clipped_share"] == 1.0
    # a non-finite gradient is dropped (counted), leaving the step unguided
    explode = RewardGuidance(lambda x, t, p: (x * float("inf")).flatten(1).sum(1), RewardGuidanceConfig(scale=1.0), "noisy")
    torch.testing.assert_close(pol.sample_latents(PROMPTS, SEEDS, reward_guidance=explode), pol.sample_latents(PROMPTS, SEEDS))
    assert explode.stats["nonfinite"] == 20


def test_guidance_from_a_noisy_latent_reward_model(pol, tmp_path):
    cfg = RewardModelConfig(device="cpu", noisy_latent=True, max_frames=8)
    torch.manual_seed(0)
    model = RewardModel(cfg)
    model.normalisation = Normalisation(cfg.dims, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 2)
    model.save_pretrained(tmp_path / "rm")
    steer = RewardGuidance.from_reward_model(
        RewardGuidanceConfig(weights={"MQ": 1.0}, scale=2.0, max_ratio=10.0), tmp_path / "rm"
    )
    assert steer.mode == "noisy"
    plain = pol.sample_latents(PROMPTS, SEEDS).float()
    guided = pol.sample_latents(PROMPTS, SEEDS, reward_guidance=steer).float()
    with torch.no_grad():
        mq = lambda x: model.reward(x, 0.0, PROMPTS)[:, 1]  # noqa: E731
        assert float(mq(guided).mean()) > float(mq(plain).mean())
    with pytest.raises(ValueError, match="mode=noisy but"):
        clean = RewardModel(RewardModelConfig(device="cpu", max_frames=8))
        clean.normalisation = model.normalisation
        clean.save_pretrained(tmp_path / "clean")
        RewardGuidance.from_reward_model(RewardGuidanceConfig(scale=1.0, mode="noisy"), tmp_path / "clean")
    with pytest.raises(ValueError, match="weights name"):
        RewardGuidance.from_reward_model(RewardGuidanceConfig(weights={"XX": 1.0}, scale=1.0), tmp_path / "rm")


def test_parse_weights():
    assert parse_weights("VQ:MQ:TA=0:1:0.5") == {"VQ": 0.0, "MQ": 1.0, "TA": 0.5}
    with pytest.raises(ValueError, match="as many values"):
        parse_weights("VQ:MQ=1")


def test_evaluate_and_generate_need_a_reward_model_to_guide():
    from tasks.evaluate import EvaluateConfig, guidance_reward_folder

    on = RewardGuidanceConfig(scale=1.0)
    with pytest.raises(ValueError, match="no reward model"):
        guidance_reward_folder({}, EvaluateConfig(reward_guidance=on), layout=None)
    named = EvaluateConfig(reward_guidance=on.model_copy(update={"reward_model": "rm"}))
    assert guidance_reward_folder({}, named, layout=None) == "rm"
    assert guidance_reward_folder({}, EvaluateConfig(), layout=None) is None


def test_prefloop_sample_writes_guided_first_frame_videos(tmp_path, capsys):
    import json

    import numpy as np

    from flows.cli import main
    from tasks.video_io import read_video, write_image
    from tests.test_finetune import PROMPTS as RUN_PROMPTS
    from tests.test_finetune import tiny_round

    layout, _ = tiny_round(tmp_path, n_pairs=1)
    cfg = RewardModelConfig(device="cpu", noisy_latent=True, max_frames=8)
    torch.manual_seed(0)
    model = RewardModel(cfg)
    model.normalisation = Normalisation(cfg.dims, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 2)
    model.save_pretrained(tmp_path / "rm")
    # 4x4 blocks of one colour: mp4v's 4:2:0 coding keeps them (per-pixel noise it would not)
    blocks = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    frame = np.ascontiguousarray(blocks.repeat(4, 0).repeat(4, 1))
    write_image(tmp_path / "first.png", frame)
    out = tmp_path / "samples"
    code = main(["--runs-root", str(layout.runs_root), "sample", "--run", layout.run, "--policy", "base",
                 "--guidance", "VQ:MQ:TA=0:1:0", "--weight", "5", "--reward-model", str(tmp_path / "rm"),
                 "--prompts", *RUN_PROMPTS[:2], "--samples", "2", "--first-frame", str(tmp_path / "first.png"),
                 "--out", str(out)])
    assert code == 0 and "4 videos of policy base" in capsys.readouterr().out
    listing = json.loads((out / "samples.json").read_text())
    assert listing["guidance_mode"] == "noisy" and listing["guidance_stats"]["corrections"] > 0
    assert len(listing["samples"]) == 4 and listing["first_frame"] is True
    clip = read_video(listing["samples"][0]["video_path"])
    assert clip.shape == (8, 16, 16, 3)
    assert np.abs(clip[0].astype(int) - frame.astype(int)).mean() < 12, "frame 0 is the given one, up to mp4 coding"
    with pytest.raises(SystemExit, match="as many values"):
        main(["--runs-root", str(layout.runs_root), "sample", "--run", layout.run, "--guidance", "VQ:MQ=1",
              "--weight", "1", "--prompts", "x", "--out", str(out)])


def test_an_evaluation_from_before_reward_guidance_is_still_reused():
    from tasks.evaluate import EvaluateConfig, reusable_rows

    pairs = [{"prompt": "a red ball falls", "seed": 7}]
    rows = [{"prompt": "a red ball falls", "seed": 7, "policy_id": "base"}]
    old = EvaluateConfig().model_dump(mode="json")
    old.pop("reward_guidance")
    assert reusable_rows(rows, old, "base", pairs, EvaluateConfig()) == rows
    guided = EvaluateConfig(reward_guidance=RewardGuidanceConfig(scale=1.0, reward_model="rm"))
    assert reusable_rows(rows, old, "base", pairs, guided) is None, "guided samples are other samples"
