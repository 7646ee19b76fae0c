"""Throughput of the `select` stage against decoding alone, and its scaling from 1 to 2 workers.

    .venv/bin/python benchmarks/select.py [--clips 2000] [--set select.batch_size=128 ...]

Builds an embedded world in a temporary folder (ingest, and a CLIP trained for a few steps —
its quality does not change the speed), starts one local Ray, then times on the same files:
- decode only: the same Ray Data pipeline shape (`map_batches` tasks, 2 at a time) that only
  decodes each video;
- the whole `select` stage (read manifest, decode and score on Ray tasks, CLIP on an actor pool,
  the physics judge, decisions, manifest and contact sheet) with 2 workers, then with 1;
- the ceiling: the same per-video decode-and-score work (no CLIP) in 1 and then 2 plain processes,
  without Ray, 600 videos each (what this machine's cores give when nothing else runs).
Ray's start-up (~4 s, once per stage run) is reported apart and not in the rates; so is one
untimed warm-up pass of the stage that starts the task worker processes (their imports and
judge), which are kept alive for the timed runs. The CLIP actor starts anew in every run
(~5.5 s of CPU: a Ray worker, `import open_clip` with torch, torchvision and transformers, the
model), as it does in every stage run.
"""

from __future__ import annotations

import os
import sys

# This file is named select.py like the standard library's `select` module: run as a script, its
# folder would come first on sys.path and shadow it. Put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def decode_batch(batch):
    import numpy as np

    from tasks.video_io import read_video

    frames = [read_video(p).shape[0] for p in batch["path"]]
    return {"frames": np.asarray(frames)}


def score_alone(args: tuple) -> tuple[int, float]:
    """Decode and score (frame scores and the physics judge, no CLIP) in this process, no Ray:
    returns (videos, seconds), after a warm-up batch that is not timed."""
    items, setup, batch = args
    import cv2
    import numpy as np

    cv2.setNumThreads(1)  # one thread per process, as a Ray worker of the stage has

    from tasks.select import frame_scores_batch

    def as_batch(chunk):
        return {k: np.asarray([it[k] for it in chunk]) for k in chunk[0]}

    frame_scores_batch(as_batch(items[:8]), setup, keep_frames=True)
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        frame_scores_batch(as_batch(items[i : i + batch]), setup, keep_frames=True)
    return len(items), time.perf_counter() - t0


def scaling_without_ray(rows: list[dict], layout, cfg, inputs: dict, batch: int, per_process: int = 600) -> float:
    """How select's per-video work scales from 1 to 2 plain processes on this machine: the ceiling
    the Ray pipeline's speed-up is measured against (it pays Ray and the CLIP actor's start on top)."""
    import dataclasses
    import multiprocessing

    from tasks import select

    # the stage's own setup and items, without CLIP (its actor is what the ceiling leaves out)
    setup = dataclasses.replace(select.scoring_setup(cfg.select, layout, inputs), clip_name=None, clip_pretrained=None)
    items = select.scoring_items(rows[: 2 * per_process], layout)
    halves = [items[:per_process], items[per_process:]]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        ((n1, t1),) = pool.map(score_alone, [(halves[0], setup, batch)])
    with ctx.Pool(2) as pool:
        both = pool.map(score_alone, [(h, setup, batch) for h in halves])
    return (sum(n for n, _ in both) / max(t for _, t in both)) / (n1 / t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the run, as `prefloop --set` (e.g. select.batch_size=128)")
    args = parser.parse_args()

    import ray

    from data_contracts import read_manifest
    from flows.config import resolve_config, save_config
    from infra.ray_cluster import ray_session
    from tasks import bootstrap, ingest, select
    from tasks.common import execute_stage

    tmp = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    try:
        cfg = resolve_config(
            overrides=[f"ingest.world.num_clips={args.clips}", "bootstrap.clip.steps=5", "bootstrap.clip.batch_size=16",
                       "bootstrap.train_policy=false", *args.set]
        )
        layout = cfg.layout(tmp / "runs", "bench")
        layout.run_dir.mkdir(parents=True)
        save_config(cfg, layout.config_path)
        videos = execute_stage(ingest.run, layout, layout.stage("ingest"), cfg.ingest, {}).manifest
        ckpts = execute_stage(bootstrap.run, layout, layout.stage("bootstrap"), cfg.bootstrap, {"videos": videos}).manifest
        rows = [r for r in read_manifest(videos.path, "videos", layout).rows() if r["reason"] is None]
        items = [{"path": str(layout.resolve(r["video_path"]))} for r in rows]
        total = len(read_manifest(videos.path, "videos", layout))
        batch = cfg.select.batch_size or select.auto_batch_size(len(items), 2)

        ceiling = scaling_without_ray(rows, layout, cfg, {"videos": videos, "checkpoints": ckpts}, batch)
        # Keep the warm-up's worker processes: Ray kills an idle worker after 1 s when more processes
        # than CPUs are alive (the CLIP actor counts), and the 2-worker run then started its second
        # task worker cold, 2.4-2.8 s late, while the 1-worker run had its one worker warm.
        os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
        t0 = time.perf_counter()
        with ray_session(num_cpus=2):
            startup = time.perf_counter() - t0
            # 1. decode only, same pipeline shape
            t0 = time.perf_counter()
            ds = ray.data.from_items(items).map_batches(decode_batch, batch_size=batch, compute=ray.data.TaskPoolStrategy(size=2))
            decoded = sum(int(b["frames"].shape[0]) for b in ds.iter_batches(batch_size=None))
            decode_rate = decoded / (time.perf_counter() - t0)
            # 2. the whole stage, 1 worker then 2 (a fresh folder each time: no score cache), after
            #    one untimed pass that starts and warms the worker processes (imports, the judge)
            rates = {}
            for workers in (0, 1, 2):
                out = layout.stage("select")
                shutil.rmtree(out.path, ignore_errors=True)
                sel_cfg = cfg.select.model_copy(update={"workers": workers or 2})
                t0 = time.perf_counter()
                execute_stage(select.run, layout, out, sel_cfg, {"videos": videos, "checkpoints": ckpts})
                rates[workers] = total / (time.perf_counter() - t0)
        print(f"videos: {total} ({len(items)} decodable), {cfg.ingest.world.size}px x {cfg.ingest.world.frames} frames")
        print(f"ray start-up: {startup:.1f} s (not in the rates)")
        print(f"videos per batch: {batch} (2 workers; select.batch_size {cfg.select.batch_size or 'auto'})")
        print(f"decode only (2 Ray tasks at a time): {decode_rate:.1f} videos/s")
        print(f"select, 2 workers: {rates[2]:.1f} videos/s")
        print(f"select, 1 worker: {rates[1]:.1f} videos/s")
        print(f"decode and score without Ray (1,200 videos, no CLIP), speed-up 1->2 processes: {ceiling:.2f}")
        print(f"select/decode ratio: {rates[2] / decode_rate:.2f}")
        print(f"speed-up 1->2 workers: {rates[2] / rates[1]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
