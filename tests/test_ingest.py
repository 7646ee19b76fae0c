"""`ingest` without Prefect: the embedded world, folders and listings, bad files kept with reasons."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from data_contracts import ContractError, RunLayout, read_manifest
from flows.config import RunConfig
from tasks import ingest
from tasks.common import execute_stage
from tasks.ingest import IngestConfig, WorldConfig, assign_splits, exact_assignment, heldout_captions
from tasks.video_io import read_video, write_video
from tests.conftest import small_frames


def _ingest(tmp_path, cfg: IngestConfig, run="r"):
    layout = RunConfig(ingest=cfg).layout(tmp_path / "runs", run)
    outcome = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg, {})
    return layout, outcome, read_manifest(outcome.manifest.path, "videos", layout)


def test_folder_keeps_every_bad_file_with_its_reason(tmp_path, messy_folder):
    layout, outcome, m = _ingest(tmp_path, IngestConfig(source=str(messy_folder)))
    by_id = {r["video_id"]: r for r in m.rows()}
    assert set(by_id) == {"good", "sub/nocaption", "truncated", "empty", "notes"}
    assert by_id["good"]["reason"] is None and by_id["good"]["caption"] == "a red ball falls"
    assert by_id["good"]["num_frames"] == 8 and by_id["good"]["width"] == 32 and by_id["good"]["fps"] == 8.0
    assert by_id["sub/nocaption"]["reason"] == "missing_caption"
    assert by_id["empty"]["reason"] == "empty_file"
    assert by_id["notes"]["reason"] == "not_a_video"
    assert by_id["truncated"]["reason"] in {"truncated", "not_a_video", "no_frames"}
    # videos are referenced where they are, inside the source folder (a data root)
    assert layout.resolve(by_id["good"]["video_path"]) == messy_folder / "good.mp4"
    assert outcome.counts["videos"] == 5 and outcome.counts["usable"] == 1


def _listing_rows(root):
    write_video(root / "a.mp4", small_frames(), 8)
    write_video(root / "b.mp4", small_frames(seed=3), 8)
    return [{"video": "a.mp4", "text": "a red ball falls"}, {"video": "b.mp4", "text": ""}]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_listing_with_column_mapping_and_relative_paths(tmp_path, fmt):
    root = tmp_path / "data"
    root.mkdir()
    rows = _listing_rows(root)
    listing = root / f"list.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "csv":
        pyarrow.csv.write_csv(table, listing)
    elif fmt == "parquet":
        pq.write_table(table, listing)
    else:
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = IngestConfig(source=str(listing), path_column="video", caption_column="text")
    _, _, m = _ingest(tmp_path, cfg)
    got = {r["video_id"]: (r["caption"], r["reason"], r["source"]) for r in m.rows()}
    assert got == {"a.mp4": ("a red ball falls", None, "listing"), "b.mp4": (None, "missing_caption", "listing")}


def test_listing_without_caption_column_fails_naming_file_and_column(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_video(root / "a.mp4", small_frames(), 8)
    listing = root / "list.csv"
    listing.write_text("path,title\na.mp4,a red ball falls\n")
    with pytest.raises(ContractError) as err:
        _ingest(tmp_path, IngestConfig(source=str(listing)))
    assert err.value.path == str(listing) and err.value.column == "caption"
    assert "ingest.caption_column" in str(err.value)
    assert not (tmp_path / "runs" / "r" / "ingest" / "manifest.parquet").exists()


def test_listing_path_outside_data_roots_is_recorded_not_followed(tmp_path):
    root, other = tmp_path / "data", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    write_video(other / "x.mp4", small_frames(), 8)
    listing = root / "list.csv"
    listing.write_text(f"path,caption\n../other/x.mp4,a red ball falls\n{other / 'x.mp4'},a red ball falls\n")
    _, _, m = _ingest(tmp_path, IngestConfig(source=str(listing)))
    assert [r["reason"] for r in m.rows()] == ["outside_data_roots", "outside_data_roots"]


def test_exact_assignment_counts_are_exact_and_seeded():
    rng = np.random.default_rng(0)
    labels = exact_assignment(1000, {"a": 0.05, "b": 0.123}, rng)
    assert Counter(labels) == {None: 827, "a": 50, "b": 123}
    assert labels == exact_assignment(1000, {"a": 0.05, "b": 0.123}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="lower them"):
        exact_assignment(10, {"a": 0.7, "b": 0.7}, rng)


def test_heldout_split_is_an_exact_share_of_distinct_captions():
    captions = [f"caption {i % 50}" for i in range(500)] + [None, "Caption  7 "]
    held = heldout_captions(captions, 0.1)
    assert len(held) == 5
    assert held == heldout_captions(list(reversed(captions)), 0.1)  # order does not matter
    rows = [{"caption": c} for c in captions]
    assign_splits(rows, 0.1)
    assert rows[-1]["split"] == rows[7]["split"]  # same caption up to case and spaces
    assert rows[-2]["split"] == "train"  # no caption: never a prompt
    assert sum(r["split"] == "heldout" for r in rows) in range(45, 52)
    assert heldout_captions(["only one"], 0.5) == set() and heldout_captions(captions, 0.0) == set()


def test_synthetic_world_counts_match_rates_and_clips_decode(tmp_path):
    world = WorldConfig(num_clips=200, seed=5)
    cfg = IngestConfig(world=world)
    layout, outcome, m = _ingest(tmp_path, cfg)
    truth = read_manifest(layout.truth_path, "world_truth", layout)
    assert len(m) == len(truth) == 200
    defects = Counter(r["defect"] for r in truth.rows())
    for name, rate in world.defect_rates.items():
        assert defects[name] == round(rate * 200), name
    assert sum(not r["plausible"] for r in truth.rows()) == round(world.implausible_rate * 200)
    truth_by_id = {r["video_id"]: r for r in truth.rows()}
    for row in m.rows():
        if truth_by_id[row["video_id"]]["defect"] == "corrupt":
            assert row["reason"] in {"not_a_video", "truncated", "no_frames"}
        else:
            assert row["reason"] is None, row
            frames = read_video(layout.resolve(row["video_path"]))
            assert frames.shape[1:] == (16, 16, 3)
    # ground truth never enters the manifest the learning stages read
    assert not {"plausible", "violation", "defect"} & set(m.table.column_names)
    assert outcome.counts["defect:corrupt"] == defects["corrupt"]


def test_synthetic_world_is_deterministic_and_cached(tmp_path):
    cfg = IngestConfig(world=WorldConfig(num_clips=30, seed=1))
    layout, first, m1 = _ingest(tmp_path, cfg, run="a")
    _, _, m2 = _ingest(tmp_path, cfg, run="b")
    assert m1.ref.content_hash != "" and [r["caption"] for r in m1.rows()] == [r["caption"] for r in m2.rows()]
    a = read_video(layout.resolve(m1.rows()[0]["video_path"]))
    b = read_video(RunLayout(layout.runs_root, "b").resolve(m2.rows()[0]["video_path"]))
    assert np.array_equal(a, b)
    again = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg, {})
    assert again.skipped and again.manifest == first.manifest
    changed = cfg.model_copy(update={"heldout_fraction": 0.3})
    assert not execute_stage(ingest.run, layout, layout.stage("ingest"), changed, {}).skipped
