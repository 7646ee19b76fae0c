"""Lineage, content hashes, the stage cache key and the success marker.

A stage's cache key is the hash of (its input manifests' content hashes, its config hash):
rerunning with the same key is skipped; a changed config or input reruns the stage and what
follows. The code version is recorded but is not part of the key, so that a commit that does
not touch a stage does not force the whole DAG to rerun.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

REPO_ROOT = Path(__file__).resolve().parent.parent


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: Mapping[str, Any]) -> str:
    """Hash of a stage config as plain JSON data (pydantic `model_dump(mode="json")`)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def table_hash(table: pa.Table) -> str:
    """Content hash of a table: its columns' values and types, not the file's bytes.

    Parquet files carry write-time metadata, so two writes of the same rows differ in bytes;
    hashing the Arrow IPC form of each column (as one chunk) is stable across writes.
    """
    digest = hashlib.sha256()
    table = table.replace_schema_metadata(None).combine_chunks()
    for name, column in zip(table.column_names, table.columns, strict=False):
        digest.update(name.encode())
        sink = io.BytesIO()
        batch = pa.record_batch([column.combine_chunks()], names=[name])
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        digest.update(sink.getvalue())
    return digest.hexdigest()[:16]


def cache_key(stage: str, input_hashes: Mapping[str, str], cfg_hash: str) -> str:
    payload = canonical_json({"stage": stage, "inputs": dict(input_hashes), "config": cfg_hash})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code that wrote a manifest (`-dirty` with local changes)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            raise OSError(sha.stderr)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "prefloop-" + version("prefloop")
        except PackageNotFoundError:
            return "unknown"


@dataclass(frozen=True)
class Lineage:
    """What a manifest was made from; stored as JSON in its Parquet key-value metadata."""

    stage: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    config_hash: str = ""
    code_version: str = field(default_factory=code_version)
    created_at: float = field(default_factory=time.time)

    @property
    def cache_key(self) -> str:
        return cache_key(self.stage, self.inputs, self.config_hash)

    def to_json(self) -> str:
        return canonical_json({**asdict(self), "inputs": dict(self.inputs), "cache_key": self.cache_key})

    @classmethod
    def from_json(cls, text: str) -> Lineage:
        data = json.loads(text)
        data.pop("cache_key", None)
        return cls(**data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write, fsync and rename, so a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
