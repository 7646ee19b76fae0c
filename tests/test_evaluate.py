"""`evaluate`: VBench-like metrics on hand-made videos, the same pairs for every policy, win rates,
the reward-hacking rule and the gate, and a tiny run with a LoRA that `finetune` trained."""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import pytest
import torch

from data_contracts import Lineage, read_manifest, write_manifest
from models.preference_training import PreferenceTrainConfig
from models.video_metrics import (
    VideoMetricsConfig,
    clip_flow_magnitudes,
    dynamic_degree,
    imaging_quality,
    motion_smoothness,
    subject_consistency,
    video_metrics,
)
from tasks import evaluate, finetune
from tasks.common import execute_stage
from tasks.evaluate import EvaluateConfig, gate, plan_pairs, policy_changed, reward_hacking, win_rate
from tasks.finetune import FinetuneConfig, RealClipConfig
from tests.test_finetune import PROMPTS, tiny_round

NO_REAL = RealClipConfig(steps=0)  # no `selection` input here: no real-clip phase


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------
# Hand-made videos: a 16 px ball drawn at 8× and area-averaged down (anti-aliased, like the world)


def ball_video(xs, ys, colour=(220, 40, 40), size: int = 16, radius: float = 2.2) -> np.ndarray:
    frames = np.full((len(xs), size, size, 3), 40, np.uint8)
    for f, (x, y) in enumerate(zip(xs, ys, strict=True)):
        big = np.full((size * 8, size * 8, 3), 40, np.uint8)
        cv2.circle(big, (round(x * 8), round(y * 8)), round(radius * 8), colour, -1)
        frames[f] = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    return frames


STATIC = ball_video([8.0] * 8, [8.0] * 8)
LINEAR = ball_video(np.linspace(3, 13, 8), [8.0] * 8)


def test_a_static_video_is_consistent_and_not_dynamic():
    m = video_metrics(STATIC[None])
    assert m["subject_consistency"][0] == pytest.approx(1.0, abs=1e-9)
    assert m["dynamic_degree"][0] == 0.0 and m["motion_smoothness"][0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(clip_flow_magnitudes(STATIC) < 1e-3)


def test_a_moving_ball_is_dynamic_and_a_recoloured_one_less_consistent():
    slow = ball_video(np.linspace(5, 9, 8), [8.0] * 8)  # half a pixel per frame
    assert dynamic_degree(np.stack([LINEAR, slow])).tolist() == [1.0, 1.0]
    recoloured = LINEAR.copy()
    recoloured[4:] = ball_video(np.linspace(3, 13, 8)[4:], [8.0] * 4, colour=(40, 40, 220))
    consistency = subject_consistency(np.stack([LINEAR, recoloured]))
    assert consistency[0] > 0.98 and consistency[1] < consistency[0] - 0.02


def test_a_random_jump_is_less_smooth_than_linear_motion():
    jump = LINEAR.copy()
    jump[4] = ball_video([4.0], [4.0])[0]  # the ball is elsewhere for one frame
    smooth = motion_smoothness(np.stack([LINEAR, jump]))
    assert 0.99 < smooth[0] <= 1.0 and smooth[1] < smooth[0] - 0.005


def test_a_blurred_video_has_lower_imaging_quality():
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.0) for f in LINEAR])
    sharp, soft = imaging_quality(np.stack([LINEAR, blurred]))
    assert 0.0 < soft < sharp - 0.2 < 1.0
    flat = np.full((1, 8, 16, 16, 3), 90, np.uint8)
    assert imaging_quality(flat)[0] == 0.0, "no detail at all is the lowest quality"


def test_metrics_refuse_what_is_not_a_uint8_video_batch():
    with pytest.raises(ValueError, match=r"expected uint8 videos \(B, F, H, W, 3\)"):
        video_metrics(LINEAR)  # one clip, not a batch
    with pytest.raises(ValueError, match="keep uint8 pixels"):
        video_metrics(LINEAR[None].astype(np.float32))
    one_frame = video_metrics(LINEAR[None, :1])
    assert math.isnan(one_frame["motion_smoothness"][0]) and math.isnan(one_frame["dynamic_degree"][0])
    assert VideoMetricsConfig().dynamic_threshold == pytest.approx(6 / 256)


# ---------------------------------------------------------------------------------------------
# The pure core


