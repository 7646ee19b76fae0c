"""`ingest`: videos in, a `videos` manifest out.

Three sources, one output contract:
- `synthetic` — the embedded physics world (models/physics_world.py): clips rendered with known
  ground truth, implausible variants and web-video defects at exact, recorded rates;
- a folder of videos with same-name `.txt` captions;
- a CSV / Parquet / JSONL listing with a configurable column mapping (WebVid/OpenVid style);
  relative paths resolve against the listing's folder.

Every video is probed with OpenCV (frames actually decoded, fps, size, duration). Videos that are
unreadable, empty, truncated or without caption stay in the manifest with a `reason`: nothing is
dropped. The world's ground truth goes to `world/truth.parquet`, which only the judge's
calibration and `evaluate` read.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_contracts import (
    ContractError,
    Lineage,
    ManifestRef,
    RealRoots,
    RunLayout,
    StageDir,
    inside_roots,
    write_manifest,
)
from tasks.common import StageConfig, StageResult

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
LISTING_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")


# --- 1. config -------------------------------------------------------------------------------


class WorldConfig(BaseModel):
    """Size and mix of the embedded physics world (only read when `source: synthetic`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_clips: int = Field(2000, ge=1, description="clips to render; enough for bootstrap and select on 2 cores")
    size: int = Field(16, ge=16, le=64, description="frame side in px; 16 keeps the tiny policy trainable on 2 cores")
    frames: int = Field(8, ge=4, le=32, description="frames per clip (too_short clips get fewer)")
    fps: float = Field(8.0, gt=0, description="frame rate written into the mp4 files")
    seed: int = Field(0, description="the world is deterministic for a seed")
    implausible_rate: float = Field(
        0.4, ge=0, le=1, description="share of clips with a physics violation, split evenly over the violation types"
    )
    defect_rates: dict[str, float] = Field(
        default_factory=lambda: {
            "static": 0.04,
            "scene_cut": 0.04,
            "flicker": 0.04,
            "blur": 0.04,
            "caption_mismatch": 0.04,
            "too_short": 0.03,
            "corrupt": 0.02,
        },
        description="share of clips with each web-video defect (at most one defect per clip)",
    )

    @field_validator("defect_rates")
    @classmethod
    def _known_defects(cls, rates: dict[str, float]) -> dict[str, float]:
        from models.physics_world import DEFECTS

        unknown = sorted(set(rates) - set(DEFECTS))
        if unknown:
            raise ValueError(f"unknown defect {unknown[0]!r}; defects: {', '.join(DEFECTS)}")
        if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1:
            raise ValueError("defect rates must be ≥ 0 and sum to at most 1")
        return rates


class IngestConfig(StageConfig):
    source: str = Field(
        "synthetic",
        description="`synthetic` (the embedded physics world), a folder of videos with same-name .txt captions, "
        "or a CSV/Parquet/JSONL listing",
    )
    path_column: str = Field("path", description="listing column with the video path (WebVid: `contentUrl`, OpenVid: `video`)")
    caption_column: str = Field("caption", description="listing column with the caption (WebVid: `name`)")
    id_column: str | None = Field(None, description="listing column with a video id; default: the path")
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of distinct captions held out as evaluation prompts (split by caption, exact)"
    )
    max_caption_chars: int = Field(
        4000, ge=1, description="longest caption kept as a prompt (reason `caption_too_long` above it); OpenVid's "
        "longest are ~2,000 characters, and a text encoder reads a few hundred tokens at most",
    )
    workers: int = Field(2, ge=1, description="threads rendering/probing videos (OpenCV releases the GIL)")
    world: WorldConfig = Field(default_factory=WorldConfig, description="the embedded world, for `source: synthetic`")

    @model_validator(mode="after")
    def _source_exists(self) -> IngestConfig:
        if self.source != "synthetic" and not Path(self.source).exists():
            raise ValueError(
                f"ingest.source `{self.source}` does not exist; give a folder of videos, a listing file, or `synthetic`"
            )
        return self

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"

    def data_root(self) -> Path | None:
        """The folder outside the run that this source's videos live in (a data root)."""
        if self.is_synthetic:
            return None
        src = Path(self.source).absolute()
        return src if src.is_dir() else src.parent


