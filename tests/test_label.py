"""`label`: pairing rules, simulated annotators (exact without noise, a majority that fixes most
slips, deterministic for a seed), unreadable videos counted not fatal, a VLM critic whose unreadable
answers become `invalid` with the raw text kept (in process and through a Ray actor pool), and the
reward-model hook. Every run is a tiny `generations` manifest of world clips written as mp4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from data_contracts import Lineage, RunLayout, read_manifest, write_manifest
from models.annotators import majority, noise_free_label, pair_rng, rater_votes
from models.physics_world import WorldSpec, corrupt_bytes, make_clip, render_clip
from models.vlm import VLMConfig, build_tiny_vlm
from tasks import label
from tasks.generate import prompt_id
from tasks.label import LabelConfig, Sample, Video, plan_pairs
from tasks.video_io import write_video

SPEC = WorldSpec()
VIOLATIONS = ("teleport", "stop_midair", "anti_gravity")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a busy 2-core machine: two threads' synchronisation costs more than their math
    (a tiny-VLM compare measured 0.13 s with one thread, 4.6 s with two)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def twins(seed: int, violation: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(caption, plausible clip, implausible clip) of one scene: two generations of one prompt."""
    bad = make_clip(np.random.default_rng(seed), SPEC, violation)
    return bad.caption, render_clip(bad.scene, SPEC), bad.frames


def make_run(tmp_path, prompts: list[tuple[str, list[np.ndarray | bytes]]]):
    """A run whose round-1 `generations` holds the given clips (bytes: a file that is not a video)."""
    layout = RunLayout(tmp_path / "runs", "lab")
    gen = layout.stage("generate", round=1)
    videos = gen.files("videos")
    videos.mkdir(parents=True)
    rows = []
    for prompt, clips in prompts:
        pid = prompt_id(prompt)
        for k, clip in enumerate(clips):
            gid = f"r01-{pid}-{k:02d}"
            path = videos / f"{gid}.mp4"
            if isinstance(clip, bytes):
                path.write_bytes(clip)
            else:
                write_video(path, clip, SPEC.fps)
            rows.append({"generation_id": gid, "prompt_id": pid, "prompt": prompt, "sample_index": k, "seed": k,
                         "video_path": layout.stored_path(path), "latent_path": None, "first_frame_path": None,
                         "policy_id": "test", "steps": 3, "guidance": 2.0, "round": 1})
    ref = write_manifest(rows, "generations", gen.manifest_path, layout, Lineage("generate", {}, "x"))
    return layout, {"generations": ref}


def label_run(layout, inputs, cfg, **kwargs):
    out = layout.stage("label", round=1)
    lineage = Lineage("label", {k: v.content_hash for k, v in inputs.items()}, cfg.hash())
    result = label.run(inputs, cfg, layout, out, lineage, round=1, **kwargs)
    rows = read_manifest(result.manifest.path, "labels", layout).rows()  # validates against the contract
    return result, rows, label.read_scores(out.path / label.SCORES_FILE).to_pylist()


@pytest.fixture()
def world_run(tmp_path):
    """Three prompts, each with an implausible sample first and its plausible twin second."""
    prompts = []
    for seed, violation in enumerate(VIOLATIONS):
        caption, good, bad = twins(seed, violation)
        prompts.append((caption, [bad, good]))
    return make_run(tmp_path, prompts)


# ---------------------------------------------------------------------------------------------
# The pure core


def _sample(k: int, scores, prompt: str = "p", readable: bool = True) -> Sample:
    return Sample(f"g{prompt}{k}", prompt, prompt, k, f"v{prompt}{k}.mp4", readable, scores)


