"""The judge's plausibility and caption agreement of each policy of a run, on fresh seeds.

    .venv/bin/python benchmarks/policy_rates.py --run e2e --runs-root /tmp/e2e [--train 4] [--heldout 16]

For the base (bootstrap), round 1 and round 2 (whichever exist): every training caption × `--train`
seeds and every held-out caption × `--heldout` seeds, seeds 1000, 1001, … (not the seeds generate or
evaluate used), sampled with the policy's own steps and guidance and judged as decoded. It answers
whether a round's gain shows on the prompts it trained on as well as on held-out ones, apart from
the particular (prompt, seed) pairs `evaluate` draws. ~2.5 minutes for a two-round run on 2 cores.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the standard library's `select` when this folder is sys.path[0].
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from data_contracts import read_manifest  # noqa: E402
from flows.config import resolve_config  # noqa: E402
from models.policy_training import wilson_interval  # noqa: E402
from tasks.evaluate import build_judge  # noqa: E402
from tasks.generate import load_sampler, policy_from_checkpoints  # noqa: E402


def rates(layout, manifest: Path, prompts: list[str], seeds_per_prompt: int) -> tuple[int, int, int]:
    """(plausible, caption-agreeing, total) of the policy in `manifest` on prompts × seeds."""
    rows = read_manifest(str(manifest), "checkpoints", layout).rows()
    policy_cfg, lora, _ = policy_from_checkpoints(rows, layout, str(manifest))
    policy = load_sampler(policy_cfg, lora, fold=True)
    judge = build_judge(policy_cfg)
    todo = [p for p in prompts for _ in range(seeds_per_prompt)]
    seeds = [1000 + i for i in range(len(todo))]
    plausible = caption = 0
    for i in range(0, len(todo), 32):
        for video, prompt in zip(policy.sample(todo[i:i + 32], seeds[i:i + 32]), todo[i:i + 32], strict=True):
            verdict = judge.judge(video, prompt)
            plausible += verdict.plausible
            caption += verdict.caption_agreement
    return plausible, caption, len(todo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo")
    ap.add_argument("--runs-root", type=Path, default=Path("runs"))
    ap.add_argument("--train", type=int, default=4, help="seeds per training caption")
    ap.add_argument("--heldout", type=int, default=16, help="seeds per held-out caption")
    args = ap.parse_args()
    cfg = resolve_config(saved=args.runs_root / args.run / "config.yaml")
    layout = cfg.layout(args.runs_root, args.run)
    videos = read_manifest(str(layout.stage("ingest").manifest_path), "videos", layout).rows()
    captions = {split: sorted({r["caption"] for r in videos if r["split"] == split and r["caption"]})
                for split in ("train", "heldout")}
    policies = [("base", layout.stage("bootstrap").manifest_path)] + [
        (f"round {k}", layout.stage("finetune", k).manifest_path) for k in (1, 2, 3, 4)
        if layout.stage("finetune", k).manifest_path.is_file()
    ]
    print(f"{len(captions['train'])} training captions x {args.train} seeds, "
          f"{len(captions['heldout'])} held-out captions x {args.heldout} seeds")
    print("| policy | training prompts: plausible | caption | held-out prompts: plausible | caption |")
    print("|---|---|---|---|---|")
    for name, manifest in policies:
        cells = []
        for split, n in (("train", args.train), ("heldout", args.heldout)):
            ok, cap, total = rates(layout, manifest, captions[split], n)
            low, high = wilson_interval(ok, total)
            cells += [f"{100 * ok / total:.1f}% ({100 * low:.1f}–{100 * high:.1f}%)", f"{100 * cap / total:.1f}%"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
