"""Fine-tuning variants on one finished round's samples, judged on the same held-out pairs.

    .venv/bin/python benchmarks/finetune_variants.py --run demo '{"pairs": "best_worst"}'
    .venv/bin/python benchmarks/finetune_variants.py --run demo '{"pairs": "plausible_winner", "lambda1": 1.0}'
    .venv/bin/python benchmarks/finetune_variants.py --run demo '{"steps": 0, "eval_guidance": [1, 2, 3, 5]}'

The experiment behind the finetune table of the README: what moves the judge's plausibility of
the world's policy. It reads a run's round-1 `generate` samples and the critic's pointwise scores
(`label/scores.parquet`: the annotators' noise-free VQ/MQ/TA of every sample), builds pairs by a
rule, trains one LoRA from the base policy with `train_preference` (any `PreferenceTrainConfig`
field can be set in the JSON spec), samples the same `--samples` held-out (prompt, seed) pairs as
`evaluate` (written to mp4 and judged as decoded), and prints one JSON line (also appended to
`--out`). Pair rules, per prompt among its K samples:

- `best_worst`: highest vs. lowest overall score, kept when MQ decides and TA does not disagree
  (what `label.pairing=best_worst` + `finetune.prefer=mq_ta` give, without rater noise);
- `all`: every pair MQ decides and TA does not disagree (`label.pairing=all_pairs`);
- `plausible_winner`: those of `all` whose winner is fully plausible (MQ = 1).

Spec keys besides the `PreferenceTrainConfig` fields: `pairs`, `eval_guidance` (a list; null is
the policy's default), `reencode` (true: train on the latents of the mp4s as written, as
`generate` caches them now; false: the cached latent files, which runs made before that change
hold as the sampler's raw end points). `"steps": 0` evaluates the base only.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the standard library's `select` when this folder is sys.path[0]
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="JSON: pair rule, PreferenceTrainConfig fields, eval_guidance, reencode")
    ap.add_argument("--run", default="demo")
    ap.add_argument("--runs-root", type=Path, default=ROOT / "runs")
    ap.add_argument("--samples", type=int, default=256, help="held-out (prompt, seed) pairs, as evaluate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("finetune_variants.jsonl"))
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(args.threads)
    from data_contracts import read_manifest
    from flows.config import resolve_config
    from models.preference_training import PreferenceData, PreferenceTrainConfig, train_preference
    from tasks.evaluate import build_judge, plan_pairs, rate
    from tasks.finetune import FinetuneConfig, load_latents, real_videos
    from tasks.generate import load_sampler, policy_from_checkpoints
    from tasks.video_io import read_video, write_video

    run_dir = args.runs_root / args.run
    cfg = resolve_config(saved=run_dir / "config.yaml")
    layout = cfg.layout(args.runs_root, args.run)
    ckpts = read_manifest(run_dir / "bootstrap/manifest.parquet", "checkpoints", layout).rows()
    policy_cfg, _, _ = policy_from_checkpoints(ckpts, layout, "bootstrap")
    scores = pq.read_table(run_dir / "round-01/label/scores.parquet").to_pylist()
    gens = {g["video_path"]: g for g in pq.read_table(run_dir / "round-01/generate/manifest.parquet").to_pylist()}
    videos = pq.read_table(run_dir / "ingest/manifest.parquet").to_pylist()
    heldout = sorted({r["caption"] for r in videos if r["split"] == "heldout" and r["caption"]})
    eval_pairs = plan_pairs(heldout, args.samples, cfg.evaluate.seed)
    judge = build_judge(policy_cfg)

    spec = json.loads(args.spec)
    rule = spec.pop("pairs", "best_worst")
    guidances = spec.pop("eval_guidance", [None])
    reencode = spec.pop("reencode", True)

    # 1. pairs (prompt, chosen video, rejected video) by the rule
    by_prompt: dict[str, list[dict]] = {}
    for s in scores:
        by_prompt.setdefault(s["prompt"], []).append(s)
    pairs = []
    for prompt, group in by_prompt.items():
        if rule == "best_worst":
            group = sorted(group, key=lambda s: (s["overall"], s["generation_id"]))
            w, lo = group[-1], group[0]
            if w["score_mq"] > lo["score_mq"] and w["score_ta"] >= lo["score_ta"]:
                pairs.append((prompt, w["video_path"], lo["video_path"]))
            continue
        if rule not in ("all", "plausible_winner"):
            raise SystemExit(f"unknown pair rule {rule!r}: use best_worst, all or plausible_winner")
        for a, b in itertools.combinations(group, 2):
            a, b = (a, b) if a["score_mq"] >= b["score_mq"] else (b, a)
            if a["score_mq"] > b["score_mq"] and a["score_ta"] >= b["score_ta"]:
                if rule == "plausible_winner" and a["score_mq"] < 1:
                    continue
                pairs.append((prompt, a["video_path"], b["video_path"]))

    # 2. train one LoRA from the base
    policy = load_sampler(policy_cfg, None)
    result: dict = {"spec": args.spec, "pairs": len(pairs)}
    t0 = time.perf_counter()
    if spec.get("steps", 1) > 0:
        if reencode:
            def latents(paths):
                return torch.cat([policy.encode(np.stack([read_video(layout.resolve(p)) for p in paths[i:i + 256]]))
                                  for i in range(0, len(paths), 256)])
        else:
            def latents(paths):
                return load_latents([layout.resolve(gens[p]["latent_path"]) for p in paths])
        # 300 steps unless the spec says: the finetune default of sessions 2-10, which the README's table used
        train_cfg = PreferenceTrainConfig(**{"steps": 300, **spec})
        chosen = latents([c for _, c, _ in pairs])
        rejected = None if train_cfg.method == "sft" else latents([r for _, _, r in pairs])
        data = PreferenceData(prompts=[p for p, _, _ in pairs], chosen=chosen, rejected=rejected)
        real = {}
        if train_cfg.lambda2 > 0:
            selection = SimpleNamespace(path=str(run_dir / "select/manifest.parquet"))
            real_latents, real_prompts = real_videos({"selection": selection}, policy, FinetuneConfig().max_real_videos, layout)
            real = {"real_latents": real_latents, "real_prompts": real_prompts}
            result["real_videos"] = len(real_prompts)
        info = train_preference(policy, data, train_cfg, **real)
        result["train_s"] = round(time.perf_counter() - t0, 1)
        result["implicit_accuracy"] = info["final"]["implicit_accuracy"]

    # 3. the same held-out pairs as evaluate, written and judged as decoded
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"prefloop-variants-{os.getpid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for g in guidances:
        flags, captions = [], []
        for i in range(0, len(eval_pairs), 64):
            batch = eval_pairs[i:i + 64]
            clips = policy.sample([p["prompt"] for p in batch], [p["seed"] for p in batch], None, g)
            for j, (pair, clip) in enumerate(zip(batch, clips, strict=True)):
                path = out_dir / f"{i + j}.mp4"
                write_video(path, clip, 8.0)
                verdict = judge.judge(read_video(path), pair["prompt"])
                flags.append(verdict.plausible)
                captions.append(verdict.caption_agreement)
        share, low, high = rate(flags)
        result[f"guidance_{g}"] = {"plausibility": round(100 * share, 1), "ci": [round(100 * low, 1), round(100 * high, 1)],
                                   "caption_agreement": round(100 * float(np.mean(captions)), 1)}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    print(line)
    with open(args.out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