def test_pairing_rules():
    group = [_sample(0, (0.5, 0.5, 0.5)), _sample(1, (1.0, 1.0, 1.0)), _sample(2, (0.0, 0.5, 1.0)),
             _sample(3, None, readable=False), _sample(4, (np.nan, 1.0, 1.0))]
    ids = lambda pairs: [(a.sample_index, b.sample_index) for a, b in pairs]  # noqa: E731
    # best vs worst by overall; equal overall (0 and 2 both 0.5) -> the lower index ranks first
    pairs, outcomes = plan_pairs(group, LabelConfig())
    assert ids(pairs) == [(1, 2)] and outcomes["p"] == label.PromptOutcome(1, False, False)
    # every readable pair, the better-ranked first; the unscored (4) ranks last but still pairs
    pairs, _ = plan_pairs(group, LabelConfig(pairing="all_pairs"))
    assert ids(pairs) == [(1, 0), (1, 2), (1, 4), (0, 2), (0, 4), (2, 4)]
    pairs, _ = plan_pairs(group, LabelConfig(pairing="margin", margin=0.5))
    assert ids(pairs) == [(1, 0), (1, 2)]
    # all equal: a tie pair unless ties are dropped; fewer than two scored samples: no pair
    same = [_sample(0, (1.0, 1.0, 1.0), "q"), _sample(1, (1.0, 1.0, 1.0), "q"), _sample(0, (1.0, 1.0, 1.0), "r"),
            _sample(1, (np.nan, 1.0, 1.0), "r")]
    pairs, outcomes = plan_pairs(same, LabelConfig())
    assert ids(pairs) == [(0, 1)] and outcomes["q"].all_equal and outcomes["r"].too_few
    pairs, outcomes = plan_pairs(same, LabelConfig(keep_ties=False))
    assert pairs == [] and outcomes["q"] == label.PromptOutcome(0, True, False)


def test_rank_by_mq_ta_pairs_the_motion_extremes():
    """By overall the best (0: overall 0.83) and worst (2: 0.5) have the same MQ; by MQ, then TA, the
    pair is the most plausible against the least (1 vs 3), TA breaking MQ's tie at the top (1 over 4)."""
    group = [_sample(0, (1.0, 0.5, 1.0)), _sample(1, (0.0, 1.0, 1.0)), _sample(2, (0.5, 0.5, 0.5)),
             _sample(3, (1.0, 0.25, 1.0)), _sample(4, (1.0, 1.0, 0.0)), _sample(5, None, readable=False)]
    ids = lambda pairs: [(a.sample_index, b.sample_index) for a, b in pairs]  # noqa: E731
    assert ids(plan_pairs(group, LabelConfig())[0]) == [(0, 2)]
    assert ids(plan_pairs(group, LabelConfig(rank_by="mq_ta"))[0]) == [(1, 3)]
    # equal in MQ, TA and VQ: all equal (a tie pair, or none without ties), though overall is equal too
    same = [_sample(0, (0.5, 1.0, 1.0), "q"), _sample(1, (0.5, 1.0, 1.0), "q")]
    assert plan_pairs(same, LabelConfig(rank_by="mq_ta", keep_ties=False)) == ([], {"q": label.PromptOutcome(0, True, False)})
    # equal overall but not equal in MQ: not all equal by mq_ta
    mixed = [_sample(0, (1.0, 0.5, 1.0), "r"), _sample(1, (1.0, 1.0, 0.5), "r")]
    assert ids(plan_pairs(mixed, LabelConfig(rank_by="mq_ta", keep_ties=False))[0]) == [(1, 0)]
    with pytest.raises(ValidationError, match=r"label.pairing=best_worst or label.rank_by=overall"):
        LabelConfig(rank_by="mq_ta", pairing="all_pairs")


def test_pairs_per_prompt_pairs_the_ith_best_with_the_ith_worst():
    """Overall scores 1.0, 0.83, 0.5, 0.5, 0.33, 0.0 (indices 0..5): 2 pairs are (0, 5), (1, 4); a third
    (2, 3) ranks equal and is left out; more than K/2 asks for no more."""
    group = [_sample(0, (1.0, 1.0, 1.0)), _sample(1, (1.0, 1.0, 0.5)), _sample(2, (0.5, 0.5, 0.5)),
             _sample(3, (0.5, 0.5, 0.5)), _sample(4, (0.0, 0.5, 0.5)), _sample(5, (0.0, 0.0, 0.0))]
    ids = lambda pairs: [(a.sample_index, b.sample_index) for a, b in pairs]  # noqa: E731
    assert ids(plan_pairs(group, LabelConfig(pairs_per_prompt=2))[0]) == [(0, 5), (1, 4)]
    assert ids(plan_pairs(group, LabelConfig(pairs_per_prompt=5))[0]) == [(0, 5), (1, 4)]
    assert plan_pairs(group, LabelConfig(pairs_per_prompt=3))[1]["p"].pairs == 2
    with pytest.raises(ValidationError, match=r"label.pairs_per_prompt=1"):
        LabelConfig(pairs_per_prompt=2, pairing="margin", margin=0.1)


