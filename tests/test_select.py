"""`select` end to end on Ray (no Prefect): the world's good clips, real-format folders, re-deciding."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from data_contracts import read_manifest
from flows.config import resolve_config, save_config
from tasks import bootstrap, ingest, select
from tasks.common import execute_stage
from tasks.video_io import write_video
from tests.test_select_scores import real_clip

OWN_REASON = {
    "static": "static",
    "scene_cut": "scene_cut",
    "flicker": "flicker",
    "blur": "blurry",
    "caption_mismatch": "caption_disagrees",
    "too_short": "too_short",
    "corrupt": "truncated",
}
RATES = "{static: 0.06, scene_cut: 0.06, flicker: 0.06, blur: 0.06, caption_mismatch: 0.06, too_short: 0.06, corrupt: 0.04}"


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module; the stages' own `ray_session` calls reuse it."""
    from infra.ray_cluster import ray_session

    with ray_session(num_cpus=2):
        yield


def _stages(tmp_path, overrides):
    cfg = resolve_config(overrides=overrides)
    layout = cfg.layout(tmp_path / "runs", "sel")
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, layout.config_path)
    return cfg, layout


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("world")
    cfg, layout = _stages(
        tmp,
        [
            "ingest.world.num_clips=300",
            "ingest.world.seed=3",
            f"ingest.world.defect_rates={RATES}",
            "bootstrap.clip.steps=30",
            "bootstrap.clip.batch_size=32",
            "bootstrap.train_policy=false",
        ],
    )
    videos = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg.ingest, {}).manifest
    ckpts = execute_stage(bootstrap.run, layout, layout.stage("bootstrap"), cfg.bootstrap, {"videos": videos}).manifest
    inputs = {"videos": videos, "checkpoints": ckpts}
    # The world's tiny CLIP after 30 steps is only a smoke-tested scorer here: its similarity is
    # computed on the actor pool but not thresholded (the judge checks captions in the world).
    sel_cfg = cfg.select.model_copy(update={"min_text_similarity": None})
    outcome = execute_stage(select.run, layout, layout.stage("select"), sel_cfg, inputs)
    return layout, cfg, sel_cfg, inputs, outcome


def _rows(layout, path):
    return {r["video_id"]: r for r in read_manifest(path, "selection", layout).rows()}


def test_world_selection_precision_recall_and_own_reasons(world):
    layout, _, _, _, outcome = world
    sel = _rows(layout, outcome.manifest.path)
    truth = {r["video_id"]: r for r in read_manifest(layout.truth_path, "world_truth", layout).rows()}
    assert set(sel) == set(truth)  # every input row is kept
    good = {v for v, t in truth.items() if t["plausible"] and t["defect"] == "none" and t["caption_matches"]}
    chosen = {v for v, r in sel.items() if r["selected"]}
    precision = len(good & chosen) / len(chosen)
    recall = len(good & chosen) / len(good)
    assert precision >= 0.95 and recall >= 0.85, (precision, recall)

    reasons = defaultdict(Counter)
    for v, t in truth.items():
        if t["defect"] != "none":
            assert not sel[v]["selected"], (v, t["defect"])
            if t["plausible"]:  # an implausible clip may be rejected as `implausible` first
                reasons[t["defect"]][sel[v]["reason"]] += 1
    for defect, own in OWN_REASON.items():
        counts = reasons[defect]
        assert counts and counts[own] >= 0.9 * sum(counts.values()), (defect, dict(counts))
    for v, t in truth.items():
        if not t["plausible"] and t["defect"] == "none":
            assert not sel[v]["selected"]


def test_every_row_has_scores_passes_and_a_reason(world):
    layout, _, _, _, outcome = world
    for r in _rows(layout, outcome.manifest.path).values():
        passed = json.loads(r["passed_json"])
        assert r["selected"] == (r["reason"] is None) == all(passed.values())
        if r["reason"] not in ("truncated", "not_a_video"):
            assert r["score_motion"] is not None and r["score_quality"] is not None
            assert r["score_clip"] is not None  # computed on the CLIP actor pool
    assert outcome.counts["decoded"] > 0
    assert (outcome.manifest.path and (layout.stage("select").path / "plots" / "contact_sheet.png").exists())


def test_changing_only_a_threshold_redecides_without_decoding(world):
    layout, _, sel_cfg, inputs, first = world
    stricter = sel_cfg.model_copy(
        update={"thresholds": sel_cfg.thresholds.model_copy(update={"quality_min": 0.99}), "contact_sheet": 0}
    )
    again = execute_stage(select.run, layout, layout.stage("select"), stricter, inputs)
    assert not again.skipped and again.counts["decoded"] == 0
    assert again.counts["selected"] < first.counts["selected"]
    assert again.counts.get("reason:low_quality", 0) > 0


