"""`train_reward` as a stage: labelled world pairs in, a loadable reward model with its accuracy table out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_contracts import Lineage, read_manifest
from models.reward_model import RewardModel
from tasks import label, train_reward
from tasks.label import LabelConfig
from tasks.train_reward import TrainRewardConfig
from tests.test_label import make_run, twins

VIOLATIONS = ("teleport", "stop_midair", "anti_gravity", "colour_change", "pass_through_floor")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_labels_to_a_reward_model_that_prefers_plausible_motion(tmp_path):
    # 1. 40 prompts, each an implausible sample and its plausible twin
    prompts = []
    for seed in range(40):
        caption, good, bad = twins(seed, VIOLATIONS[seed % len(VIOLATIONS)])
        prompts.append((f"{caption} (scene {seed})", [bad, good]))  # the world repeats captions
    layout, inputs = make_run(tmp_path, prompts)
    lab_cfg = LabelConfig(label_noise=0.0, tie_rate=0.0)
    out = layout.stage("label", round=1)
    labels = label.run(inputs, lab_cfg, layout, out, Lineage("label", {}, lab_cfg.hash()), round=1).manifest
    # 2. train on them, from scratch (no bootstrap CLIP in this run), few steps
    cfg = TrainRewardConfig.model_validate(
        {"init_clip": None, "heldout_fraction": 0.25, "model": {"steps": 150, "batch_size": 16, "seed": 0}}
    )
    out = layout.stage("train_reward", round=1)
    out.path.mkdir(parents=True)
    result = train_reward.run({"labels": labels}, cfg, layout, out, Lineage("train_reward", {}, cfg.hash()), round=1)
    # 3. a checkpoints row that loads through from_pretrained, with the accuracies and a histogram
    (row,) = read_manifest(result.manifest.path, "checkpoints", layout).rows()
    assert row["kind"] == "reward_model" and row["round"] == 1
    assert result.counts["pairs_used"] == 40 and result.counts["heldout_pairs"] == 10
    metrics = json.loads(row["metrics_json"])
    assert metrics["mq_acc_wo_ties"] >= 0.7, metrics
    assert 0.3 <= metrics["mq_random_wo_ties"] <= 0.7
    model = RewardModel.from_pretrained(layout.resolve(row["path"]))
    from tasks.video_io import read_video

    held = [json.loads(json.dumps(r)) for r in read_manifest(labels.path, "labels", layout).rows()][:8]
    a = np.stack([read_video(layout.resolve(r["video_a"])) for r in held])
    b = np.stack([read_video(layout.resolve(r["video_b"])) for r in held])
    with torch.no_grad():
        ra = model.score(a, [r["prompt"] for r in held], fps=8.0)
        rb = model.score(b, [r["prompt"] for r in held], fps=8.0)
    assert (ra[:, 1] > rb[:, 1]).float().mean() >= 0.75, "MQ prefers the plausible twin"
    assert all(p.is_file() for p in map(lambda s: __import__("pathlib").Path(s), result.images.values()))


def test_no_readable_pair_is_a_clear_error(tmp_path):
    layout, inputs = make_run(tmp_path, [("a red ball falls", [b"not a video", b"nor this"])])
    cfg = LabelConfig()
    labels = label.run(inputs, cfg, layout, layout.stage("label", round=1), Lineage("label", {}, cfg.hash()), round=1).manifest
    tcfg = TrainRewardConfig(init_clip=None)
    with pytest.raises(ValueError, match="no pair with two readable videos"):
        train_reward.run({"labels": labels}, tcfg, layout, layout.stage("train_reward", round=1), Lineage("t", {}, "x"))
