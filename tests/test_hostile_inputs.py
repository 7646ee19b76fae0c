"""The hostile-input corpus: what a careless or malicious dataset can hand `ingest` and `select`.

Every input here is built by the test. Each must end as a clear error naming the file, the
column or row and the fix, or as a row with a recorded reason; none may crash a stage, and no
byte of a file outside the run's data roots may be read. "Read" is checked on the file itself:
its access time is set before its modification time, so that the kernel's `relatime` rule
updates it on the first read (a `stat` does not), and any read shows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import ContractError, Lineage, RunLayout, read_manifest, write_manifest
from flows.config import resolve_config, save_config
from tasks import ingest, select
from tasks.common import execute_stage
from tasks.generate import select_prompts
from tasks.ingest import IngestConfig
from tasks.video_io import VideoReadError, read_video, write_video
from tests.conftest import small_frames
from tests.test_select_scores import real_clip

LONG_CAPTION = "a red ball falls " * 6000  # 102,000 characters
CONTROL_CAPTION = "a red ball \x1b[31mfalls\x00 and bounces"


class Canary:
    """A file outside the data roots that tells whether anything read it."""

    def __init__(self, path: Path, data: bytes):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (1_000_000, time.time()))  # atime before mtime: the next read updates it

    def untouched(self) -> bool:
        return self.path.stat().st_atime == 1_000_000


@pytest.fixture(scope="module")
def ray_local():
    from infra.ray_cluster import ray_session

    with ray_session(num_cpus=2):
        yield


def _clip(rng, kind="normal"):
    frames, fps = real_clip(rng, kind)
    return frames, fps


@pytest.fixture()
def corpus(tmp_path):
    """A folder of hostile videos and captions, and canaries outside it."""
    rng = np.random.default_rng(11)
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    write_video(tmp_path / "secret.mp4", _clip(rng)[0], 8)
    video_canary = Canary(outside / "secret.mp4", (tmp_path / "secret.mp4").read_bytes())
    text_canary = Canary(outside / "secret.txt", b"the caption nobody may read")

    def good(name: str, caption: str | None = "a red ball falls") -> None:
        frames, fps = _clip(rng)
        write_video(data / f"{name}.mp4", frames, fps)
        if caption is not None:
            (data / f"{name}.txt").write_text(caption)

    expected: dict[str, str | None] = {}
    good("good")
    expected["good"] = None
    # 1. frames: none, one, an image posing as a video, a truncated stream, text named .mp4
    writer = cv2.VideoWriter(str(data / "zero_frames.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (32, 32))
    writer.release()
    (data / "zero_frames.txt").write_text("a blue ball rolls")
    expected["zero_frames"] = "not_a_video"
    write_video(data / "one_frame.mp4", small_frames(n=1), 8)
    (data / "one_frame.txt").write_text("a blue ball rolls")
    expected["one_frame"] = None  # readable; select rejects it as too_short
    ok, png = cv2.imencode(".png", np.full((32, 32, 3), 90, np.uint8))
    (data / "image.mp4").write_bytes(png.tobytes())
    (data / "image.txt").write_text("a green ball falls")
    expected["image"] = None  # FFmpeg reads a PNG as one frame: select rejects it as too_short
    frames, fps = _clip(rng)
    write_video(data / "whole.mp4", np.concatenate([frames, frames, frames]), fps)
    blob = (data / "whole.mp4").read_bytes()
    (data / "whole.mp4").unlink()
    (data / "truncated.mp4").write_bytes(blob[: len(blob) // 2])
    (data / "truncated.txt").write_text("a green ball falls")
    expected["truncated"] = "truncated"
    (data / "notes.mp4").write_text("not a video at all\n" * 50)
    (data / "notes.txt").write_text("a red ball falls")
    expected["notes"] = "not_a_video"
    # 2. wrong extensions: a real mp4 named .avi is read by its content
    frames, fps = _clip(rng)
    write_video(data / "tmp.mp4", frames, fps)
    os.rename(data / "tmp.mp4", data / "really_mp4.avi")
    (data / "really_mp4.txt").write_text("a yellow ball rolls")
    expected["really_mp4"] = None
    # 3. huge dimensions: a real 1024x1024 clip (a test sets select's decode budget below it)
    write_video(data / "huge.mp4", np.zeros((4, 1024, 1024, 3), np.uint8) + 60, 8)
    (data / "huge.txt").write_text("a purple ball falls")
    expected["huge"] = None
    # 4. captions: 100k characters, control characters, none, one behind a symlink out of the folder
    good("long_caption", LONG_CAPTION)
    expected["long_caption"] = "caption_too_long"
    good("control_caption", CONTROL_CAPTION)
    expected["control_caption"] = "bad_caption"
    good("no_caption", None)
    expected["no_caption"] = "missing_caption"
    good("linked_caption", None)
    (data / "linked_caption.txt").symlink_to(text_canary.path)
    expected["linked_caption"] = "missing_caption"
    # 5. a video symlinked out of the folder
    (data / "escape.mp4").symlink_to(video_canary.path)
    (data / "escape.txt").write_text("a red ball falls")
    expected["escape"] = "outside_data_roots"
    return data, expected, (video_canary, text_canary)


def _run(tmp_path: Path, overrides: list[str], name: str = "hostile"):
    cfg = resolve_config(overrides=overrides)
    layout = cfg.layout(tmp_path / "runs", name)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, layout.config_path)
    return cfg, layout


def test_a_hostile_folder_is_ingested_and_selected_with_reasons_and_nothing_outside_is_read(tmp_path, corpus, ray_local):
    data, expected, canaries = corpus
    cfg, layout = _run(
        tmp_path,
        [f"ingest.source={data}", "select.physics=none", "select.text.model=none", "select.scoring.max_decode_mib=8"],
    )
    videos = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg.ingest, {})
    rows = {r["video_id"]: r for r in read_manifest(videos.manifest.path, "videos", layout).rows()}
    assert {v: r["reason"] for v, r in rows.items()} == expected
    # kept with its reason, read no further than 4x the limit (a caption file may be any size)
    assert LONG_CAPTION.startswith(rows["long_caption"]["caption"]) and len(rows["long_caption"]["caption"]) > 4000
    assert rows["escape"]["file_bytes"] is None and rows["escape"]["num_frames"] is None, "not even probed"
    assert rows["huge"]["width"] == 1024 and rows["one_frame"]["num_frames"] == 1
    assert videos.counts["reason:caption_too_long"] == 1 and videos.counts["reason:outside_data_roots"] == 1

    out = execute_stage(select.run, layout, layout.stage("select"), cfg.select, {"videos": videos.manifest})
    got = {r["video_id"]: r["reason"] for r in read_manifest(out.manifest.path, "selection", layout).rows()}
    want = {**expected, "good": None, "really_mp4": None, "one_frame": "too_short", "image": "too_short",
            "huge": "too_large"}
    assert got == want
    assert out.counts["decoded"] == 4, "good, really_mp4, one_frame, image: not the huge clip, not a bad row"
    assert all(c.untouched() for c in canaries), "a file outside the data roots was read"


def test_a_listing_with_escaping_duplicate_and_odd_paths(tmp_path, ray_local):
    rng = np.random.default_rng(3)
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "clips").mkdir(parents=True)
    (data / "a_folder.mp4").mkdir()
    canary = Canary(outside / "x.mp4", b"\x00" * 4096)
    frames, fps = _clip(rng)
    write_video(data / "clips" / "a.mp4", frames, fps)
    write_video(data / "clips" / "b.mp4", frames, fps)
    os.rename(data / "clips" / "b.mp4", data / "clips" / "b.bin")
    os.symlink(canary.path, data / "clips" / "link.mp4")
    long_name = "d/" * 1500 + "x.mp4"
    listing = data / "list.csv"
    lines = [
        ("a", "clips/a.mp4", "a red ball falls"),
        ("a", "clips/a.mp4", "a red ball falls"),  # the same id twice
        ("a#2", "clips/a.mp4", "a red ball falls"),  # an id the second `a` must not take
        ("abs", str(canary.path), "a red ball falls"),
        ("dots", "clips/../../outside/x.mp4", "a red ball falls"),
        ("link", "clips/link.mp4", "a red ball falls"),
        ("folder", "a_folder.mp4", "a red ball falls"),
        ("long", long_name, "a red ball falls"),
        ("bin", "clips/b.bin", "a red ball falls"),
        ("missing", "clips/nope.mp4", "a red ball falls"),
        ("number", 12345, "a red ball falls"),
    ]
    pq.write_table(
        pa.table({"id": [r[0] for r in lines], "path": [str(r[1]) for r in lines], "caption": [r[2] for r in lines]}),
        listing.with_suffix(".parquet"),
    )
    cfg, layout = _run(tmp_path, [f"ingest.source={listing.with_suffix('.parquet')}", "ingest.id_column=id"])
    videos = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg.ingest, {})
    got = [(r["video_id"], r["reason"]) for r in read_manifest(videos.manifest.path, "videos", layout).rows()]
    assert got == [
        ("a", None), ("a#3", None), ("a#2", None), ("abs", "outside_data_roots"), ("dots", "outside_data_roots"),
        ("link", "outside_data_roots"), ("folder", "not_a_file"), ("long", "missing_file"), ("bin", None),
        ("missing", "missing_file"), ("number", "missing_file"),
    ]
    assert canary.untouched()


@pytest.mark.parametrize(
    "table, column, problem",
    [
        (pa.table({"path": [["a.mp4"]], "caption": ["x"]}), "path", "not text"),
        (pa.table({"path": ["a.mp4"], "caption": [{"en": "x"}]}), "caption", "not text"),
        (pa.table({"path": ["a\x00.mp4"], "caption": ["x"]}), "path", "control character"),
        (pa.table({"path": ["  "], "caption": ["x"]}), "path", "empty video path"),
        (pa.table({"video": ["a.mp4"], "caption": ["x"]}), "path", "no column `path`"),
    ],
)
def test_a_listing_of_the_wrong_shape_is_one_error_naming_file_and_column(tmp_path, table, column, problem):
    data = tmp_path / "data"
    data.mkdir()
    listing = data / "list.parquet"
    pq.write_table(table, listing)
    cfg = IngestConfig(source=str(listing))
    layout = RunLayout(tmp_path / "runs", "bad", extra_roots=(data,))
    with pytest.raises(ContractError) as err:
        ingest.run({}, cfg, layout, layout.stage("ingest"), Lineage("ingest"))
    assert err.value.path == str(listing) and err.value.column == column and problem in str(err.value)
    assert "--set ingest." in err.value.fix or "path" in err.value.fix
    assert not layout.stage("ingest").manifest_path.exists()


# --- hostile manifests handed to the next stage ----------------------------------------------


@pytest.fixture()
def good_videos(tmp_path):
    """A valid one-row `videos` manifest and the layout it belongs to."""
    layout = RunLayout(tmp_path / "runs", "m")
    out = layout.stage("ingest")
    out.files("videos").mkdir(parents=True)
    write_video(out.files("videos") / "v0.mp4", small_frames(), 8)
    row = {"video_id": "v0", "video_path": "ingest/videos/v0.mp4", "caption": "a red ball falls", "source": "t",
           "split": "train", "reason": None, "file_bytes": 100, "fps": 8.0, "num_frames": 8, "width": 32,
           "height": 32, "duration_s": 1.0}
    write_manifest([row], "videos", out.manifest_path, layout, Lineage("ingest"))
    return layout, row


def _tamper(layout: RunLayout, rows: list[dict]) -> Path:
    """Write `rows` as a `videos` manifest by hand, as a user editing it would (no validation;
    Python ints land as int64, which the contract's int32 columns accept when they fit)."""
    path = layout.stage("ingest").manifest_path
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    "change, column, row, problem",
    [
        (lambda r: [{**r, "num_frames": "8"}], "num_frames", 0, "wrong type"),
        (lambda r: [{k: v for k, v in r.items() if k != "split"}], "split", None, "missing column"),
        (lambda r: [r, dict(r)], "video_id", 1, "duplicate id"),
        (lambda r: [r, {**r, "video_id": "v1", "video_path": "/etc/passwd"}], "video_path", 1, "outside the run's data roots"),
        (lambda r: [{**r, "video_path": "../../../../etc/passwd"}], "video_path", 0, "outside the run's data roots"),
        (lambda r: [{**r, "video_path": "x" * 5000 + ".mp4"}], "video_path", 0, "cannot be looked up"),
        (lambda r: [r, {**r, "video_id": "v1", "num_frames": -8}], "num_frames", 1, "outside [0, inf]"),
        (lambda r: [{**r, "file_bytes": -1}], "file_bytes", 0, "outside [0, inf]"),
        (lambda r: [{**r, "fps": float("nan")}], "fps", 0, "outside [0, inf]"),
        (lambda r: [{**r, "duration_s": float("inf")}], "duration_s", 0, "outside [0, inf]"),
        (lambda r: [{**r, "reason": "looked odd"}], "reason", 0, "is not one of"),
        (lambda r: [{**r, "video_id": None}], "video_id", 0, "null value"),
    ],
)
def test_a_tampered_manifest_is_one_error_naming_file_column_and_row(good_videos, change, column, row, problem):
    layout, good = good_videos
    path = _tamper(layout, change(good))
    with pytest.raises(ContractError) as err:
        read_manifest(path, "videos", layout)
    assert (err.value.path, err.value.column, err.value.row) == (str(path), column, row)
    assert problem in err.value.problem and err.value.fix