def test_pairs_cycle_prompts_and_keep_their_seeds_whatever_else_is_evaluated():
    pairs = plan_pairs(["b", "a"], 5, seed=0)
    assert [(p["prompt"], p["sample_index"]) for p in pairs] == [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("b", 2)]
    assert len({p["seed"] for p in pairs}) == 5
    more = plan_pairs(["b", "a", "c"], 9, seed=0)
    seed_of = {(p["prompt"], p["sample_index"]): p["seed"] for p in more}
    assert all(seed_of[(p["prompt"], p["sample_index"])] == p["seed"] for p in pairs), "a seed depends on (prompt, k) only"
    assert plan_pairs(["b"], 1, seed=1)[0]["seed"] != pairs[0]["seed"]


def test_win_rate_counts_ties_half_and_is_one_half_against_itself():
    r = np.array([0.3, -1.0, 2.0, 0.0])
    assert win_rate(r, r)[0] == 0.5
    # wins at pairs 0 and 2, a tie at 3, a loss at 1: (2 + 0.5) / 4
    rate, low, high = win_rate(r, [0.1, 0.0, 1.0, 0.0])
    assert rate == 0.625 and low < 0.625 < high
    assert win_rate([1.0, float("nan")], [0.0, 5.0])[0] == 1.0, "a pair without a finite reward is left out"
    with pytest.raises(ValueError, match="score the same pairs"):
        win_rate([1.0], [1.0, 2.0])


def test_reward_hacking_rule_by_hand():
    # previous policy: plausibility 0.30, Wilson low 0.25; margin 0.05 → the reward model must exceed 0.55
    assert reward_hacking(0.60, 0.20, 0.25, 0.05) is True
    assert reward_hacking(0.55, 0.20, 0.25, 0.05) is False, "0.55 is not above 0.5 + 0.05"
    assert reward_hacking(0.60, 0.26, 0.25, 0.05) is False, "a fall inside the interval is noise"
    assert reward_hacking(0.40, 0.10, 0.25, 0.05) is False, "both say worse: not hacking"
    assert reward_hacking(float("nan"), 0.10, 0.25, 0.05) is False
    cfg = EvaluateConfig(hack_margin=0.05)
    metrics = {"win_rate_overall_vs_base": 0.7, "plausibility_round": 0.1, "plausibility_base_ci_low": 0.2}
    assert evaluate.hacking_warning(metrics, ["round", "base"], cfg) == 1.0
    assert evaluate.hacking_warning(metrics, ["round", "base", "previous"], cfg) is None, "needs the previous policy's numbers"


def test_gate_decisions_by_hand():
    base_only = {"policy_changed": 1.0, "plausibility_round": 0.30, "plausibility_base": 0.20}
    keep, reason = gate(base_only, None, margin=0.05)
    assert keep and reason.startswith("keep") and "the base policy" in reason
    keep, reason = gate(base_only, None, margin=0.10)
    assert not keep and reason.startswith("stop"), "a gain of exactly the margin does not pass"
    # round 2: the previous round's own evaluation is the reference
    keep, reason = gate({**base_only, "plausibility_round": 0.33}, {"plausibility_round": 0.30}, margin=0.05)
    assert not keep and "previous round" in reason
    keep, _ = gate({**base_only, "plausibility_previous": 0.25}, None, margin=0.0)
    assert keep, "without the previous round's metrics, this round's own `previous` numbers serve"
    keep, reason = gate({**base_only, "policy_changed": 0.0, "plausibility_round": 0.9}, None, margin=0.0)
    assert not keep and reason.startswith("no change, stop")
    with pytest.raises(ValueError, match="evaluate.judge=true"):
        gate({"policy_changed": 1.0}, None, 0.0)


def test_policy_changed_needs_a_lora_of_this_round():
    base = {"kind": "policy", "round": None}
    assert not policy_changed([base], 1)
    assert policy_changed([base, {"kind": "policy_lora", "round": 2}], 2)
    assert not policy_changed([base, {"kind": "policy_lora", "round": 1}], 2), "round 1's LoRA passed through"


