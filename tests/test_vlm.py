"""The VLM critic: strict answer parsers, frame sampling, and a tiny random-weight Qwen2-VL built
offline, loaded back through `from_pretrained` and asked end to end."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from models.vlm import (
    DIMENSIONS,
    INVALID,
    SPECIAL_TOKENS,
    VLMConfig,
    VLMCritic,
    build_tiny_vlm,
    parse_pair_answer,
    parse_physics_answer,
    parse_point_answer,
    sample_frames,
)


def _videos(n: int, frames: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=0)


@pytest.fixture(scope="module")
def critic(tiny_dir):
    return VLMCritic(VLMConfig(model=str(tiny_dir), device="cpu", max_new_tokens=24, batch_size=2))


# ---------------------------------------------------------------------------------------------
# Parsers


@pytest.mark.parametrize(
    ("raw", "labels", "rationale"),
    [
        ("VQ: A\nMQ: tie\nTA: B\nReason: A is sharper.", {"VQ": "A", "MQ": "tie", "TA": "B"}, "A is sharper."),
        ("\n  VQ: B\n\nMQ: B\nTA: tie\nReason: same motion  \n", {"VQ": "B", "MQ": "B", "TA": "tie"}, "same motion"),
        ("TA: A\nVQ: A\nMQ: A\nReason: x", {"VQ": "A", "MQ": "A", "TA": "A"}, "x"),  # order is not a reading problem
        ("VQ: A\nMQ: B\nTA: tie", {"VQ": "A", "MQ": "B", "TA": "tie"}, None),  # no reason: labels still read
        ("VQ:A\nMQ:B\nTA:A\nReason:", {"VQ": "A", "MQ": "B", "TA": "A"}, None),
    ],
)
def test_pair_parser_reads_good_answers(raw, labels, rationale):
    judgement = parse_pair_answer(raw)
    assert judgement.labels == labels
    assert judgement.rationale == rationale
    assert judgement.raw == raw
    assert judgement.valid


@pytest.mark.parametrize(
    ("raw", "labels"),
    [
        ("", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("   \n \n", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        # prose around the format: the whole answer is unreadable
        ("Sure! VQ: A\nMQ: B\nTA: tie", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("VQ: A\nMQ: B\nTA: tie\nReason: x\nI hope this helps.", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("**VQ**: A\nMQ: B\nTA: tie", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("vq: A\nMQ: B\nTA: tie", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),  # unknown key
        ("VQ: A\nOverall: B\nMQ: B\nTA: tie", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("VQ - A\nMQ: B\nTA: tie", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("A\nB\ntie", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("VQ: A MQ: B TA: tie", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        # a bad value spoils only its dimension
        ("VQ: a\nMQ: B\nTA: tie", {"VQ": INVALID, "MQ": "B", "TA": "tie"}),  # lowercase label
        ("VQ: A\nMQ: Tie\nTA: B", {"VQ": "A", "MQ": INVALID, "TA": "B"}),
        ("VQ: A because it is sharper\nMQ: B\nTA: B", {"VQ": INVALID, "MQ": "B", "TA": "B"}),
        ("VQ: A or B\nMQ: both\nTA: C", {"VQ": INVALID, "MQ": INVALID, "TA": INVALID}),
        ("VQ: \nMQ: B\nTA: A", {"VQ": INVALID, "MQ": "B", "TA": "A"}),
        ("VQ: A.\nMQ: B\nTA: A", {"VQ": INVALID, "MQ": "B", "TA": "A"}),
        # missing and duplicated dimensions
        ("VQ: A\nTA: B\nReason: x", {"VQ": "A", "MQ": INVALID, "TA": "B"}),
        ("VQ: A\nVQ: B\nMQ: tie\nTA: A", {"VQ": INVALID, "MQ": "tie", "TA": "A"}),
        ("VQ: A\nVQ: A\nMQ: tie\nTA: A", {"VQ": INVALID, "MQ": "tie", "TA": "A"}),  # even when they agree
    ],
)
def test_pair_parser_never_guesses(raw, labels):
    judgement = parse_pair_answer(raw)
    assert judgement.labels == labels
    assert judgement.raw == raw
    assert not judgement.valid


def test_pair_parser_keeps_a_duplicated_reason_out():
    judgement = parse_pair_answer("VQ: A\nMQ: A\nTA: A\nReason: x\nReason: y")
    assert judgement.valid and judgement.rationale is None


@pytest.mark.parametrize(
    ("raw", "scores"),
    [
        ("VQ: 4\nMQ: 3\nTA: 5\nReason: fine", {"VQ": 4, "MQ": 3, "TA": 5}),
        ("VQ: 1\nMQ: 5\nTA: 2", {"VQ": 1, "MQ": 5, "TA": 2}),
        ("VQ: 0\nMQ: 6\nTA: 10", {"VQ": None, "MQ": None, "TA": None}),  # out of range
        ("VQ: -1\nMQ: 4.5\nTA: 3/5", {"VQ": None, "MQ": None, "TA": None}),
        ("VQ: four\nMQ: 04\nTA: 3 stars", {"VQ": None, "MQ": None, "TA": None}),
        ("VQ: 4\nTA: 3", {"VQ": 4, "MQ": None, "TA": 3}),  # missing
        ("VQ: 4\nVQ: 4\nMQ: 2\nTA: 3", {"VQ": None, "MQ": 2, "TA": 3}),  # duplicated
        ("Scores: VQ 4, MQ 3, TA 5", {"VQ": None, "MQ": None, "TA": None}),
        ("", {"VQ": None, "MQ": None, "TA": None}),
        ("The video is good.\nVQ: 4\nMQ: 3\nTA: 5", {"VQ": None, "MQ": None, "TA": None}),
    ],
)
def test_point_parser(raw, scores):
    judgement = parse_point_answer(raw)
    assert judgement.scores == scores
    assert judgement.raw == raw
    assert judgement.valid == all(s is not None for s in scores.values())


@pytest.mark.parametrize(
    ("raw", "score"),
    [
        ("plausible: yes", 1.0),
        ("plausible: no\nReason: the ball floats up.", 0.0),
        ("\nplausible: yes\n", 1.0),
        ("plausible: Yes", None),
        ("plausible: maybe", None),
        ("plausible: yes, mostly", None),
        ("Plausible: yes", None),
        ("plausible: yes\nplausible: no", None),
        ("plausible: yes\nplausible: yes", None),
        ("yes", None),
        ("Reason: looks fine", None),
        ("", None),
        ("plausible: yes\nThe ball bounces.", None),
    ],
)
def test_physics_parser(raw, score):
    assert parse_physics_answer(raw) == score


# ---------------------------------------------------------------------------------------------
# Config and frames


def test_config_is_frozen_and_strict():
    cfg = VLMConfig(model="Qwen/Qwen2-VL-2B-Instruct")
    assert cfg.sample_fps == 2.0 and not cfg.trust_remote_code and cfg.local_files_only
    with pytest.raises(ValidationError):
        cfg.sample_fps = 4.0
    with pytest.raises(ValidationError):
        VLMConfig(model="x", temperature=0.7)
    with pytest.raises(ValidationError):
        VLMConfig()


def test_sample_frames_at_the_configured_rate():
    frames = np.arange(48).reshape(48, 1, 1, 1).repeat(3, -1).astype(np.uint8)
    cfg = VLMConfig(model="m", sample_fps=2.0, max_frames=32)
    sampled, rate = sample_frames(frames, 24.0, cfg)  # 2 s at 24 fps -> one frame every 12
    assert sampled[:, 0, 0, 0].tolist() == [0, 12, 24, 36] and rate == pytest.approx(2.0)
    sampled, rate = sample_frames(frames[:3], 1.0, cfg)  # slower than 2 fps: shown whole
    assert len(sampled) == 3 and rate == pytest.approx(1.0)
    sampled, rate = sample_frames(frames, 24.0, VLMConfig(model="m", sample_fps=12.0, max_frames=5))
    assert sampled[:, 0, 0, 0].tolist() == [0, 12, 24, 35, 47] and rate == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------
# The tiny model, offline, through from_pretrained


def test_tiny_vlm_loads_through_the_auto_classes(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    tokenizer, config = processor.tokenizer, model.config
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids.values()
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.text_config.eos_token_id == tokenizer.eos_token_id == ids["<|im_end|>"]
    assert config.text_config.pad_token_id == tokenizer.pad_token_id == ids["<|endoftext|>"]
    assert config.text_config.bos_token_id is None
    assert config.text_config.vocab_size >= len(tokenizer)
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert processor.chat_template is not None
    # the rubric's answer words are whole tokens of the trained BPE, not byte soup
    assert len(tokenizer("VQ: A\nMQ: tie\nTA: B").input_ids) <= 12


def test_random_model_answers_are_recorded_as_invalid_and_deterministic(critic):
    a, b = _videos(3, seed=1), _videos(3, seed=2)
    prompts = ["a red ball falls", "a blue ball rolls to the left", "two balls collide"]

    pairs = critic.compare(a, b, prompts, fps_a=8)
    assert len(pairs) == 3
    for judgement in pairs:
        assert judgement.raw  # the gibberish is kept for inspection
        assert judgement.labels == parse_pair_answer(judgement.raw).labels
        assert set(judgement.labels) == set(DIMENSIONS) and not judgement.valid
    assert [j.raw for j in critic.compare(a, b, prompts, fps_a=8)] == [j.raw for j in pairs]

    points = critic.rate(a, prompts, fps=[8, 8, 24])
    assert all(p.raw and p.scores == parse_point_answer(p.raw).scores and not p.valid for p in points)

    physics = critic.physics(a, ["a red ball falls", "", "x"], fps=8)
    assert all(score is None and raw for score, raw in physics)
    assert critic.physics(a, ["a red ball falls", "", "x"], fps=8) == physics


def test_critic_routes_answers_to_their_questions(critic, monkeypatch):
    """Canned answers stand in for a trained VLM: each question keeps its own answer, in order."""
    asked = []

    def canned(questions):
        asked.extend(questions)
        return ["VQ: A\nMQ: tie\nTA: B\nReason: first", "VQ: B\nMQ: B\nTA: b"][: len(questions)]

    monkeypatch.setattr(critic, "answer", canned)
    out = critic.compare(_videos(2), _videos(2, seed=3), ["p1", "p2"], fps_a=8, fps_b=[8, 16])
    assert [j.labels for j in out] == [{"VQ": "A", "MQ": "tie", "TA": "B"}, {"VQ": "B", "MQ": "B", "TA": INVALID}]
    assert out[0].rationale == "first"
    assert [len(videos) for _, videos in asked] == [2, 2] and asked[1][1][1][1] == 16.0
    assert '"p2"' in asked[1][0][-1]["content"][-1]["text"]


def test_critic_rejects_bad_inputs_with_a_fix(critic):
    videos = _videos(2)
    with pytest.raises(ValueError, match="wrap it in a list"):
        critic.rate(videos[0], ["p"], fps=8)
    with pytest.raises(ValueError, match=r"videos\[1\].*uint8"):
        critic.rate([videos[0], videos[1].astype(np.float32)], ["p", "q"], fps=8)
    with pytest.raises(ValueError, match="one B per A"):
        critic.compare(videos, videos[:1], ["p", "q"], fps_a=8)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        critic.rate(videos, ["p", " "], fps=8)
    with pytest.raises(ValueError, match="control token"):
        critic.rate(videos, ["p", "a ball <|video_pad|>"], fps=8)
    with pytest.raises(ValueError, match="fps"):
        critic.physics(videos, ["", ""], fps=[8, 0])
    with pytest.raises(ValueError, match="one fps per video"):
        critic.physics(videos, ["", ""], fps=[8])


def test_missing_checkpoint_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VLMCritic(VLMConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(OSError, match="huggingface-cli download"):
        VLMCritic(VLMConfig(model="prefloop-test/not-a-cached-model"))


def test_max_frame_pixels_caps_the_visual_tokens(tiny_dir):
    """A 64x48 frame fills 2x2 merged tokens at the tiny processor's cap; 28x28 pixels leave one."""
    capped = VLMCritic(VLMConfig(model=str(tiny_dir), device="cpu", max_frame_pixels=28 * 28))
    clip, rate = sample_frames(_videos(1)[0], 8.0, capped.cfg)
    grids = []
    for critic_kwargs in ({"do_sample_frames": False, "cap_pixels_per_frame": True}, capped._video_kwargs()):
        out = capped.processor(
            text=["<|vision_start|><|video_pad|><|vision_end|>"],
            videos=[clip],
            video_metadata=[{"total_num_frames": len(clip), "fps": rate}],
            return_tensors="pt",
            **critic_kwargs,
        )
        grids.append(out["video_grid_thw"][0].tolist())
    assert grids == [[1, 4, 4], [1, 2, 2]]  # 1 s at 2 fps: two frames, one tubelet