def test_a_symlink_out_of_the_run_and_a_non_parquet_manifest_are_refused(good_videos, tmp_path):
    layout, good = good_videos
    canary = Canary(tmp_path / "elsewhere" / "v.mp4", b"\x00" * 64)
    os.symlink(canary.path, layout.run_dir / "ingest" / "videos" / "link.mp4")
    path = _tamper(layout, [{**good, "video_path": "ingest/videos/link.mp4"}])
    with pytest.raises(ContractError, match="outside the run's data roots"):
        read_manifest(path, "videos", layout)
    assert canary.untouched()
    path.write_bytes(b"PAR1 but not really")
    with pytest.raises(ContractError, match="not a readable Parquet file"):
        read_manifest(path, "videos", layout)


def test_declared_and_actual_sizes_beyond_the_decode_budget_are_too_large_not_a_crash(tmp_path, ray_local):
    """A manifest may declare dimensions no memory holds (2·10⁹ px), or declare small ones for a
    file whose frames are large: the first is refused unopened, the second while decoding."""
    cfg, layout = _run(tmp_path, ["select.physics=none", "select.text.model=none", "select.scoring.max_decode_mib=4"])
    out = layout.stage("ingest")
    out.files("videos").mkdir(parents=True)
    frames, fps = real_clip(np.random.default_rng(1), "normal")
    write_video(out.files("videos") / "small.mp4", frames, fps)
    write_video(out.files("videos") / "big.mp4", np.zeros((8, 768, 768, 3), np.uint8) + 80, 8)
    base = {"source": "t", "split": "train", "reason": None, "file_bytes": 1, "fps": fps, "duration_s": 2.0,
            "caption": "a red ball falls"}
    rows = [
        {**base, "video_id": "declared_huge", "video_path": "ingest/videos/small.mp4", "num_frames": 16,
         "width": 2_000_000_000, "height": 2_000_000_000},
        {**base, "video_id": "lies_small", "video_path": "ingest/videos/big.mp4", "num_frames": 8, "width": 32,
         "height": 32, "fps": 8.0, "duration_s": 1.0},
        {**base, "video_id": "honest", "video_path": "ingest/videos/small.mp4", "num_frames": len(frames),
         "width": frames.shape[2], "height": frames.shape[1]},
    ]
    videos = write_manifest(rows, "videos", out.manifest_path, layout, Lineage("ingest"))
    result = execute_stage(select.run, layout, layout.stage("select"), cfg.select, {"videos": videos})
    got = {r["video_id"]: r["reason"] for r in read_manifest(result.manifest.path, "selection", layout).rows()}
    assert got["declared_huge"] == "too_large" and got["lies_small"] == "too_large"
    assert got["honest"] != "too_large"
    assert result.counts["decoded"] == 2, "the declared-huge row is never opened"
    with pytest.raises(VideoReadError) as err:
        read_video(out.files("videos") / "big.mp4", max_bytes=4 * 2**20)
    assert err.value.reason == "too_large"


