"""Reading and writing manifests, validated against their contract.

Every write and every read checks the whole contract: column set and types, nulls, allowed
values, unique ids, and file paths (inside the run's data roots, present on disk). A violation
raises one `ContractError` naming the file, the column, the row and the fix. Writes are atomic;
the lineage and the content hash travel in the Parquet key-value metadata, so a manifest is
self-describing and its fingerprint is read without scanning it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts.errors import ContractError
from data_contracts.layout import RealRoots, RunLayout, StageDir, inside_roots
from data_contracts.lineage import Lineage, atomic_write_bytes, atomic_write_json, table_hash
from data_contracts.schemas import Contract, contract

META_KIND = b"prefloop.kind"
META_VERSION = b"prefloop.version"
META_LINEAGE = b"prefloop.lineage"
META_HASH = b"prefloop.content_hash"


@dataclass(frozen=True)
class ManifestRef:
    """What stages pass to each other (and what Prefect stores): a path and a fingerprint."""

    kind: str
    path: str
    content_hash: str


@dataclass(frozen=True)
class Manifest:
    ref: ManifestRef
    table: pa.Table
    lineage: Lineage

    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()

    def __len__(self) -> int:
        return self.table.num_rows


def _fix_for(c: Contract, column: str | None) -> str:
    if column is not None and column in c.hints:
        return c.hints[column]
    return f"rerun the `{c.producer}` stage that writes `{c.kind}` manifests (contract v{c.version}), or correct the file"


def _conform(table: pa.Table, c: Contract, path: Path) -> pa.Table:
    """The table in exactly the contract's schema, or a ContractError for the first problem."""
    # 1. column set
    missing = [n for n in c.schema.names if n not in table.column_names]
    if missing:
        raise ContractError(
            path, f"missing column (the `{c.kind}` contract v{c.version} needs it)", _fix_for(c, missing[0]), column=missing[0]
        )
    extra = [n for n in table.column_names if n not in c.schema.names]
    if extra:
        raise ContractError(
            path,
            f"column not in the `{c.kind}` contract v{c.version} (columns: {', '.join(c.schema.names)})",
            "drop the column, or add it to the contract with a version bump",
            column=extra[0],
        )
    # 2. types: only lossless casts between widths of the same kind are accepted
    columns = []
    for fld in c.schema:
        col = table.column(fld.name)
        if not col.type.equals(fld.type):
            col = _cast_column(col, fld, c, path)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=c.schema)


def _same_family(a: pa.DataType, b: pa.DataType) -> bool:
    families = (
        (pa.types.is_integer, pa.types.is_integer),
        (pa.types.is_floating, pa.types.is_floating),
        (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),) * 2,
        (pa.types.is_boolean, pa.types.is_boolean),
    )
    return any(fa(a) and fb(b) for fa, fb in families) or pa.types.is_null(a)


