"""The default run end to end: wall time per stage, the share outside model compute, the judge's gain.

    .venv/bin/python benchmarks/e2e.py [--runs-root /tmp/e2e] [--rounds 2] [--set stage.key=value …]
    .venv/bin/python benchmarks/e2e.py --no-scaling      # skip the 2x-prompts measurement

1. `prefloop run --run e2e --set run.rounds=2` in a fresh runs root, as a user types it (a real
   Prefect server, one local Ray shared by its stages), timed from outside: the wall time.
2. Per stage, from its `stage.json`: its seconds and `compute_s`, the seconds in model compute
   (sampling, training, scoring, judging; tasks/common.py). The overhead share is
   `1 - Σ compute_s / wall`: orchestration, Prefect, Ray start-up, imports, I/O.
3. The plausibility gain: the last round's held-out judge plausibility minus the base's, in points,
   both from that round's `evaluate` (the same (prompt, seed) pairs).
4. Round time at 2x prompts: the run's ingest/bootstrap/select folders are copied to a second run
   (their cache keys hold, so they are not recomputed) which runs round 1 with half the prompts
   (`generate.max_prompts`); the ratio is round 1's stage seconds at the full prompt set over
   those at half of it. Everything else (fine-tuning steps, evaluation samples) is per round fixed
   by config, so the target (≤ 2.2) checks that nothing grows faster than the prompts.

Ends with the lines `overhead share: X`, `plausibility gain (points): Y` and
`round time at 2x prompts: Z`.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the standard library's `select` (which subprocess imports) when this
# folder is sys.path[0]: put the project root there first.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFLOOP = [sys.executable, "-m", "flows.cli"]
ROUND_STAGES = ("generate", "label", "train_reward", "finetune", "evaluate")


def prefloop(runs_root: Path, *args: str) -> float:
    """Run one prefloop command; its wall seconds. A failure stops the benchmark with its output."""
    t0 = time.perf_counter()
    proc = subprocess.run([*PREFLOOP, "--runs-root", str(runs_root), *args], cwd=ROOT, text=True,
                          capture_output=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"e2e: `prefloop {' '.join(args)}` failed (exit {proc.returncode})")
    ui = [line for line in proc.stdout.splitlines() if "Prefect UI" in line or "Prefect server" in line]
    for line in ui:
        print(line)
    return seconds


def markers(run_dir: Path) -> list[tuple[str, dict]]:
    """(label, stage.json) of every finished stage of a run, in DAG order (compare variants left out)."""
    out = []
    for name in ("ingest", "bootstrap", "select"):
        path = run_dir / name / "stage.json"
        if path.exists():
            out.append((name, json.loads(path.read_text())))
    for round_dir in sorted(run_dir.glob("round-*")):
        for name in ROUND_STAGES:
            path = round_dir / name / "stage.json"
            if path.exists():
                out.append((f"{round_dir.name}/{name}", json.loads(path.read_text())))
    return out


def round_seconds(run_dir: Path, round_: int) -> float:
    return sum(m["seconds"] for label, m in markers(run_dir) if label.startswith(f"round-{round_:02d}/"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-root", type=Path, help="where the benchmark's runs go (default: a fresh temp dir)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")
    ap.add_argument("--no-scaling", action="store_true", help="skip the 2x-prompts round")
    args = ap.parse_args()
    runs_root = (args.runs_root or Path(tempfile.mkdtemp(prefix="prefloop-e2e-"))).absolute()
    runs_root.mkdir(parents=True, exist_ok=True)
    sets = [a for o in [f"run.rounds={args.rounds}", *args.overrides] for a in ("--set", o)]
    print(f"e2e: runs root {runs_root}; `prefloop run --run e2e {' '.join(sets)}`", flush=True)

    # 1. the whole run, timed from outside
    wall = prefloop(runs_root, "run", "--run", "e2e", *sets)
    run_dir = runs_root / "e2e"
    rows = markers(run_dir)

    # 2. per stage: seconds and model compute
    print("\n| stage | seconds | compute s | outside compute s |\n|---|---|---|---|")
    compute_total = 0.0
    for label, m in rows:
        compute = float(m.get("metrics", {}).get("compute_s", 0.0))
        compute_total += compute
        print(f"| {label} | {m['seconds']:.1f} | {compute:.1f} | {m['seconds'] - compute:.1f} |")
    stage_total = sum(m["seconds"] for _, m in rows)
    print(f"| all stages | {stage_total:.1f} | {compute_total:.1f} | {stage_total - compute_total:.1f} |")
    print(f"\nwall (command, from outside): {wall:.1f} s; between and around stages: {wall - stage_total:.1f} s")

    # 3. the judge: the last round against the base, on the same pairs
    evals = [(label, m) for label, m in rows if label.endswith("/evaluate")]
    last_label, last = evals[-1]
    mt = last["metrics"]
    for label, m in evals:
        e = m["metrics"]
        print(f"{label}: plausibility base {100 * e['plausibility_base']:.1f}% → round "
              f"{100 * e['plausibility_round']:.1f}% [{100 * e['plausibility_round_ci_low']:.1f}, "
              f"{100 * e['plausibility_round_ci_high']:.1f}]; caption agreement base "
              f"{100 * e['caption_agreement_base']:.1f}% → {100 * e['caption_agreement_round']:.1f}%")
    gain = 100 * (mt["plausibility_round"] - mt["plausibility_base"])

    # 4. one round at half the prompts, on copies of the run's first stages
    ratio = None
    if not args.no_scaling:
        full_prompts = int(json.loads((run_dir / "round-01" / "generate" / "stage.json").read_text())["counts"]["prompts"])
        half = max(full_prompts // 2, 1)
        half_dir = runs_root / "e2e-half"
        shutil.rmtree(half_dir, ignore_errors=True)
        half_dir.mkdir()
        for name in ("world", "ingest", "bootstrap", "select"):
            if (run_dir / name).exists():
                shutil.copytree(run_dir / name, half_dir / name, symlinks=True)
        shutil.copy(run_dir / "config.yaml", half_dir / "config.yaml")
        prefloop(runs_root, "run", "--run", "e2e-half", "--set", "run.rounds=1", "--set", f"generate.max_prompts={half}")
        recomputed = [label for label, m in markers(half_dir) if label in ("ingest", "bootstrap", "select")
                      and m["finished_at"] > json.loads((run_dir / label / "stage.json").read_text())["finished_at"]]
        if recomputed:
            print(f"e2e: note: the copied run recomputed {recomputed} (their cache keys did not hold)")
        t_full, t_half = round_seconds(run_dir, 1), round_seconds(half_dir, 1)
        ratio = t_full / t_half
        print(f"round 1: {full_prompts} prompts {t_full:.1f} s, {half} prompts {t_half:.1f} s")

    print(f"\nmachine: {os.cpu_count()} CPUs; wall {wall:.1f} s ({wall / 60:.1f} min) for {args.rounds} rounds")
    print(f"overhead share: {1 - compute_total / wall:.3f}")
    print(f"plausibility gain (points): {gain:.1f}")
    print(f"round time at 2x prompts: {'n/a' if ratio is None else f'{ratio:.2f}'}")


if __name__ == "__main__":
    main()