def test_config_refuses_what_it_cannot_run():
    with pytest.raises(ValidationError, match=r"label.vlm.model"):
        LabelConfig(critic="vlm")
    with pytest.raises(ValidationError, match=r"label.margin"):
        LabelConfig(pairing="margin")
    with pytest.raises(ValidationError):
        LabelConfig(raters=3, temperature=0.7)


def test_majority_of_three_fixes_most_slips():
    """A rater slips with p = 0.1; three raters' majority is wrong with 3p²(1−p) + p³ = 3p² − 2p³ = 0.028,
    so it agrees with the noise-free label 97.2 % of the time (one rater: 90 %). 4000 labels: the
    standard error of the share is sqrt(0.972·0.028/4000) = 0.0026; the tolerance is 4 of them."""
    p, n = 0.1, 4000
    rng = np.random.default_rng(0)
    truths = ["A" if i % 2 else "B" for i in range(n)]
    three = np.mean([majority(rater_votes(t, 3, p, 0.0, rng)) == t for t in truths])
    one = np.mean([majority(rater_votes(t, 1, p, 0.0, rng)) == t for t in truths])
    assert abs(three - (1 - (3 * p**2 - 2 * p**3))) < 0.011
    assert abs(one - (1 - p)) < 0.02
    # noise-free raters are exact; a tie stays a tie under slips; no majority is a tie
    assert all(majority(rater_votes(t, 3, 0.0, 0.0, rng)) == t for t in ("A", "B", "tie"))
    assert all(majority(rater_votes("tie", 3, 1.0, 0.0, rng)) == "tie" for _ in range(20))
    assert majority(["A", "B", "tie"]) == "tie" and majority(["A", "A", "B", "B"]) == "tie"
    assert noise_free_label(0.5, 0.25) == "A" and noise_free_label(0.0, 1.0) == "B" and noise_free_label(1, 1) == "tie"
    a, b = pair_rng(3, "x", "y").random(4), pair_rng(3, "x", "y").random(4)
    assert np.array_equal(a, b) and not np.array_equal(a, pair_rng(4, "x", "y").random(4))


# ---------------------------------------------------------------------------------------------
# Simulated annotators, end to end


def test_best_worst_chooses_the_plausible_clip_and_noise_free_raters_are_exact(world_run):
    layout, inputs = world_run
    result, rows, scores = label_run(layout, inputs, LabelConfig(label_noise=0.0, tie_rate=0.0))
    gens = {r["generation_id"]: r for r in read_manifest(inputs["generations"].path, "generations", layout).rows()}
    by_path = {g["video_path"]: g for g in gens.values()}
    assert len(rows) == 3 and result.counts["pairs"] == 3 and result.counts["prompts_paired"] == 3
    for row in rows:
        # the plausible twin (sample 1) is chosen although it comes second
        assert by_path[row["video_a"]]["sample_index"] == 1 and by_path[row["video_b"]]["sample_index"] == 0
        assert row["label_mq"] == "A" and row["score_mq"] > 0
        # without noise every label is the sign of the judge's margin, and the votes are unanimous
        for d in ("vq", "mq", "ta"):
            assert row[f"label_{d}"] == noise_free_label(row[f"score_{d}"], 0.0)
        raw = json.loads(row["raw_response"])
        assert all(len(set(v)) == 1 and v[0] == raw["truth"][d] for d, v in raw["votes"].items())
        assert row["critic"] == "annotators" and row["round"] == 1 and "implausible" in row["rationale"]
    # pointwise: the plausible clip scores MQ = 1 (the judge calls it plausible), the other less
    assert {(gens[s["generation_id"]]["sample_index"], s["score_mq"] == 1.0) for s in scores} == {(1, True), (0, False)}
    assert all(s["reason"] is None and s["overall"] is not None for s in scores)


