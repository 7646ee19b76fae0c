"""How well a run's `select` stage picked the embedded world's good clips, against its ground truth.

    .venv/bin/python benchmarks/select_quality.py --run demo [--runs-root runs]

Reads the run's `selection` manifest and the world's truth table (written by `ingest` for the
embedded world) and prints precision and recall of `selected` against "plausible, defect-free,
caption matches", and for each injected defect type how its clips were rejected (first reason).
Targets (issue #3): precision >= 0.95, recall >= 0.85.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"))
    args = parser.parse_args()

    from data_contracts import read_manifest
    from flows.config import resolve_config

    saved = args.runs_root / args.run / "config.yaml"
    if not saved.exists():
        raise SystemExit(f"{saved} does not exist: no run {args.run!r} under {args.runs_root}")
    cfg = resolve_config(saved=saved)
    layout = cfg.layout(args.runs_root, args.run)
    manifest = layout.stage("select").manifest_path
    if not manifest.exists():
        raise SystemExit(f"{manifest} does not exist: run `prefloop stage select --run {args.run}` first")
    if not layout.truth_path.exists():
        raise SystemExit(f"{layout.truth_path} does not exist: ground truth comes with the embedded world only")
    sel = {r["video_id"]: r for r in read_manifest(manifest, "selection", layout).rows()}
    truth = {r["video_id"]: r for r in read_manifest(layout.truth_path, "world_truth", layout).rows()}
    missing = set(truth) - set(sel)
    if missing:
        raise SystemExit(f"{manifest}: {len(missing)} of the world's clips have no row (e.g. {sorted(missing)[:3]})")
    good = {v for v, t in truth.items() if t["plausible"] and t["defect"] == "none" and t["caption_matches"]}
    chosen = {v for v, r in sel.items() if r["selected"]}
    reasons: dict[str, Counter] = defaultdict(Counter)
    for v, t in truth.items():
        if t["defect"] != "none":
            reasons[t["defect"]][sel[v]["reason"] or "selected"] += 1
    print(f"run {args.run}: {len(truth)} clips, {len(good)} good by the world's truth, {len(chosen)} selected")
    for defect, counts in sorted(reasons.items()):
        print(f"  {defect}: " + ", ".join(f"{reason} {n}" for reason, n in counts.most_common()))
    print(f"precision: {len(good & chosen) / max(1, len(chosen)):.3f}")
    print(f"recall: {len(good & chosen) / max(1, len(good)):.3f}")


if __name__ == "__main__":
    main()