def test_a_forced_rerun_scores_again(world):
    """`--force` recomputes: the score cache the stage finds in its folder is not reused."""
    layout, _, sel_cfg, inputs, first = world
    forced = execute_stage(select.run, layout, layout.stage("select"), sel_cfg, inputs, force=True)
    assert not forced.skipped and forced.counts["decoded"] == first.counts["decoded"] > 0
    assert forced.counts["selected"] == first.counts["selected"]


def test_real_format_folder_lands_with_the_right_reasons(tmp_path, world):
    """Varied sizes and frame rates, a static clip, a hard cut, a corrupt file — and open_clip
    loaded by path, the way a real run names its pretrained weights."""
    w_layout, w_cfg, _, w_inputs, _ = world
    clip_dir = w_layout.stage("bootstrap").files("clip")
    folder = tmp_path / "clips"
    folder.mkdir()
    rng = np.random.default_rng(5)
    expected = {}
    for i, kind in enumerate(["normal", "normal", "normal", "static", "scene_cut", "blur", "flicker"]):
        frames, fps = real_clip(rng, kind)
        write_video(folder / f"{kind}{i}.mp4", frames, fps)
        (folder / f"{kind}{i}.txt").write_text(f"a clip of kind {kind}")
        expected[f"{kind}{i}"] = {"normal": None, "blur": "blurry"}.get(kind, kind)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 255, 3000, dtype=np.uint8)))
    (folder / "broken.txt").write_text("a broken file")
    expected["broken"] = "truncated"
    cfg, layout = _stages(
        tmp_path,
        [
            f"ingest.source={folder}",
            "select.physics=none",
            f"select.text.model={w_cfg.bootstrap.clip.model_name}",
            f"select.text.pretrained={clip_dir}",
            "select.min_text_similarity=-1.0",
            "select.limits.min_side=32",
        ],
    )
    videos = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg.ingest, {}).manifest
    out = execute_stage(select.run, layout, layout.stage("select"), cfg.select, {"videos": videos})
    got = {v: r["reason"] for v, r in _rows(layout, out.manifest.path).items()}
    assert got == expected
    assert all(r["score_clip"] is not None for r in _rows(layout, out.manifest.path).values() if r["reason"] != "truncated")


def test_a_vlm_scores_physics_of_real_footage_and_unreadable_answers_are_not_guessed(tmp_path, ray_local):
    """`physics: vlm` on an actor pool, with a tiny random-weight Qwen2-VL loaded from a folder by
    `from_pretrained`: its gibberish answers become `physics_unreadable`, never a verdict."""
    from models.vlm import build_tiny_vlm

    vlm_dir = build_tiny_vlm(tmp_path / "vlm")
    folder = tmp_path / "clips"
    folder.mkdir()
    rng = np.random.default_rng(8)
    for i, kind in enumerate(["normal", "normal", "static"]):
        frames, fps = real_clip(rng, kind)
        write_video(folder / f"{kind}{i}.mp4", frames, fps)
        (folder / f"{kind}{i}.txt").write_text("a red ball falls")
    cfg, layout = _stages(
        tmp_path,
        [f"ingest.source={folder}", "select.physics=vlm", f"select.vlm_model={vlm_dir}", "select.text.model=none"],
    )
    videos = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg.ingest, {}).manifest
    out = execute_stage(select.run, layout, layout.stage("select"), cfg.select, {"videos": videos})
    got = {v: (r["reason"], r["score_physics"]) for v, r in _rows(layout, out.manifest.path).items()}
    assert got == {"normal0": ("physics_unreadable", None), "normal1": ("physics_unreadable", None), "static2": ("static", None)}


def test_decisions_from_physics_scores():
    cfg = select.SelectConfig(physics="vlm", vlm_model="x")
    row = {"reason": None, "fps": 8.0, "num_frames": 16, "width": 64, "height": 64, "duration_s": 2.0}
    scores = {"motion": 0.1, "static": 0.2, "scene_cut": 1.0, "flicker": 0.0, "sharpness": 2.5, "quality": 0.8}
    assert select.decide_row(row, {**scores, "physics": 1.0}, cfg)[1] is None
    assert select.decide_row(row, {**scores, "physics": 0.0}, cfg)[1] == "implausible"
    assert select.decide_row(row, {**scores, "physics": None}, cfg)[1] == "physics_unreadable"
    assert select.decide_row(row, {**scores, "error": "VideoReadError: x"}, cfg)[1] == "decode_failed"


def test_auto_batch_size_keeps_every_worker_busy_within_the_per_task_bounds():
    # ~16 batches per worker, never below 64 videos (Ray's per-task cost) nor above 256
    assert select.auto_batch_size(2000, 2) == 64
    assert select.auto_batch_size(8000, 2) == 250
    assert select.auto_batch_size(8000, 1) == 256
    assert select.auto_batch_size(10**6, 4) == 256
    # a small folder still gives every worker a batch
    assert select.auto_batch_size(100, 2) == 50
    assert select.auto_batch_size(10, 2) == 5
    assert select.auto_batch_size(1, 2) == 1