def test_unreadable_videos_and_lonely_prompts_are_counted_not_fatal(tmp_path):
    caption, good, bad = twins(0, "teleport")
    other, good2, _ = twins(1, "stop_midair")
    third, good3, _ = twins(2, "anti_gravity")
    truncated = corrupt_bytes(np.random.default_rng(0))
    layout, inputs = make_run(tmp_path, [
        (caption, [bad, good]),
        (other, [truncated, good2, b""]),  # one readable video: no pair
        (third, [good3, good3]),  # identical samples: a tie pair
    ])
    result, rows, scores = label_run(layout, inputs, LabelConfig(label_noise=0.0, tie_rate=0.0))
    c = result.counts
    assert c["videos"] == 7 and c["unreadable_videos"] == 2 and c["unreadable_empty_file"] == 1
    assert c["unreadable_truncated"] + c.get("unreadable_not_a_video", 0) == 1
    assert c["prompts"] == 3 and c["prompts_paired"] == 2 and c["prompts_without_pair"] == 1
    assert c["prompts_too_few_videos"] == 1 and c["prompts_all_equal"] == 1
    assert c["pairs"] == 2 and c["ties_mq"] == 1 and c["invalid_mq"] == 0
    tie = next(r for r in rows if r["prompt"] == third)
    assert (tie["label_vq"], tie["label_mq"], tie["label_ta"]) == ("tie", "tie", "tie")
    # every generation stays in scores.parquet; the unreadable ones with their reason and no score
    assert len(scores) == 7
    broken = [s for s in scores if s["reason"] is not None]
    assert len(broken) == 2 and all(s["score_mq"] is None and s["overall"] is None for s in broken)


def test_labels_are_deterministic_for_a_seed_and_independent_of_sharding(world_run, tmp_path):
    layout, inputs = world_run
    noisy = LabelConfig(label_noise=0.3, tie_rate=0.2, seed=7, pairing="all_pairs")
    _, first, _ = label_run(layout, inputs, noisy)
    _, again, _ = label_run(layout, inputs, noisy.model_copy(update={"batch_size": 1}))
    _, other, _ = label_run(layout, inputs, noisy.model_copy(update={"seed": 8}))
    assert first == again
    assert [r["raw_response"] for r in first] != [r["raw_response"] for r in other]
    assert [r["pair_id"] for r in first] == [r["pair_id"] for r in other]


# ---------------------------------------------------------------------------------------------
# The VLM critic: the tiny offline Qwen2-VL, loaded with from_pretrained


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return VLMConfig(model=str(build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=0)), device="cpu",
                     max_new_tokens=16, batch_size=4)


GARBLED = "Sure! Both videos look lovely to me."