def test_unusable_captions_are_never_prompts(good_videos):
    layout, good = good_videos
    rows = [
        {**good, "video_id": "ok", "caption": "a red ball falls"},
        {**good, "video_id": "ctl", "caption": CONTROL_CAPTION, "reason": "bad_caption"},
        {**good, "video_id": "long", "caption": LONG_CAPTION, "reason": "caption_too_long"},
        {**good, "video_id": "broken_file", "caption": "a blue ball rolls", "reason": "truncated"},
    ]
    ref = write_manifest(rows, "videos", layout.stage("ingest").manifest_path, layout, Lineage("ingest"))
    prompts = select_prompts({"videos": ref}, "train", None, None, layout, "generate")
    assert prompts == ["a blue ball rolls", "a red ball falls"], "a broken file's caption is still a good prompt"


def test_caption_rules():
    assert ingest.caption_problem(None, 10) == "missing_caption"
    assert ingest.caption_problem("a ball\tfalls\nand bounces", 100) is None
    assert ingest.caption_problem("a ball \x1b[31m", 100) == "bad_caption"
    assert ingest.caption_problem("a ball \x85", 100) == "bad_caption"
    assert ingest.caption_problem("x" * 11, 10) == "caption_too_long"
    assert ingest.unique_ids(["a", "a", "a#2", "a"]) == ["a", "a#3", "a#2", "a#4"]
    assert ingest.caption_problem("émoji ✓ ok", 100) is None