# ---------------------------------------------------------------------------------------------
# A tiny run: base policy, a LoRA from finetune, a reward model, held-out prompts


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from models.reward_model import Normalisation, RewardModel, RewardModelConfig

    tmp = tmp_path_factory.mktemp("evaluate")
    layout, inputs = tiny_round(tmp, n_pairs=4)
    ft = layout.stage("finetune", round=1)
    ft.path.mkdir(parents=True)
    ft_cfg = FinetuneConfig(real_clips=NO_REAL, train=PreferenceTrainConfig(steps=3, batch_size=4, lr=1e-2), backend="local")
    tuned = finetune.run(inputs, ft_cfg, layout, ft, Lineage("finetune", {}, ft_cfg.hash()), round=1).manifest
    # held-out captions: the prompts evaluate samples (the train caption must not be used)
    ingest = layout.stage("ingest")
    ingest.files("videos").mkdir(parents=True)
    rows = []
    for i, (caption, split) in enumerate([(PROMPTS[0], "heldout"), (PROMPTS[1], "heldout"), ("a green ball falls", "train")]):
        path = ingest.files("videos") / f"v{i}.mp4"
        path.write_bytes(b"")
        rows.append({"video_id": f"v{i}", "video_path": layout.stored_path(path), "caption": caption, "source": "test",
                     "split": split, "reason": None, "file_bytes": 0, "fps": 8.0, "num_frames": 8, "width": 16,
                     "height": 16, "duration_s": 1.0})
    videos = write_manifest(rows, "videos", ingest.manifest_path, layout, Lineage("ingest", {}, "x"))
    # a fresh reward model with normalisation statistics, as train_reward saves one
    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(device="cpu"))
    model.normalisation = Normalisation(("VQ", "MQ", "TA"), (0.0, 0.0, 0.0), (0.05, 0.05, 0.05), 2)
    rm_stage = layout.stage("train_reward", round=1)
    folder = model.save_pretrained(rm_stage.files("reward_model"))
    reward = write_manifest(
        [{"checkpoint_id": "reward-r01", "kind": "reward_model", "format": "safetensors",
          "path": layout.stored_path(folder), "base_id": "clip", "round": 1, "metrics_json": None}],
        "checkpoints", rm_stage.manifest_path, layout, Lineage("train_reward", {}, "x"),
    )
    return layout, {"videos": videos, "baseline": inputs["checkpoints"], "policy": tuned, "reward_model": reward}


CFG = EvaluateConfig(samples=6, steps=3, batch_size=4, strip_pairs=2)


def evaluate_run(layout, inputs, cfg=CFG, round_=1):
    out = layout.stage("evaluate", round=round_)
    out.path.mkdir(parents=True, exist_ok=True)
    lineage = Lineage("evaluate", {k: v.content_hash for k, v in inputs.items()}, cfg.hash())
    ticks = []
    result = evaluate.run(inputs, cfg, layout, out, lineage, round=round_, progress=lambda d, t: ticks.append((d, t)))
    return result, read_manifest(result.manifest.path, "evaluation", layout).rows(), ticks


def test_evaluate_writes_a_valid_manifest_with_the_same_pairs_for_every_policy(tiny_run):
    layout, inputs = tiny_run
    result, rows, ticks = evaluate_run(layout, inputs)
    # 1. one row per role × pair, held-out prompts only, the same seeds for both policies
    assert len(rows) == 12 and {r["prompt"] for r in rows} == set(PROMPTS[:2])
    by_role = {role: [r for r in rows if r["eval_id"].startswith(f"{role}-")] for role in ("round", "base")}
    assert [r["policy_id"] for r in by_role["round"]] == ["lora-r01"] * 6 and by_role["base"][0]["policy_id"] == "base"
    key = lambda r: (r["prompt_id"], r["seed"])  # noqa: E731
    assert [key(r) for r in by_role["round"]] == [key(r) for r in by_role["base"]]
    assert by_role["round"][0]["video_path"] != by_role["base"][0]["video_path"]
    assert all((layout.run_dir / r["video_path"]).is_file() for r in rows)
    for r in rows:
        assert isinstance(r["plausible"], bool) and isinstance(r["caption_agreement"], bool)
        assert all(r[f"reward_{d}"] is not None for d in ("vq", "mq", "ta"))
        assert 0.0 <= r["subject_consistency"] <= 1.0 and r["dynamic_degree"] in (0.0, 1.0)
    # 2. the summary: judge rates with intervals, win rates against the base, the warning
    m = result.metrics
    for name in ("plausibility_round", "plausibility_base", "caption_agreement_round", "imaging_quality_base"):
        assert 0.0 <= m[name] <= 1.0
    assert m["plausibility_round_ci_low"] <= m["plausibility_round"] <= m["plausibility_round_ci_high"]
    assert {f"win_rate_{d}_vs_base" for d in ("vq", "mq", "ta", "overall")} <= set(m)
    assert m["policy_changed"] == 1.0 and m["reward_hacking_warning"] in (0.0, 1.0)
    assert result.counts == {
        "pairs": 6, "prompts": 2, "policies": 2, "policies_sampled": 2, "policies_reused": 0, "reward_hacking_checked": 1
    }
    assert ticks[-1] == (4, 4), "2 policies × 2 batches"
    strip = cv2.imread(result.images[next(iter(result.images))])
    assert strip.shape[0] == 4 * (4 * 16 + 8) - 8, "two pairs: base, round, base, round rows (4× scale, 2 px gaps)"


