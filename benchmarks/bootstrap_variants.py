"""Base-policy training variants on one run's ingested clips, judged on the same held-out prompts.

    .venv/bin/python benchmarks/bootstrap_variants.py --run demo '{"batch_size": 32, "lr": 1e-3, "steps": 1150}'
    .venv/bin/python benchmarks/bootstrap_variants.py --run demo '{"batch_size": 16, "lr": 2e-3, "steps": 2200}'
    .venv/bin/python benchmarks/bootstrap_variants.py --run demo --threads 1 '{"batch_size": 8, "steps": 4000}'

The experiment behind the bootstrap table of the README: what gives the base policy balls within
the stage's time budget. It reads a run's `ingest` manifest, trains the base policy exactly as
`bootstrap` does (`train_base_policy` on the usable, full-length, non-held-out clips) with any
`BasePolicyTrainConfig` field set from the JSON spec — fixed steps, no time budget unless the spec
sets `time_budget_s`, so variants run side by side compare by steps — then samples `--samples`
(held-out prompt, seed) pairs as `bootstrap` does at each guidance of `eval_guidance` (default
[1, 3, 5]), judges them, writes a frame strip per guidance under `--out-dir`, and prints one JSON
line (also appended to `--out`).

With `"eval_first_frame": true` in the spec it also samples the same pairs from a given frame 0 —
the j-th sample of a prompt from frame 0 of the prompt's j-th held-out real clip (mod their number)
— held as the trained policy holds it (`first_frame_mode`: `clean` when the spec sets
`first_frame_rate` > 0, else `path`), and reports those rates and how many frame 0s came back
exactly. `--reuse` loads a variant already trained in its `--out-dir` folder instead of training.

`"init": "base"` continues training the run's bootstrap policy (its weights and text encoder) instead of
a random one: what more training on good clips does to the base a round starts from.

`"train_on": "selected"` trains on the training clips the run's `select` stage kept (plausible,
defect-free, caption-matching) instead of every usable one, and `"max_clips": N` on a seeded random N
of them: whether the same model, trained for the same steps on good clips only, samples more
plausible videos (is the base bound by its data or by its size and steps?).

    .venv/bin/python benchmarks/bootstrap_variants.py --run e2e --runs-root /tmp/e2e6 --samples 256 \
        '{"steps": 1800, "first_frame_rate": 0.25, "eval_guidance": [5], "eval_first_frame": true}'
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the standard library's `select` when this folder is sys.path[0]
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="JSON: BasePolicyTrainConfig fields, plus eval_guidance (a list)")
    ap.add_argument("--run", default="demo")
    ap.add_argument("--runs-root", type=Path, default=ROOT / "runs")
    ap.add_argument("--samples", type=int, default=128, help="held-out (prompt, seed) pairs judged per guidance")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two variants run side by side)")
    ap.add_argument("--out", type=Path, default=Path("bootstrap_variants.jsonl"))
    ap.add_argument("--reuse", action="store_true", help="load the variant from its --out-dir folder if it is there")
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "prefloop-bootstrap-variants")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from data_contracts import read_manifest
    from flows.config import resolve_config
    from models.physics_world import WorldSpec
    from models.policy_training import BasePolicyTrainConfig, first_frame_mode, load_policy, train_base_policy
    from tasks.bootstrap import full_length, heldout_first_frames, judge_heldout, training_rows
    from tasks.video_io import read_video

    run_dir = args.runs_root / args.run
    cfg = resolve_config(saved=run_dir / "config.yaml")
    layout = cfg.layout(args.runs_root, args.run)
    videos = read_manifest(run_dir / "ingest/manifest.parquet", "videos", layout).rows()
    spec = json.loads(args.spec)
    train_on = spec.pop("train_on", "all")
    init = spec.pop("init", None)
    if init == "base":
        spec["init_from"] = str(run_dir / "bootstrap/policy")
    elif init is not None:
        raise SystemExit(f"init: {init!r}; use 'base' (continue the run's bootstrap policy) or leave it out")
    max_clips = spec.pop("max_clips", None)
    if train_on == "selected":
        kept = {r["video_id"] for r in read_manifest(run_dir / "select/manifest.parquet", "selection", layout).rows() if r["selected"]}
        videos_for_training = [r for r in videos if r["video_id"] in kept]
    elif train_on == "all":
        videos_for_training = videos
    else:
        raise SystemExit(f"train_on: {train_on!r}; use 'all' or 'selected'")
    rows = training_rows(videos_for_training, max_clips, 0)
    clips, captions, shape = full_length([read_video(layout.resolve(r["video_path"])) for r in rows], [r["caption"] for r in rows])
    heldout = sorted({r["caption"] for r in videos if r["split"] == "heldout" and r["caption"]})

    guidances = spec.pop("eval_guidance", [1, 3, 5])
    with_first_frame = bool(spec.pop("eval_first_frame", False))
    train_cfg = BasePolicyTrainConfig(**spec)
    name = "-".join(f"{k}{v}" for k, v in sorted(spec.items()) if k != "init_from") or "default"
    if init is not None:
        name += f"-init{init}"
    if train_on != "all" or max_clips is not None:
        name += f"-{train_on}{max_clips or ''}"
    out_dir = args.out_dir / name
    if args.reuse and (out_dir / "transformer" / "config.json").is_file():
        policy, info = load_policy(out_dir, shape[0], shape[1], first_frame_mode(train_cfg)), {}
    else:
        policy, info = train_base_policy(clips, captions, out_dir, train_cfg)
    result: dict = {
        "spec": args.spec, "threads": args.threads, "train_on": train_on, "clips": len(clips), "steps_done": info.get("steps_done"),
        "train_s": round(info.get("seconds", 0.0), 1), "s_per_step": round(info.get("seconds_per_step", 0.0), 3),
        "final_loss": round(info.get("final_loss", float("nan")), 4), "reused": not info,
    }
    spec_world = WorldSpec(size=shape[1], frames=shape[0])
    first = heldout_first_frames(videos, layout, shape[1:3]) if with_first_frame else None
    for g in guidances:
        policy.cfg = policy.cfg.model_copy(update={"guidance_scale": float(g)})
        for label, frames in (("", None), ("_first_frame", first)) if first else (("", None),):
            t0 = time.perf_counter()
            judged, _ = judge_heldout(policy, heldout, args.samples, spec_world,
                                      out_dir / f"samples_guidance_{g}{label}.png", first_frames=frames)
            low, high = judged["plausibility_ci"]
            entry = {
                "plausibility": round(100 * judged["plausibility"], 1), "ci": [round(100 * low, 1), round(100 * high, 1)],
                "caption_agreement": round(100 * judged["caption_agreement"], 1),
                "judge_s": round(time.perf_counter() - t0, 1),
                "reasons": dict(sorted(judged["reasons"].items(), key=lambda kv: -kv[1])),  # first failing check
            }
            if frames is not None:
                entry.update(mode=policy.cfg.first_frame_mode, frame0_exact=judged["frame0_exact"])
            result[f"guidance_{g}{label}"] = entry
    result["strips"] = str(out_dir)
    line = json.dumps(result)
    print(line)
    with open(args.out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
