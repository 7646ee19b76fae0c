"""Which stages of a run are stale: computed from inputs that have since been recomputed.

Two sources, both files:
- the stale mark (`stale.json` in the stage folder): written on every completed stage that read a
  stage that was recomputed, directly or through another marked stage (`prefloop stage label --run
  demo --round 1` marks round 1's train_reward, finetune, evaluate and every stage of later rounds
  that reads them), and removed when the stage runs again or is found up to date by its cache key;
- lineage: a stage's marker records the content hash of each input manifest it read; an input
  whose manifest now has another hash changes the stage's cache key, so the next run recomputes it.

A marked stage whose inputs are still unchanged is waiting for what it reads to be recomputed
first; if that gives the same manifest, the next run finds the stage up to date and clears the mark.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_contracts.errors import ContractError
from data_contracts.layout import ROUND_STAGES, STAGES, RunLayout, StageDir
from data_contracts.lineage import atomic_write_json
from data_contracts.manifest import manifest_ref, read_marker


def _position(stage_dir: StageDir) -> tuple[int, int] | None:
    """Where a stage sits in the DAG: once-per-run stages first, then round by round."""
    if stage_dir.stage not in STAGES:
        return None  # a variant (`prefloop compare`) is not part of the DAG
    if stage_dir.round is None:
        return (0, STAGES.index(stage_dir.stage))
    return (stage_dir.round, ROUND_STAGES.index(stage_dir.stage))


def run_stages(layout: RunLayout) -> list[StageDir]:
    """The stage folders the run has so far, in DAG order."""
    found = [layout.stage(s) for s in STAGES if s not in ROUND_STAGES]
    for round_dir in sorted(layout.run_dir.glob("round-[0-9]*")):
        found += [layout.stage(s, int(round_dir.name.split("-")[1])) for s in ROUND_STAGES]
    return [d for d in found if d.path.exists()]


def downstream(layout: RunLayout, stage_dir: StageDir) -> list[StageDir]:
    """The run's existing stage folders after `stage_dir` (same round and later rounds)."""
    here = _position(stage_dir)
    if here is None:
        return []
    return [d for d in run_stages(layout) if _position(d) > here]


def _read_from(marker: dict) -> set[str]:
    """The labels (`select`, `round-01/label`) of the stages whose manifests a stage read, as its
    marker records them; by label, not path, so a run folder copied elsewhere still matches."""
    labels = set()
    for recorded in marker.get("inputs", {}).values():
        folder = Path(recorded.get("path", "")).parent
        labels.add(f"{folder.parent.name}/{folder.name}" if folder.parent.name.startswith("round-") else folder.name)
    return labels


def mark_downstream_stale(layout: RunLayout, stage_dir: StageDir, cache_key: str) -> list[StageDir]:
    """Mark stale every completed stage after `stage_dir` that read it, directly or through a stage
    marked here, because `stage_dir` was just recomputed. A later stage that reads none of them (in
    a round, `finetune` does not read `train_reward`) was not computed from the old output, and is
    left alone even when it ran before `stage_dir` did."""
    marked, sources = [], {stage_dir.label}
    for d in downstream(layout, stage_dir):
        marker = read_marker(d)
        if marker is None:
            continue  # never completed: nothing to distrust
        if not _read_from(marker) & sources:
            continue  # computed from none of what changed
        sources.add(d.label)
        atomic_write_json(
            d.stale_path, {"cause": stage_dir.label, "cause_cache_key": cache_key, "marked_at": time.time()}
        )
        marked.append(d)
    return marked


def read_stale(stage_dir: StageDir) -> dict[str, Any] | None:
    try:
        return json.loads(stage_dir.stale_path.read_text())
    except (OSError, ValueError):
        return None


def clear_stale(stage_dir: StageDir) -> bool:
    """Remove the mark of a stage that ran again or whose cache key proved it up to date.

    Kept while a stage it read from is itself marked stale: then this stage is up to date with
    an output that is about to change. Returns True if the stage is no longer marked.
    """
    marker = read_marker(stage_dir) or {}
    for recorded in marker.get("inputs", {}).values():
        if (Path(recorded.get("path", "")).parent / stage_dir.stale_path.name).exists():
            return False
    stage_dir.stale_path.unlink(missing_ok=True)
    return True


def changed_inputs(stage_dir: StageDir) -> list[str]:
    """Inputs whose manifest no longer has the content hash the stage was computed from."""
    marker = read_marker(stage_dir) or {}
    changed = []
    for name, recorded in sorted(marker.get("inputs", {}).items()):
        path = Path(recorded.get("path", ""))
        try:
            now = manifest_ref(path, recorded.get("kind", "")).content_hash
        except (ContractError, OSError, pa.ArrowInvalid):
            now = None  # gone or unreadable: certainly not what the stage read
        if now != recorded.get("content_hash"):
            changed.append(name)
    return changed


def stage_status(stage_dir: StageDir) -> tuple[str, str]:
    """(status, why) for listings: `complete`, `stale`, `incomplete`, or what the marker says."""
    marker = read_marker(stage_dir)
    if marker is None:
        return "incomplete", ""
    status = marker.get("status", "incomplete")
    if status != "complete":
        return status, ""
    if not stage_dir.manifest_path.exists():
        return "incomplete", f"{stage_dir.manifest_path.name} is missing; the next run recomputes the stage"
    mark, changed = read_stale(stage_dir), changed_inputs(stage_dir)
    if mark is None and not changed:
        return "complete", ""
    parts = []
    if mark is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(mark.get("marked_at", 0)))
        parts.append(f"{mark.get('cause', 'an earlier stage')} was recomputed at {when}")
    if changed:
        parts.append(f"inputs changed since it ran: {', '.join(changed)}; the next run recomputes it")
    else:
        parts.append("its inputs are unchanged so far; the next run reruns it only if what it reads changes")
    return "stale", "; ".join(parts)