def test_the_base_evaluated_twice_gives_identical_numbers_and_a_policy_ties_itself(tiny_run):
    layout, inputs = tiny_run
    first, first_rows, _ = evaluate_run(layout, inputs)
    # round 2 whose finetune changed nothing: its policy is round 1's, which is also `previous`
    again = {**inputs, "previous": inputs["policy"]}
    second, second_rows, _ = evaluate_run(layout, again, round_=2)
    base_numbers = lambda rows: [  # noqa: E731
        (r["seed"], r["plausible"], r["reward_mq"], r["motion_smoothness"]) for r in rows if r["eval_id"].startswith("base-")
    ]
    assert base_numbers(first_rows) == base_numbers(second_rows)
    assert {k: v for k, v in first.metrics.items() if k.endswith("_base")} == {
        k: v for k, v in second.metrics.items() if k.endswith("_base")
    }
    for d in ("vq", "mq", "ta", "overall"):
        assert second.metrics[f"win_rate_{d}_vs_previous"] == 0.5
    assert second.counts["policies_sampled"] == 2 and second.metrics["policy_changed"] == 0.0
    assert second.metrics["reward_hacking_warning"] == 0.0
    keep, reason = gate(second.metrics, first.metrics, margin=0.0)
    assert not keep and reason.startswith("no change, stop")


def test_round_two_reuses_what_round_one_sampled_with_the_same_settings(tiny_run):
    """With `previous_evaluation`, the base and the previous policy are not sampled again: their rows
    point at round 1's files with round 1's verdicts and metrics; other sampling settings sample anew."""
    layout, inputs = tiny_run
    first, first_rows, _ = evaluate_run(layout, inputs)
    # as the pipeline runs it: the stage marker records the settings the samples were drawn with
    outcome = execute_stage(functools.partial(evaluate.run, round=1), layout, layout.stage("evaluate", 1), CFG, inputs)
    again = {**inputs, "previous": inputs["policy"], "previous_evaluation": outcome.manifest}
    second, second_rows, ticks = evaluate_run(layout, again, round_=2)
    assert second.counts["policies_sampled"] == 0 and second.counts["policies_reused"] == 2
    assert ticks[-1] == (4, 4)
    same = lambda rows, role: [  # noqa: E731
        (r["seed"], r["video_path"], r["plausible"], r["reward_mq"], r["motion_smoothness"])
        for r in rows if r["eval_id"].startswith(f"{role}-")
    ]
    assert same(second_rows, "base") == same(first_rows, "base")
    assert same(second_rows, "round") == same(first_rows, "round")
    assert all(r["video_path"].startswith("round-01/") for r in second_rows)
    # other steps: the stored samples are not what this evaluation would draw
    other = CFG.model_copy(update={"steps": 2})
    third, _, _ = evaluate_run(layout, again, cfg=other, round_=2)
    assert third.counts["policies_sampled"] == 2 and third.counts["policies_reused"] == 0


def test_missing_reward_model_or_prompts_are_clear_errors(tiny_run, tmp_path):
    layout, inputs = tiny_run
    without = {k: v for k, v in inputs.items() if k != "reward_model"}
    with pytest.raises(ValueError, match="set evaluate.win_rates=false"):
        evaluate_run(layout, without, round_=3)
    with pytest.raises(FileNotFoundError, match="evaluate.prompt_file"):
        evaluate_run(layout, inputs, EvaluateConfig(prompt_file=str(tmp_path / "none.txt")), round_=3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[1]}\n\n")
    # without `baseline`, the base is the `policy` row of the round's checkpoints (its LoRA dropped)
    no_base = {k: v for k, v in without.items() if k != "baseline"}
    result, rows, _ = evaluate_run(layout, no_base, EvaluateConfig(prompt_file=str(prompts), samples=2, steps=2,
                                                                   win_rates=False, judge=False, strip_pairs=0), round_=3)
    assert {r["prompt"] for r in rows} == {PROMPTS[1]} and all(r["plausible"] is None and r["reward_vq"] is None for r in rows)
    assert {r["policy_id"] for r in rows} == {"lora-r01", "base"} and result.counts["policies_sampled"] == 2
    assert result.counts["reward_hacking_checked"] == 0 and "plausibility_round" not in result.metrics and not result.images