def _cast_column(col: pa.ChunkedArray, fld: pa.Field, c: Contract, path: Path) -> pa.ChunkedArray:
    if _same_family(col.type, fld.type):
        try:
            return col.cast(fld.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    # Point at the first value that cannot even be read as the contract's type; when every
    # value could be (the string "8" for an int), the column's type is still wrong: row 0.
    row = 0
    for i, value in enumerate(col.to_pylist()):
        if value is None:
            continue
        try:
            pa.array([value]).cast(fld.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            row = i
            break
    raise ContractError(
        path,
        f"wrong type: {col.type} where the `{c.kind}` contract v{c.version} has {fld.type}",
        _fix_for(c, fld.name),
        column=fld.name,
        row=row,
    )


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    idx = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if idx is None or idx < 0 else idx


def _check_values(table: pa.Table, c: Contract, path: Path) -> None:
    # nulls
    for fld in c.schema:
        if not fld.nullable and table.column(fld.name).null_count:
            row = _first_true(pc.is_null(table.column(fld.name)))
            raise ContractError(path, "null value in a column that must not be null", _fix_for(c, fld.name), fld.name, row)
    # allowed values
    for name, allowed in c.allowed.items():
        col = table.column(name)
        bad = pc.invert(pc.is_in(col, value_set=pa.array(sorted(allowed), type=col.type)))
        bad = pc.and_(bad, pc.is_valid(col))
        row = _first_true(bad)
        if row is not None:
            raise ContractError(
                path,
                f"value {col[row].as_py()!r} is not one of {sorted(allowed)}",
                _fix_for(c, name),
                name,
                row,
            )
    # numeric bounds (NaN and infinities are out of every bound)
    for name, (low, high) in c.bounds.items():
        col = table.column(name)
        bad = pc.invert(pc.is_finite(col)) if pa.types.is_floating(col.type) else pc.is_null(col)
        if low is not None:
            bad = pc.or_(bad, pc.less(col, low))
        if high is not None:
            bad = pc.or_(bad, pc.greater(col, high))
        row = _first_true(pc.and_(bad, pc.is_valid(col)))
        if row is not None:
            span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise ContractError(
                path, f"value {col[row].as_py()!r} is outside {span}", _fix_for(c, name), name, row
            )
    # unique ids
    ids = table.column(c.id_column).to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[Any] = set()
        for row, value in enumerate(ids):
            if value in seen:
                raise ContractError(
                    path, f"duplicate id {value!r}", "give every row its own id (ids name files and pairs)", c.id_column, row
                )
            seen.add(value)


def _check_paths(table: pa.Table, c: Contract, path: Path, layout: RunLayout) -> None:
    roots = RealRoots(layout.data_roots)
    for name, rule in c.paths.items():
        values = table.column(name).to_pylist()
        excuses = table.column(rule.required_unless).to_pylist() if rule.required_unless else [None] * len(values)
        for row, (stored, excuse) in enumerate(zip(values, excuses, strict=False)):
            if stored is None:
                continue
            if "\x00" in stored or stored.strip() == "":
                raise ContractError(path, f"invalid path {stored!r}", "store a plain file path", name, row)
            target = layout.resolve(stored)
            if rule.outside_reason is not None and excuse == rule.outside_reason:
                continue
            if not inside_roots(target, roots):
                roots = ", ".join(f"`{r}`" for r in layout.data_roots)
                raise ContractError(
                    path,
                    f"path `{stored}` resolves outside the run's data roots ({roots})",
                    "keep files inside the run folder or add their folder to `run.data_roots`",
                    name,
                    row,
                )
            try:
                present = target.exists()
            except (OSError, ValueError) as err:  # a name too long for the file system, say
                raise ContractError(path, f"path `{stored[:200]}` cannot be looked up ({err})", "store a plain file path", name, row) from None
            if excuse is None and not present:
                raise ContractError(
                    path,
                    f"referenced file `{stored}` does not exist",
                    f"restore the file, or rerun the `{c.producer}` stage",
                    name,
                    row,
                )


def validate(table: pa.Table, kind: str, path: Path, layout: RunLayout) -> pa.Table:
    """The table conformed to its contract; raises ContractError for the first violation."""
    c = contract(kind)
    table = _conform(table, c, Path(path))
    _check_values(table, c, Path(path))
    _check_paths(table, c, Path(path), layout)
    return table


def table_from_rows(rows: Iterable[Mapping[str, Any]], kind: str, path: Path | str = "<rows>") -> pa.Table:
    """Rows (dicts) to a table in the contract's schema; a bad value names its row and column."""
    c = contract(kind)
    rows = list(rows)
    for i, row in enumerate(rows):
        unknown = set(row) - set(c.schema.names)
        if unknown:
            raise ContractError(path, f"column not in the `{kind}` contract", "fix the stage that builds the rows", sorted(unknown)[0], i)
    columns = []
    for fld in c.schema:
        values = [row.get(fld.name) for row in rows]
        try:
            columns.append(pa.array(values, type=fld.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            for i, v in enumerate(values):
                try:
                    pa.array([v], type=fld.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                    raise ContractError(path, f"value {v!r} is not {fld.type}", _fix_for(c, fld.name), fld.name, i) from None
            raise
    return pa.Table.from_arrays(columns, schema=c.schema)


def write_manifest(
    rows_or_table: pa.Table | Iterable[Mapping[str, Any]],
    kind: str,
    path: Path,
    layout: RunLayout,
    lineage: Lineage,
) -> ManifestRef:
    """Validate and write a manifest atomically, with its lineage and content hash."""
    path = Path(path)
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else table_from_rows(rows_or_table, kind, path)
    c = contract(kind)
    table = validate(table, kind, path, layout)
    digest = table_hash(table)
    table = table.replace_schema_metadata(
        {
            META_KIND: c.kind.encode(),
            META_VERSION: str(c.version).encode(),
            META_LINEAGE: lineage.to_json().encode(),
            META_HASH: digest.encode(),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue())
    return ManifestRef(kind=kind, path=str(path), content_hash=digest)


def read_manifest(path: Path | str, kind: str, layout: RunLayout) -> Manifest:
    """Read a manifest with its contract's explicit schema and validate every row."""
    path = Path(path)
    c = contract(kind)
    if not path.exists():
        raise ContractError(path, f"no `{kind}` manifest here", f"run the `{c.producer}` stage first")
    try:
        pf = pq.ParquetFile(path)
        table = pf.read()
    except (pa.ArrowInvalid, OSError) as err:
        raise ContractError(path, f"not a readable Parquet file ({err})", f"rerun the `{c.producer}` stage") from None
    meta = table.schema.metadata or {}
    found_kind = meta.get(META_KIND, b"").decode() or None
    if found_kind is not None and found_kind != kind:
        raise ContractError(path, f"this is a `{found_kind}` manifest, not `{kind}`", "pass the right manifest")
    version = int(meta.get(META_VERSION, str(c.version).encode()))
    if version != c.version:
        raise ContractError(
            path,
            f"`{kind}` contract version {version}, this code reads version {c.version}",
            f"rerun the `{c.producer}` stage with this code version",
        )
    table = validate(table, kind, path, layout)
    lineage_text = meta.get(META_LINEAGE)
    lineage = Lineage.from_json(lineage_text.decode()) if lineage_text else Lineage(stage="external")
    digest = table_hash(table)
    return Manifest(ManifestRef(kind, str(path), digest), table, lineage)


def manifest_ref(path: Path | str, kind: str) -> ManifestRef:
    """A reference to a written manifest from its metadata alone (no row scan)."""
    meta = pq.read_schema(path).metadata or {}
    digest = meta.get(META_HASH)
    if digest is None:
        raise ContractError(path, "no content hash in the metadata", "rewrite it with `write_manifest`")
    return ManifestRef(kind, str(path), digest.decode())


# --- success markers -------------------------------------------------------------------------


def write_marker(stage_dir: StageDir, ref: ManifestRef, key: str, info: Mapping[str, Any]) -> None:
    """Mark a stage complete; written after its manifest, so a marker implies a manifest."""
    atomic_write_json(
        stage_dir.marker_path,
        {"stage": stage_dir.stage, "round": stage_dir.round, "cache_key": key, "manifest": ref.__dict__, **info},
    )


def read_marker(stage_dir: StageDir) -> dict[str, Any] | None:
    try:
        return json.loads(stage_dir.marker_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def completed_ref(stage_dir: StageDir, key: str) -> ManifestRef | None:
    """The output of a finished stage with this cache key, or None if it must (re)run.

    The marker alone is not trusted: the manifest must still be there with the recorded hash.
    """
    marker = read_marker(stage_dir)
    if not marker or marker.get("cache_key") != key or marker.get("status") != "complete":
        return None
    recorded = marker.get("manifest", {})
    path = stage_dir.manifest_path
    if not path.exists():
        return None
    try:
        ref = manifest_ref(path, recorded.get("kind", ""))
    except (ContractError, OSError, pa.ArrowInvalid):
        return None
    return ref if ref.content_hash == recorded.get("content_hash") else None
