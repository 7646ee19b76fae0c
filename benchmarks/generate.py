"""Videos per second of the `generate` stage: batched actor-pool sampling against one video at a time.

    .venv/bin/python benchmarks/generate.py [--prompts 16] [--k 4] [--batch 16] [--actors 2]

Builds the embedded world's base-policy architecture (WanTransformer3DModel, patch (1,4,4),
4 layers, width 128, ~1M parameters; random weights: the speed does not depend on them) and its
text encoder in a temporary folder, starts one local Ray, and runs the whole `generate` stage on
the same prompts and seeds twice: with `batch_size=1` (each video sampled alone) and with
`batch_size=--batch` (videos of a shard sampled together), both on the same actor pool, both
writing mp4s, latents and the manifest. Sampling uses the policy's default 20 Euler steps with
classifier-free guidance.

Two rates per run: the whole stage's (wall time from start to manifest, including Ray starting
the actors and each actor importing torch/diffusers and loading the policy: a fixed cost of
several seconds that batching cannot change), and the actor pool's sampling rate (videos over
the time actors spent in shards, summed over shards and divided by the number of actors, as
recorded in each shard's record). The speed-up line compares the pool rates.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the standard library's `select` when this folder is sys.path[0]:
# put the repository root there instead (as benchmarks/select.py does).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="samples per prompt")
    parser.add_argument("--batch", type=int, default=16, help="videos per sampling call in the batched run")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()

    from data_contracts import Lineage, RunLayout, write_manifest
    from infra.ray_cluster import ray_session
    from models.physics_world import WorldSpec, make_clip
    from models.policy import PolicyConfig, build_tiny, save_policy_folder
    from models.text_encoder import build_text_encoder
    from tasks import generate
    from tasks.common import execute_stage

    tmp = Path(tempfile.mkdtemp(prefix="prefloop-bench-gen-"))
    try:
        # 1. prompts from the world, a policy folder as bootstrap writes it
        import numpy as np

        rng = np.random.default_rng(0)
        prompts = list(dict.fromkeys(make_clip(rng, WorldSpec()).caption for _ in range(400)))[: args.prompts]
        layout = RunLayout(tmp / "runs", "bench")
        folder = layout.stage("bootstrap").files("policy")
        text = build_text_encoder(prompts, folder / "text_encoder")
        build_tiny("wan", folder / "transformer", text_dim=text.hidden_size, text_len=text.max_length)
        save_policy_folder(folder, PolicyConfig(family="wan", transformer=str(folder / "transformer"),
                                                text_encoder=str(folder / "text_encoder")))
        ckpt = write_manifest(
            [{"checkpoint_id": "base", "kind": "policy", "format": "diffusers", "path": layout.stored_path(folder),
              "base_id": "bench", "round": None, "metrics_json": None}],
            "checkpoints", layout.stage("bootstrap").manifest_path, layout, Lineage("bootstrap", {}, "bench"),
        )
        prompt_file = tmp / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        n_videos = len(prompts) * args.k
        print(f"{len(prompts)} prompts x {args.k} samples = {n_videos} videos of 8x16x16, {args.actors} actors")

        # 2. the same stage at batch 1 and batched
        with ray_session():
            pool_rates = {}
            for k, (name, batch) in enumerate((("one at a time", 1), ("batched", args.batch)), start=1):
                cfg = generate.GenerateConfig(
                    prompt_file=str(prompt_file), samples_per_prompt=args.k, max_prompts=None,
                    shard_size=args.batch, batch_size=batch, actors=args.actors,
                )
                out = layout.stage("generate", round=k)
                t0 = time.perf_counter()
                outcome = execute_stage(
                    lambda i, c, lay, o, lin: generate.run(i, c, lay, o, lin, round=o.round), layout, out, cfg,
                    {"checkpoints": ckpt}, force=True,
                )
                seconds = time.perf_counter() - t0
                assert outcome.counts["samples"] == n_videos
                busy = sum(json.loads(p.read_text())["seconds"] for p in out.files("shards").glob("shard-*.json"))
                pool_rates[name] = n_videos / (busy / args.actors)
                print(f"{name:>14}: batch {batch:>2}: stage {seconds:6.1f} s = {n_videos / seconds:6.2f} videos/s; "
                      f"actor pool {pool_rates[name]:6.2f} videos/s")
        print(f"batched speed-up: {pool_rates['batched'] / pool_rates['one at a time']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