# --- 2. pure core ----------------------------------------------------------------------------


def exact_assignment(n: int, rates: Mapping[str, float], rng: np.random.Generator) -> list[str | None]:
    """Give round(rate·n) of n items each label (the rest None), in a seeded random order.

    Exact counts, not Bernoulli draws, so that the recorded rates are the realised ones.
    """
    labels: list[str | None] = []
    for name, rate in sorted(rates.items()):
        labels += [name] * int(round(rate * n))
    if len(labels) > n:
        raise ValueError(f"rates {dict(rates)} ask for {len(labels)} of {n} items; lower them")
    labels += [None] * (n - len(labels))
    order = rng.permutation(n)
    return [labels[i] for i in order]


def _caption_key(caption: str) -> str:
    return " ".join(caption.lower().split())


def heldout_captions(captions: list[str | None], fraction: float) -> set[str]:
    """The distinct captions held out as evaluation prompts: the round(fraction·n) of the n
    distinct (normalised) captions with the smallest hashes — at least one when fraction > 0.

    Split by caption, not by video, so a held-out prompt never appears in training under any
    video; exact counts, so a small caption vocabulary (the embedded world has ~60) still gets
    its share.
    """
    distinct = sorted({_caption_key(c) for c in captions if c is not None})
    if fraction <= 0 or len(distinct) < 2:
        return set()
    k = min(len(distinct) - 1, max(1, round(fraction * len(distinct))))
    by_hash = sorted(distinct, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    return set(by_hash[:k])


def assign_splits(rows: list[dict[str, Any]], fraction: float) -> None:
    held = heldout_captions([r["caption"] for r in rows], fraction)
    for r in rows:
        r["split"] = "heldout" if r["caption"] is not None and _caption_key(r["caption"]) in held else "train"


def clean_caption(text: Any) -> str | None:
    if text is None:
        return None
    text = str(text).strip()
    return text or None


def caption_problem(caption: str | None, max_chars: int) -> str | None:
    """Why a caption cannot be a prompt (`missing_caption`, `bad_caption`, `caption_too_long`), or None.

    Whitespace inside a caption (tab, newline) is fine; other control characters (NUL, escape
    sequences, DEL) are not text a prompt may hold, and are recorded, not stripped."""
    if caption is None:
        return "missing_caption"
    if any((ord(ch) < 32 and ch not in "\t\n\r") or 0x7F <= ord(ch) < 0xA0 for ch in caption):
        return "bad_caption"
    if len(caption) > max_chars:
        return "caption_too_long"
    return None


def video_row(
    video_id: str, file: Path, stored_path: str, caption: str | None, source: str, probe: Any, max_caption_chars: int = 4000
) -> dict[str, Any]:
    """One `videos` row from a probe; the first problem becomes the row's reason. The split is
    decided over all rows afterwards (`assign_splits`)."""
    reason = probe.reason if not probe.readable else caption_problem(caption, max_caption_chars)
    return {
        "video_id": video_id,
        "video_path": stored_path,
        "caption": caption,
        "source": source,
        "split": "train",
        "reason": reason,
        "file_bytes": None if probe.reason == "outside_data_roots" else _file_bytes(file),
        "fps": probe.fps,
        "num_frames": probe.num_frames,
        "width": probe.width,
        "height": probe.height,
        "duration_s": probe.duration_s,
    }


# --- 3. the edge: reading sources, writing files ---------------------------------------------


def _file_bytes(file: Path) -> int | None:
    try:
        return file.stat().st_size if file.is_file() else None
    except OSError:  # a name too long for the file system, a symlink loop
        return None


def _read_listing(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pyarrow.csv.read_csv(path)
        if suffix == ".parquet":
            return pq.read_table(path)
        return pyarrow.json.read_json(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ContractError(path, f"cannot read the listing ({err})", "give a CSV, Parquet or JSONL file") from None


def _text_column(table: pa.Table, name: str, listing: Path, key: str) -> list[Any]:
    """A listing column as Python values; only text (or numbers, for ids and paths) is accepted."""
    col = table.column(name)
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or pa.types.is_integer(t)):
        raise ContractError(
            listing,
            f"column holds {t}, not text",
            f"give one text value per row, or map another column with `--set ingest.{key}=NAME`",
            column=name,
        )
    return col.to_pylist()


def listing_entries(cfg: IngestConfig) -> list[tuple[str, Path, str | None]]:
    """(video id, file, caption) from a listing, with paths resolved against its folder."""
    path = Path(cfg.source)
    table = _read_listing(path)
    for key, column in (("path_column", cfg.path_column), ("caption_column", cfg.caption_column), ("id_column", cfg.id_column)):
        if column is not None and column not in table.column_names:
            raise ContractError(
                path,
                f"no column `{column}` in the listing (columns: {', '.join(table.column_names)})",
                f"add the column, or map yours with `--set ingest.{key}=NAME`",
                column=column,
            )
    paths = _text_column(table, cfg.path_column, path, "path_column")
    captions = _text_column(table, cfg.caption_column, path, "caption_column")
    ids = _text_column(table, cfg.id_column, path, "id_column") if cfg.id_column else [None] * len(paths)
    entries = []
    for row, (p, caption, vid) in enumerate(zip(paths, captions, ids, strict=False)):
        if p is None or str(p).strip() == "":
            raise ContractError(path, "empty video path", "give every row a path or remove the row", cfg.path_column, row)
        if any(ord(ch) < 32 or ord(ch) == 0x7F for ch in str(p)):
            raise ContractError(
                path, f"control character in the video path {str(p)[:80]!r}", "give a plain file path", cfg.path_column, row
            )
        file = Path(str(p))
        file = file if file.is_absolute() else path.parent / file
        entries.append((str(vid) if vid is not None else str(p), file, clean_caption(caption)))
    return entries


def folder_entries(cfg: IngestConfig, roots: tuple[Path, ...]) -> list[tuple[str, Path, str | None]]:
    """(video id, file, caption) for every video file under a folder; the caption is the
    same-name `.txt` beside it, read only when it lies inside the data roots (a symlink out of
    the folder is never followed) and only up to a little over `max_caption_chars`."""
    root = Path(cfg.source)
    entries = []
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS):
        txt = file.with_suffix(".txt")
        caption = None
        if txt.is_file() and inside_roots(txt, roots):
            with open(txt, "rb") as fh:  # an enormous caption file is read no further than it can matter
                caption = clean_caption(fh.read(4 * cfg.max_caption_chars + 4).decode(errors="replace"))
        entries.append((file.relative_to(root).with_suffix("").as_posix(), file, caption))
    return entries


def _probe_all(files: list[Path], workers: int) -> list[Any]:
    from tasks.video_io import probe_video

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe_video, files))


