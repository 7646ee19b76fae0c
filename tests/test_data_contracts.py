"""Contracts: schemas, validated reads/writes, atomicity, lineage, cache keys, markers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import (
    CONTRACTS,
    ContractError,
    Lineage,
    RunLayout,
    completed_ref,
    config_hash,
    read_manifest,
    table_hash,
    write_manifest,
    write_marker,
)


@pytest.fixture()
def layout(tmp_path):
    return RunLayout(tmp_path / "runs", "t")


def _video_rows(layout, n=3):
    videos = layout.stage("ingest").files("videos")
    videos.mkdir(parents=True)
    rows = []
    for i in range(n):
        f = videos / f"v{i}.mp4"
        f.write_bytes(b"x")
        rows.append(
            dict(
                video_id=f"v{i}",
                video_path=layout.stored_path(f),
                caption=f"a red ball falls {i}",
                source="synthetic",
                split="train",
                reason=None,
                file_bytes=1,
                fps=8.0,
                num_frames=8,
                width=16,
                height=16,
                duration_s=1.0,
            )
        )
    return rows


def _write(layout, rows, path=None):
    path = path or layout.stage("ingest").manifest_path
    return write_manifest(rows, "videos", path, layout, Lineage(stage="ingest", config_hash="c"))


def test_every_manifest_kind_of_the_design_has_a_contract():
    for kind in ("videos", "selection", "generations", "labels", "evaluation", "checkpoints"):
        assert CONTRACTS[kind].version >= 1
        assert CONTRACTS[kind].schema.get_field_index(CONTRACTS[kind].id_column) >= 0


def test_round_trip_keeps_rows_lineage_and_hash(layout):
    rows = _video_rows(layout)
    ref = _write(layout, rows)
    m = read_manifest(ref.path, "videos", layout)
    assert m.rows() == rows
    assert m.ref.content_hash == ref.content_hash
    assert m.lineage.stage == "ingest" and m.lineage.config_hash == "c"
    assert m.lineage.code_version
    meta = pq.read_schema(ref.path).metadata
    assert meta[b"prefloop.kind"] == b"videos" and meta[b"prefloop.version"] == b"1"


def test_content_hash_is_stable_across_writes_and_changes_with_content(layout):
    rows = _video_rows(layout)
    a = _write(layout, rows)
    b = _write(layout, rows, layout.run_dir / "copy.parquet")
    assert a.content_hash == b.content_hash
    rows[1]["caption"] = "changed"
    c = _write(layout, rows, layout.run_dir / "changed.parquet")
    assert c.content_hash != a.content_hash


def _rewrite(path, table):
    pq.write_table(table, path)


def test_wrong_type_is_refused_on_read_naming_file_column_and_row(layout):
    ref = _write(layout, _video_rows(layout))
    t = pq.read_table(ref.path)
    frames = pa.array(["8", "8", "many"])
    t = t.set_column(t.schema.get_field_index("num_frames"), "num_frames", frames)
    _rewrite(ref.path, t)
    with pytest.raises(ContractError) as err:
        read_manifest(ref.path, "videos", layout)
    e = err.value
    assert e.path == ref.path and e.column == "num_frames" and e.row == 2
    assert "manifest.parquet" in str(e) and "column `num_frames`" in str(e) and "row 2" in str(e)


def test_path_outside_data_roots_is_refused_naming_the_row(layout, tmp_path):
    rows = _video_rows(layout)
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"x")
    ref = _write(layout, rows)
    t = pq.read_table(ref.path)
    paths = t.column("video_path").to_pylist()
    paths[1] = "../../elsewhere.mp4"
    paths[2] = str(outside)
    _rewrite(ref.path, t.set_column(1, "video_path", pa.array(paths)))
    with pytest.raises(ContractError) as err:
        read_manifest(ref.path, "videos", layout)
    assert err.value.column == "video_path" and err.value.row == 1
    assert "outside the run's data roots" in str(err.value)
    # the same folder becomes valid once it is a declared data root
    widened = RunLayout(layout.runs_root, layout.run, extra_roots=(tmp_path,))
    assert len(read_manifest(ref.path, "videos", widened)) == 3


def test_symlink_out_of_the_root_is_refused(layout, tmp_path):
    rows = _video_rows(layout)
    target = tmp_path / "secret.mp4"
    target.write_bytes(b"x")
    link = layout.run_dir / "ingest" / "videos" / "link.mp4"
    link.symlink_to(target)
    rows[0]["video_path"] = layout.stored_path(link)
    with pytest.raises(ContractError) as err:
        _write(layout, rows)
    assert err.value.row == 0 and err.value.column == "video_path"


def test_real_roots_resolve_every_path_as_the_file_system_does(tmp_path, monkeypatch):
    """RealRoots resolves each folder once; it must still agree with os.path.realpath where a name
    alone would mislead: a folder symlink followed by `..`, a file that is a symlink, `..` last."""
    from data_contracts import RealRoots, inside_roots

    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    (other / "deep").mkdir(parents=True)
    (root / "out").symlink_to(other / "deep")
    (root / "sub" / "file.mp4").write_bytes(b"x")
    (root / "sub" / "leak.mp4").symlink_to(other / "deep")
    monkeypatch.chdir(root)
    roots = RealRoots([root])
    cases = {
        root / "sub" / "file.mp4": True,
        root / "sub" / ".." / "sub" / "file.mp4": True,
        root / "out" / ".." / "x.mp4": False,  # by name inside the root; by the file system in `other`
        root / "sub" / "leak.mp4": False,
        root / "sub" / "..": True,
        root / "..": False,
        Path("sub/file.mp4"): True,
        Path("out/x.mp4"): False,
    }
    for path, inside in cases.items():
        assert roots.realpath(path) == os.path.realpath(path), path
        assert roots.contains(path) is inside and inside_roots(path, [root]) is inside, path


def test_missing_file_nulls_allowed_values_and_duplicates_are_refused(layout):
    rows = _video_rows(layout)
    (layout.resolve(rows[2]["video_path"])).unlink()
    with pytest.raises(ContractError, match="does not exist") as err:
        _write(layout, rows)
    assert err.value.row == 2
    rows[2]["reason"] = "missing_file"  # a recorded reason excuses the missing file
    _write(layout, rows)

    bad = [dict(r) for r in rows]
    bad[0]["reason"] = "it looked odd"
    with pytest.raises(ContractError, match="is not one of") as err:
        _write(layout, bad)
    assert (err.value.column, err.value.row) == ("reason", 0)

    bad = [dict(r) for r in rows]
    bad[1]["source"] = None
    with pytest.raises(ContractError, match="must not be null") as err:
        _write(layout, bad)
    assert (err.value.column, err.value.row) == ("source", 1)

    bad = [dict(r) for r in rows]
    bad[2]["video_id"] = "v0"
    with pytest.raises(ContractError, match="duplicate id") as err:
        _write(layout, bad)
    assert (err.value.column, err.value.row) == ("video_id", 2)


def test_missing_and_unknown_columns_and_wrong_kind(layout):
    ref = _write(layout, _video_rows(layout))
    t = pq.read_table(ref.path)
    _rewrite(ref.path, t.drop_columns(["caption"]))
    with pytest.raises(ContractError, match="missing column") as err:
        read_manifest(ref.path, "videos", layout)
    assert err.value.column == "caption"
    with pytest.raises(ContractError, match="not `labels`"):
        ref = _write(layout, _video_rows(RunLayout(layout.runs_root, "u")), layout.run_dir / "v.parquet")
        read_manifest(ref.path, "labels", layout)


def test_bad_value_in_rows_names_row(layout):
    rows = _video_rows(layout)
    rows[1]["num_frames"] = "eight"
    with pytest.raises(ContractError) as err:
        _write(layout, rows)
    assert (err.value.column, err.value.row) == ("num_frames", 1)


def test_write_is_atomic_when_validation_fails(layout):
    rows = _video_rows(layout)
    ref = _write(layout, rows)
    before = pq.read_table(ref.path)
    rows[0]["split"] = "test"
    with pytest.raises(ContractError):
        _write(layout, rows)
    assert pq.read_table(ref.path).equals(before)
    leftovers = [p for p in layout.stage("ingest").path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_marker_and_cache_key(layout):
    rows = _video_rows(layout)
    stage = layout.stage("ingest")
    lin = Lineage(stage="ingest", inputs={}, config_hash=config_hash({"a": 1}))
    ref = write_manifest(rows, "videos", stage.manifest_path, layout, lin)
    assert completed_ref(stage, lin.cache_key) is None  # no marker yet
    write_marker(stage, ref, lin.cache_key, {"status": "complete"})
    assert completed_ref(stage, lin.cache_key) == ref
    other = Lineage(stage="ingest", config_hash=config_hash({"a": 2}))
    assert other.cache_key != lin.cache_key and completed_ref(stage, other.cache_key) is None
    stage.manifest_path.unlink()  # a marker without its manifest is not trusted
    assert completed_ref(stage, lin.cache_key) is None


def test_table_hash_ignores_chunking():
    t = pa.table({"a": [1, 2, 3, 4]})
    chunked = pa.concat_tables([t.slice(0, 1), t.slice(1)])
    assert table_hash(t) == table_hash(chunked)


def test_round_stages_need_a_round(layout):
    assert layout.stage("generate", 1).path.name == "generate"
    assert layout.stage("generate", 2).path.parent.name == "round-02"
    with pytest.raises(ValueError, match="per round"):
        layout.stage("generate")
    with pytest.raises(ValueError, match="once per run"):
        layout.stage("ingest", 1)
    with pytest.raises(ValueError, match="not allowed"):
        RunLayout(layout.runs_root, "../escape")


def test_contracts_import_no_heavy_frameworks():
    code = "import data_contracts, sys; print(sorted(m for m in ('torch','prefect','ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
