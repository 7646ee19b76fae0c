"""What every stage shares: the config base class and the run-or-skip protocol.

A stage is `run(inputs, cfg, layout, out) -> StageResult`, a plain function. `execute_stage`
wraps it with the contract's cache key: a stage whose marker holds the same key (same input
manifests, same config) is skipped; otherwise it runs and leaves its manifest, then its marker.
No Prefect and no Ray here: the `@task` wrappers call `execute_stage`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict

from data_contracts import (
    Lineage,
    ManifestRef,
    RunLayout,
    StageDir,
    completed_ref,
    config_hash,
    read_marker,
    write_marker,
)


class StageConfig(BaseModel):
    """Base of every stage config: frozen, and an unknown key is an error, not ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))


COMPUTE_METRIC = "compute_s"


@dataclass(frozen=True)
class StageResult:
    """What a stage's `run` returns: its output manifest and the numbers the UI shows.

    Every stage that runs a model reports `compute_s` (COMPUTE_METRIC) in its metrics: the wall-clock
    seconds spent in model compute (sampling, training, scoring, judging); parallel actors count
    their summed busy seconds divided by the actors used. The rest of a stage's seconds is
    orchestration, I/O and start-up, which `benchmarks/e2e.py` reports as the overhead share.
    """

    manifest: ManifestRef
    counts: Mapping[str, int] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    # small PNGs for the UI (contact sheets, plots): title -> path
    images: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageOutcome:
    manifest: ManifestRef
    cache_key: str
    skipped: bool
    counts: Mapping[str, int]
    metrics: Mapping[str, float]
    seconds: float
    images: Mapping[str, str] = field(default_factory=dict)


def stage_lineage(stage: str, inputs: Mapping[str, ManifestRef], cfg: StageConfig) -> Lineage:
    return Lineage(stage=stage, inputs={k: v.content_hash for k, v in inputs.items()}, config_hash=cfg.hash())


def execute_stage(
    run: Callable[[Mapping[str, ManifestRef], Any, RunLayout, StageDir, Lineage], StageResult],
    layout: RunLayout,
    out: StageDir,
    cfg: StageConfig,
    inputs: Mapping[str, ManifestRef],
    force: bool = False,
) -> StageOutcome:
    """Run a stage unless its output with the same cache key is complete on disk."""
    lineage = stage_lineage(out.stage, inputs, cfg)
    key = lineage.cache_key
    done = None if force else completed_ref(out, key)
    if force:
        out = replace(out, fresh=True)  # nor any of the stage's own intermediate results
    if done is not None:
        marker = read_marker(out) or {}
        return StageOutcome(
            done, key, True, marker.get("counts", {}), marker.get("metrics", {}), 0.0, marker.get("images", {})
        )
    out.path.mkdir(parents=True, exist_ok=True)
    out.marker_path.unlink(missing_ok=True)  # a stage being rerun is not complete until it ends
    t0 = time.perf_counter()
    result = run(inputs, cfg, layout, out, lineage)
    seconds = time.perf_counter() - t0
    write_marker(
        out,
        result.manifest,
        key,
        {
            "status": "complete",
            "config": cfg.model_dump(mode="json"),
            "inputs": {k: v.__dict__ for k, v in inputs.items()},
            "code_version": lineage.code_version,
            "seconds": round(seconds, 3),
            "finished_at": time.time(),
            "counts": dict(result.counts),
            "metrics": dict(result.metrics),
            "images": dict(result.images),
        },
    )
    return StageOutcome(
        result.manifest, key, False, dict(result.counts), dict(result.metrics), seconds, dict(result.images)
    )