def unique_ids(ids: list[str]) -> list[str]:
    """The ids with repeats told apart (`a`, `a#2`, …), never colliding with an id given as such."""
    taken = set(ids)
    seen: Counter[str] = Counter()
    out = []
    for vid in ids:
        seen[vid] += 1
        if seen[vid] > 1:  # a listing naming one video twice keeps both rows, told apart
            n = seen[vid]
            while f"{vid}#{n}" in taken:
                n += 1
            seen[vid] = n
            vid = f"{vid}#{n}"
            taken.add(vid)
        out.append(vid)
    return out


def ingest_files(cfg: IngestConfig, layout: RunLayout) -> list[dict[str, Any]]:
    """Rows for a folder or listing. A path outside the data roots (absolute, `..`, a symlink
    out) is recorded with `outside_data_roots` and never opened, not even to probe it."""
    from tasks.video_io import VideoProbe

    is_listing = Path(cfg.source).is_file()
    entries = listing_entries(cfg) if is_listing else folder_entries(cfg, layout.data_roots)
    real_roots = RealRoots(layout.data_roots)
    inside = [inside_roots(file, real_roots) for _, file, _ in entries]
    probed = iter(_probe_all([f for (_, f, _), ok in zip(entries, inside, strict=True) if ok], cfg.workers))
    outside = VideoProbe(False, "outside_data_roots", None, None, None, None, None)
    ids = unique_ids([vid for vid, _, _ in entries])
    rows = []
    for vid, (_, file, caption), ok in zip(ids, entries, inside, strict=True):
        probe = next(probed) if ok else outside
        rows.append(
            video_row(vid, file, layout.stored_path(file), caption, "listing" if is_listing else "folder", probe,
                      cfg.max_caption_chars)
        )
    return rows


