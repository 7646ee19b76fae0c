"""Reward guidance (Flow-NRG) and first-frame conditioning (HuViDPO) on the base policy of a run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance.py [--run demo] [--seeds 16] [--scale 20]
                                                              # ~10 min on 2 shared cores

What it measures: the physics judge's plausibility and caption agreement (Wilson 95 % intervals)
of the run's base policy (bootstrap, no training) on 6 held-out prompts × `--seeds` seeds
(default 16: 96 samples per setting), for
- reward guidance with weights VQ:MQ:TA at scale `--scale`, using the run's latest clean-video
  reward model on x̂0 = x_t − t·v (MQ weight 0, 0.5, 1, 2, 5; VQ and TA alone);
- the same MQ guidance with a noisy-latent reward model trained here on the same labelled pairs
  with the same config and seed (`noisy_latent=true`; the paper's ablation);
- MQ guidance (weights 1 and 5) with a clean and a noisy-latent reward model trained here on
  `--world-pairs` world pairs labelled by the simulated annotators (benchmarks/reward.py's pairs),
  which know MQ far better than a run's reward model trained on a few dozen pairs;
- first-frame conditioning: frame 0 of a held-out real clip with the prompt's caption, held while
  sampling, without and with MQ guidance, and with sparse-causal attention (the base was trained
  with full attention, so this row shows what the processor costs before any training).
Every setting samples the same (prompt, seed) pairs. The table also shows the guiding reward
model's own mean z-scores of the results (clean model on the final videos: it rises under
guidance whether or not the judge agrees), the share of clipped corrections and, for conditioned
rows, the share of videos whose decoded frame 0 equals the given frame exactly. Frames are judged
as decoded (no mp4 round trip).
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the standard library's `select` when this folder is sys.path[0]:
# put the repository root there instead (as the other benchmarks do).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_contracts import RunLayout, read_manifest  # noqa: E402
from models.policy import Policy  # noqa: E402
from models.policy_training import wilson_interval  # noqa: E402
from models.reward_guidance import RewardGuidance, RewardGuidanceConfig, parse_weights  # noqa: E402
from models.reward_model import RewardModel  # noqa: E402
from tasks.bootstrap import heldout_first_frames  # noqa: E402
from tasks.evaluate import build_judge  # noqa: E402
from tasks.generate import policy_fps, sample_seed  # noqa: E402
from tasks.sample import latest_stage_manifest, run_policy, run_reward_model  # noqa: E402

PROMPTS = 6


def heldout_prompts_and_frames(layout: RunLayout, count: int, size: tuple[int, int]) -> tuple[list[str], list[np.ndarray]]:
    """The first `count` held-out captions (sorted) that have a readable real clip of the policy's
    size, and frame 0 of the first such clip (by video_id) for each."""
    rows = read_manifest(str(layout.stage("ingest").manifest_path), "videos", layout).rows()
    frames = heldout_first_frames(rows, layout, size)
    prompts = sorted(frames)[:count]
    if len(prompts) < count:
        raise SystemExit(f"guidance benchmark: only {len(prompts)} held-out captions with a {size} clip; need {count}")
    return prompts, [frames[p][0] for p in prompts]


def noisy_reward_model(layout: RunLayout, clean_folder: str, out: Path) -> str:
    """Train (once) a noisy-latent reward model on the latest round's labelled pairs with the clean
    model's own config and seed, from bootstrap's world CLIP."""
    from models.reward_model import RewardModelConfig, train_reward_model
    from tasks.train_reward import pair_arrays

    folder = out / "noisy_reward_model"
    if (folder / "config.json").is_file():
        return str(folder)
    import json

    saved = json.loads((Path(clean_folder) / "config.json").read_text())["config"]
    cfg = RewardModelConfig.model_validate({**saved, "noisy_latent": True, "device": "cpu"})
    labels = latest_stage_manifest(layout, "label")
    rows = read_manifest(str(labels), "labels", layout).rows()
    a, b, prompts, codes, _ = pair_arrays(rows, layout, str(labels))
    clip_rows = [r for r in read_manifest(str(layout.stage("bootstrap").manifest_path), "checkpoints", layout).rows()
                 if r["kind"] == "clip"]
    model, info = train_reward_model(a, b, prompts, codes, cfg, init_clip=layout.resolve(clip_rows[0]["path"]), fps=8.0)
    model.save_pretrained(folder)
    print(f"noisy-latent reward model: {len(prompts)} pairs, {info['seconds']} s -> {folder}", flush=True)
    return str(folder)


def world_reward_models(layout: RunLayout, pairs: int, steps: int, out: Path, seed: int = 0) -> tuple[str, str]:
    """(clean, noisy-latent) reward models trained on `pairs` world pairs labelled by the simulated
    annotators (benchmarks/reward.py's pairs: MQ ≈ 0.9 held-out accuracy there), from bootstrap's
    CLIP, one config apart (`noisy_latent`); trained once per `out`."""
    from benchmarks.reward import DIMENSIONS, label_pairs, make_pairs
    from models.physics_world import WorldSpec
    from models.reward_model import RewardModelConfig, train_reward_model

    folders = (out / "world_reward_clean", out / "world_reward_noisy")
    if all((f / "config.json").is_file() for f in folders):
        return str(folders[0]), str(folders[1])
    spec = WorldSpec()
    made = make_pairs(pairs, seed, spec)
    labels = label_pairs(made, spec, seed)
    clip_rows = [r for r in read_manifest(str(layout.stage("bootstrap").manifest_path), "checkpoints", layout).rows()
                 if r["kind"] == "clip"]
    for folder, noisy in zip(folders, (False, True), strict=True):
        cfg = RewardModelConfig(device="cpu", steps=steps, warmup_steps=max(1, steps // 20), seed=seed, noisy_latent=noisy)
        model, info = train_reward_model(
            np.stack([p.frames_a for p in made]), np.stack([p.frames_b for p in made]), [p.prompt for p in made],
            [[row[d] for d in DIMENSIONS] for row in labels], cfg, init_clip=layout.resolve(clip_rows[0]["path"]),
            fps=spec.fps,
        )
        model.save_pretrained(folder)
        mq = next(line for line in info["report"] if line["dimension"] == "MQ")
        print(f"world reward model (noisy_latent={noisy}): {pairs} pairs, {steps} steps, {info['seconds']} s, "
              f"held-out MQ acc w/o ties {mq['acc_wo_ties']:.3f} -> {folder}", flush=True)
    return str(folders[0]), str(folders[1])


def paired_delta(flags: list[bool], plain: list[bool]) -> str:
    """Difference in plausibility from plain on the same (prompt, seed) pairs, in points, with a
    normal 95 % interval of the mean paired difference (each pair's difference is −1, 0 or 1)."""
    d = np.asarray(flags, float) - np.asarray(plain, float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{100 * d.mean():+.1f} [{100 * (d.mean() - half):+.1f}, {100 * (d.mean() + half):+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="demo")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--seeds", type=int, default=16, help="seeds per prompt (6 prompts; 16 give 96 samples)")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="first seed index k (sample seed = hash(0, 0, prompt, k)): a fresh offset re-tests a setting "
                    "on samples it was not chosen on")
    ap.add_argument("--scale", type=float, default=20.0, help="guidance scale w for every guided row")
    ap.add_argument("--max-ratio", type=float, default=1.0, help="clip of each correction, in multiples of ‖v‖")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--world-pairs", type=int, default=1000,
                    help="also guide with reward models trained on this many annotator-labelled world pairs (0: off)")
    ap.add_argument("--world-steps", type=int, default=600, help="optimizer steps of those reward models")
    ap.add_argument("--only", default=None,
                    help="a regular expression: run only the rows whose name it matches (re.search), e.g. "
                    "'^(plain|MQ [12] \\(clean)'; default: every row")
    ap.add_argument("--out", default=None, help="folder for the noisy-latent reward model, reused when present "
                    "(default: a new temporary folder, so it is trained anew, ~20 s)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    layout = RunLayout(Path(args.runs_root).absolute(), args.run)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="prefloop-guidance-"))
    policy_cfg, _, _ = run_policy(layout, "base")
    policy_cfg = policy_cfg.model_copy(update={"device": "cpu"})
    base = Policy.from_pretrained(policy_cfg)
    sparse = Policy.from_pretrained(policy_cfg.model_copy(update={"attention": "sparse_causal"}))
    fps = policy_fps(policy_cfg)
    judge = build_judge(policy_cfg)
    prompts, first = heldout_prompts_and_frames(layout, PROMPTS, (policy_cfg.height, policy_cfg.width))
    pairs = [(p, sample_seed(0, 0, p, k), first[i])
             for k in range(args.seed_offset, args.seed_offset + args.seeds) for i, p in enumerate(prompts)]
    clean_folder = run_reward_model(layout)
    scorer = RewardModel.from_pretrained(clean_folder, device="cpu")
    noisy_folder = noisy_reward_model(layout, clean_folder, out)
    world = world_reward_models(layout, args.world_pairs, args.world_steps, out) if args.world_pairs else None

    def guide(weights: str, folder: str) -> RewardGuidance:
        cfg = RewardGuidanceConfig(weights=parse_weights(weights), scale=args.scale, max_ratio=args.max_ratio)
        return RewardGuidance.from_reward_model(cfg, folder, fps)

    settings = [
        ("plain (no guidance)", base, None, False),
        ("MQ 0.5 (clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:0.5:0", clean_folder), False),
        ("MQ 1 (clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:1:0", clean_folder), False),
        ("MQ 2 (clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:2:0", clean_folder), False),
        ("MQ 5 (clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:5:0", clean_folder), False),
        ("VQ 1 (clean, x̂0)", base, lambda: guide("VQ:MQ:TA=1:0:0", clean_folder), False),
        ("TA 1 (clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:0:1", clean_folder), False),
        ("MQ 1 (noisy-latent)", base, lambda: guide("VQ:MQ:TA=0:1:0", noisy_folder), False),
        *([
            ("MQ 1 (world RM, clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:1:0", world[0]), False),
            ("MQ 1 (world RM, noisy-latent)", base, lambda: guide("VQ:MQ:TA=0:1:0", world[1]), False),
            ("MQ 5 (world RM, clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:5:0", world[0]), False),
            ("MQ 5 (world RM, noisy-latent)", base, lambda: guide("VQ:MQ:TA=0:5:0", world[1]), False),
            # the weight sweep with the world's clean model (VideoAlign's Table 6 shape)
            ("MQ 0.5 (world RM, clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:0.5:0", world[0]), False),
            ("MQ 2 (world RM, clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:2:0", world[0]), False),
            ("VQ 1 (world RM, clean, x̂0)", base, lambda: guide("VQ:MQ:TA=1:0:0", world[0]), False),
            ("TA 1 (world RM, clean, x̂0)", base, lambda: guide("VQ:MQ:TA=0:0:1", world[0]), False),
            ("VQ:MQ:TA 1:1:1 (world RM, clean, x̂0)", base, lambda: guide("VQ:MQ:TA=1:1:1", world[0]), False),
        ] if world else []),
        ("first frame, plain", base, None, True),
        ("first frame + MQ 1 (clean)", base, lambda: guide("VQ:MQ:TA=0:1:0", clean_folder), True),
        ("first frame + sparse-causal attn", sparse, None, True),
    ]
    if args.only:
        settings = [row for row in settings if re.search(args.only, row[0])]
        if not settings:
            raise SystemExit(f"guidance benchmark: --only {args.only!r} names no row")
    print(f"{len(prompts)} held-out prompts × {args.seeds} seeds = {len(pairs)} samples per setting; scale w = "
          f"{args.scale}, clip {args.max_ratio}·‖v‖; reward model {clean_folder}", flush=True)
    header = ("| setting | plausible [95% CI] | Δ vs plain, paired [95% CI] | caption agreement [95% CI] | "
              "z VQ / MQ / TA (clean RM) | clipped | frame 0 exact | s |")
    lines = [header, "|" + "---|" * 8]
    plain_flags: list[bool] | None = None
    for name, pol, make, conditioned in settings:
        t0 = time.perf_counter()
        steer = make() if make else None
        plaus, agree, zs, exact = [], [], [], []
        for i in range(0, len(pairs), args.batch):
            batch = pairs[i : i + args.batch]
            ps, seeds = [p for p, _, _ in batch], [s for _, s, _ in batch]
            frame0 = np.stack([f for _, _, f in batch]) if conditioned else None
            videos = pol.sample(ps, seeds, first_frame=frame0, reward_guidance=steer)
            zs.append(scorer.score(videos, ps, fps=fps).numpy())
            for j, (video, prompt) in enumerate(zip(videos, ps, strict=True)):
                verdict = judge.judge(video, prompt)
                plaus.append(bool(verdict.plausible))
                agree.append(bool(verdict.caption_agreement))
                if conditioned:
                    exact.append(bool(np.array_equal(video[0], frame0[j])))
        n = len(plaus)
        cells = []
        for flags in (plaus, agree):
            lo, hi = wilson_interval(sum(flags), n)
            cells.append(f"{sum(flags) / n:.3f} [{lo:.3f}, {hi:.3f}]")
        if name.startswith("plain"):
            plain_flags = plaus
        delta = "-" if plain_flags is None or conditioned or name.startswith("plain") else paired_delta(plaus, plain_flags)
        z = np.concatenate(zs).mean(0)
        clipped = "-" if steer is None else f"{steer.stats['clipped']}/{steer.stats['corrections']}"
        ex = "-" if not conditioned else f"{sum(exact)}/{n}"
        line = (f"| {name} | {cells[0]} | {delta} | {cells[1]} | {z[0]:+.2f} / {z[1]:+.2f} / {z[2]:+.2f} | {clipped} | {ex} | "
                f"{time.perf_counter() - t0:.0f} |")
        lines.append(line)
        print(line, flush=True)
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