class GarbledVLM(label.CriticWorker):
    """The real tiny VLM, with a generate stub: readable 1–5 ratings, unreadable comparisons."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def answer(questions):
            return [GARBLED if len(videos) == 2 else "VQ: 3\nMQ: 4\nTA: 2\nReason: fine" for _, videos in questions]

        self.critic.vlm.answer = answer


def test_unreadable_vlm_answers_become_invalid_with_the_raw_text_kept(world_run, tiny_vlm):
    layout, inputs = world_run
    cfg = LabelConfig(critic="vlm", vlm=tiny_vlm, backend="local")
    result, rows, scores = label_run(layout, inputs, cfg, worker_cls=GarbledVLM)
    # equal ratings everywhere: every prompt's best–worst pair, every label invalid, nothing guessed
    assert len(rows) == 3 and result.counts["prompts_all_equal"] == 3
    assert all(r[f"label_{d}"] == "invalid" for r in rows for d in ("vq", "mq", "ta"))
    assert all(r["raw_response"] == GARBLED and r["critic"] == f"vlm:{tiny_vlm.model}" for r in rows)
    assert result.counts["invalid_vq"] == result.counts["invalid_mq"] == result.counts["invalid_ta"] == 3
    assert all((s["score_vq"], s["score_mq"], s["score_ta"], s["overall"]) == (3.0, 4.0, 2.0, 3.0) for s in scores)
    assert all(r["score_mq"] == 0.0 for r in rows)


def test_tiny_vlm_through_a_ray_actor_pool(world_run, tiny_vlm):
    """The random tiny model answers gibberish: ratings are unreadable (no video ranked), and
    `all_pairs` still pairs the readable videos, whose labels are recorded as they are read."""
    layout, inputs = world_run
    calls = []
    cfg = LabelConfig(critic="vlm", vlm=tiny_vlm, pairing="all_pairs", actors=1, batch_size=4)
    result, rows, scores = label_run(layout, inputs, cfg, progress=lambda done, total: calls.append((done, total)))
    assert len(rows) == 3 and calls and calls[-1][0] == calls[-1][1]
    assert result.counts["unscored_videos"] == 6 and all(s["reason"] == "unreadable_answer" for s in scores)
    for row in rows:
        labels = [row[f"label_{d}"] for d in ("vq", "mq", "ta")]
        assert set(labels) <= set(label.LABELS) and row["raw_response"] is not None
        assert row["score_vq"] is None  # no readable ratings: no margin


# ---------------------------------------------------------------------------------------------
# The reward-model critic


def test_reward_model_hook_labels_by_the_tie_margin():
    """Rewards stand in for a reward model: r(video) = its first pixel's value / 100 per dimension."""
    def scorer(frames, prompts, fps):
        assert frames.dtype == np.uint8 and frames.ndim == 5 and fps == 8.0 and len(prompts) == len(frames)
        return frames[:, 0, 0, 0, :].astype(np.float64) / 100.0

    def video(i, rgb):
        frames = np.zeros((4, 8, 8, 3), np.uint8)
        frames[:, 0, 0] = rgb
        return Video(f"v{i}", frames, 8.0)

    critic = label.RewardModelCritic(scorer, tie_margin=0.1)
    a = [video(0, (50, 50, 50))]
    b = [video(1, (20, 45, 90))]  # d = +0.30, +0.05, −0.40
    [verdict] = critic.compare(a, b, ["p"])
    assert verdict.labels == {"VQ": "A", "MQ": "tie", "TA": "B"} and verdict.raw is None
    assert critic.label(float("nan")) == "invalid" and critic.label(0.1) == "tie" and critic.label(-0.11) == "B"
    np.testing.assert_allclose(critic.score(a + b, ["p", "p"]).scores, [[0.5, 0.5, 0.5], [0.2, 0.45, 0.9]])


def test_reward_model_checkpoint_from_pretrained(world_run, tmp_path):
    from models.reward_model import Normalisation, RewardModel, RewardModelConfig

    torch.manual_seed(0)
    model = RewardModel(RewardModelConfig(device="cpu"))
    model.normalisation = Normalisation(("VQ", "MQ", "TA"), (0.0, 0.0, 0.0), (0.05, 0.05, 0.05), 2)
    folder = model.save_pretrained(tmp_path / "reward")
    layout, inputs = world_run
    cfg = LabelConfig(critic="reward_model", reward_model=str(folder), tie_margin=0.5, backend="local",
                      pairing="all_pairs")
    result, rows, scores = label_run(layout, inputs, cfg)
    assert len(rows) == 3 and all(s["reason"] is None for s in scores)
    for row in rows:
        for d in ("vq", "mq", "ta"):
            m = row[f"score_{d}"]
            assert row[f"label_{d}"] == ("tie" if abs(m) <= 0.5 else "A" if m > 0 else "B")
        assert row["critic"] == "reward_model:reward"
    with pytest.raises(ValueError, match="run train_reward first"):
        label_run(layout, inputs, LabelConfig(critic="reward_model"))