def synthesize_world(cfg: IngestConfig, layout: RunLayout, out: StageDir) -> tuple[list[dict], list[dict]]:
    """Render the world's clips to mp4; returns (`videos` rows, `world_truth` rows)."""
    from models import physics_world as world
    from tasks.video_io import probe_video, write_video

    w = cfg.world
    spec = world.WorldSpec(size=w.size, frames=w.frames, fps=w.fps)
    rng = np.random.default_rng(w.seed)
    defects = exact_assignment(w.num_clips, w.defect_rates, rng)
    per_violation = w.implausible_rate / len(world.VIOLATIONS)
    violations = exact_assignment(w.num_clips, {v: per_violation for v in world.VIOLATIONS}, rng)
    videos_dir = out.files("videos")
    videos_dir.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> tuple[dict, dict]:
        clip_rng = np.random.default_rng([w.seed, i])  # per-clip streams: order and threads do not matter
        clip = world.make_clip(clip_rng, spec, violations[i], defects[i])
        file = videos_dir / f"w{i:06d}.mp4"
        if clip.frames is None:
            file.write_bytes(world.corrupt_bytes(clip_rng))
        else:
            write_video(file, clip.frames, w.fps)
        vid = f"w{i:06d}"
        row = video_row(vid, file, layout.stored_path(file), clip.caption, "synthetic", probe_video(file), cfg.max_caption_chars)
        truth = {"video_id": vid, **{k: clip.truth[k] for k in _TRUTH_KEYS}}
        truth["scene_json"] = clip.truth["scene"]  # already JSON (Scene.to_json)
        return row, truth

    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        pairs = list(pool.map(one, range(w.num_clips)))
    return [p[0] for p in pairs], [p[1] for p in pairs]


_TRUTH_KEYS = (
    "motion",
    "colours",
    "direction",
    "num_balls",
    "bounces",
    "violation",
    "violation_frame",
    "defect",
    "plausible",
    "caption_matches",
)


def summarize(rows: list[dict[str, Any]], truth: list[dict[str, Any]] | None) -> dict[str, int]:
    counts: dict[str, int] = {"videos": len(rows), "usable": sum(r["reason"] is None for r in rows)}
    counts["heldout"] = sum(r["split"] == "heldout" for r in rows)
    for reason, n in sorted(Counter(r["reason"] for r in rows if r["reason"]).items()):
        counts[f"reason:{reason}"] = n
    if truth:
        counts["implausible"] = sum(not t["plausible"] for t in truth)
        for defect, n in sorted(Counter(t["defect"] for t in truth if t["defect"] != "none").items()):
            counts[f"defect:{defect}"] = n
    return counts


def run(inputs: Mapping[str, ManifestRef], cfg: IngestConfig, layout: RunLayout, out: StageDir, lineage: Lineage) -> StageResult:
    """Ingest `cfg.source` into `out`; see the module docstring."""
    truth = None
    if cfg.is_synthetic:
        rows, truth = synthesize_world(cfg, layout, out)
        write_manifest(truth, "world_truth", layout.truth_path, layout, lineage)
    else:
        rows = ingest_files(cfg, layout)
    assign_splits(rows, cfg.heldout_fraction)
    ref = write_manifest(rows, "videos", out.manifest_path, layout, lineage)
    return StageResult(ref, counts=summarize(rows, truth))
