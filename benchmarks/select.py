"""Throughput of the `select` stage against decoding alone, and its scaling from 1 to 2 workers.

    .venv/bin/python benchmarks/select.py [--clips 2000] [--set select.batch_size=128 ...]

Builds an embedded world in a temporary folder (ingest, and a CLIP trained for a few steps —
its quality does not change the speed), then times on the same files, each configuration in a
fresh process held to its cores (Ray's daemons and workers, started from it, inherit that):
- Ray on 2 cores: decode only (the same Ray Data pipeline shape, `map_batches` tasks 2 at a time,
  that only decodes each video); the whole `select` stage (read manifest, decode and score on Ray
  tasks, CLIP on an actor pool, the physics judge, decisions, manifest and contact sheet) with
  2 workers; and the stage with 1 task at a time (its CLIP actor and driver then have the other
  core to themselves);
- Ray on 1 core: the stage with 1 worker.
`speed-up 1->2 workers` is the stage on 2 cores (2 workers) over the stage on 1 core (1 worker):
what a second core's worth of workers buys. The 1-task-at-a-time run on 2 cores is printed too,
as are the CPU seconds of each timed run by process role (driver, task workers, CLIP actor, Ray's
daemons), which show how much of the machine each configuration used.
Also the ceiling: the same per-video decode-and-score work (no CLIP) in 1 and then 2 plain
processes, without Ray, 600 videos each (what this machine's cores give when nothing else runs).
Ray's start-up (once per stage run) is reported apart and not in the rates; so is one untimed
warm-up pass of the stage per configuration that starts the task worker processes (their
imports and judge), which are kept alive for the timed runs. The CLIP actor starts anew in every
run (a Ray worker, `import open_clip` with torch, torchvision and transformers, the model), as
it does in every stage run.
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


class CpuWatch:
    """CPU seconds spent by this process and all its descendants (Ray's daemons and workers) while
    the block runs, by role, sampled every 0.2 s so that processes which end inside the block (the
    CLIP actor) count up to their last sample."""

    ROLES = (("ClipScorer", "CLIP actor"), ("MapBatches", "decode-and-score tasks"), ("ray::", "other Ray workers"))

    def __init__(self) -> None:
        import threading

        import psutil

        self._me = psutil.Process()
        self._role: dict[int, str] = {}
        self._start = self._sample()
        self._last = dict(self._start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, float]:
        import psutil

        seen = {}
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                seen[proc.pid] = t.user + t.system
                if proc.pid != self._me.pid:
                    title = " ".join(proc.cmdline())[:200]
                    role = next((name for key, name in self.ROLES if key in title), "Ray daemons")
                    # a worker's title changes with what it runs: keep the first model/task role seen
                    if self._role.get(proc.pid) in (None, "other Ray workers", "Ray daemons"):
                        self._role[proc.pid] = role
            except psutil.Error:
                continue
        return seen

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._last.update(self._sample())

    def __enter__(self) -> CpuWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self._last.items():
            role = "driver (this process)" if pid == self._me.pid else self._role.get(pid, "Ray daemons")
            out[role] = out.get(role, 0.0) + cpu - self._start.get(pid, 0.0)
        return out


def stage_rates(args: tuple) -> dict:
    """In a fresh process held to `cores` CPUs (its Ray's processes inherit that), start Ray with
    `cores` CPUs and time: decode only (if asked), then the whole stage once per entry of `slots`
    (decode-and-score tasks at a time), after one untimed pass that starts and warms the task
    workers. Returns videos/s per entry, the decode-only rate and Ray's start-up."""
    cores, slots, with_decode, layout, cfg, inputs, items, total, batch = args
    import ray

    from infra.ray_cluster import ray_session
    from tasks import select
    from tasks.common import execute_stage

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    # Keep the warm-up's worker processes: Ray kills an idle worker after 1 s when more processes
    # than CPUs are alive (the CLIP actor counts), and a 2-worker run then started its second
    # task worker cold, 2.4-2.8 s late, while a 1-worker run had its one worker warm.
    os.environ["RAY_idle_worker_killing_time_threshold_ms"] = "600000"
    out: dict = {"rates": {}}
    t0 = time.perf_counter()
    with ray_session(num_cpus=cores):
        out["startup"] = time.perf_counter() - t0
        if with_decode:
            def decode_batch(batch):  # nested: Ray pickles it by value (this process's __main__ is not a module its workers have)
                import numpy as np

                from tasks.video_io import read_video

                return {"frames": np.asarray([read_video(p).shape[0] for p in batch["path"]])}

            t0 = time.perf_counter()
            ds = ray.data.from_items(items).map_batches(decode_batch, batch_size=batch, compute=ray.data.TaskPoolStrategy(size=2))
            decoded = sum(int(b["frames"].shape[0]) for b in ds.iter_batches(batch_size=None))
            out["decode"] = decoded / (time.perf_counter() - t0)
        for i, workers in enumerate((slots[0], *slots)):  # the first pass only warms up
            stage = layout.stage("select")
            shutil.rmtree(stage.path, ignore_errors=True)  # a fresh folder each time: no score cache
            t0 = time.perf_counter()
            with CpuWatch() as watch:
                execute_stage(select.run, layout, stage, cfg.select.model_copy(update={"workers": workers}), inputs)
            if i:
                out["rates"][workers] = total / (time.perf_counter() - t0)
                out.setdefault("cpu", {})[workers] = watch.by_role()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the run, as `prefloop --set` (e.g. select.batch_size=128)")
    args = parser.parse_args()

    import multiprocessing

    from data_contracts import read_manifest
    from flows.config import resolve_config, save_config
    from tasks import bootstrap, ingest, select
    from tasks.common import execute_stage

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("benchmarks/select.py needs 2 cores: it compares the stage on 1 and on 2")
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
        inputs = {"videos": videos, "checkpoints": ckpts}
        rows = [r for r in read_manifest(videos.path, "videos", layout).rows() if r["reason"] is None]
        items = [{"path": str(layout.resolve(r["video_path"]))} for r in rows]
        total = len(read_manifest(videos.path, "videos", layout))
        batch = cfg.select.batch_size or select.auto_batch_size(len(items), 2)

        ceiling = scaling_without_ray(rows, layout, cfg, inputs, batch)
        ctx = multiprocessing.get_context("spawn")
        common = (layout, cfg, inputs, items, total, batch)
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            two = pool.apply(stage_rates, ((2, (2, 1), True, *common),))
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            one = pool.apply(stage_rates, ((1, (1,), False, *common),))
        print(f"videos: {total} ({len(items)} decodable), {cfg.ingest.world.size}px x {cfg.ingest.world.frames} frames")
        print(f"ray start-up: {two['startup']:.1f} s on 2 cores, {one['startup']:.1f} s on 1 (not in the rates)")
        print(f"videos per batch: {batch} (2 workers; select.batch_size {cfg.select.batch_size or 'auto'})")
        print(f"decode only (2 Ray tasks at a time, 2 cores): {two['decode']:.1f} videos/s")
        print(f"select, 2 workers (Ray on 2 cores): {two['rates'][2]:.1f} videos/s")
        print(f"select, 1 worker (Ray on 1 core): {one['rates'][1]:.1f} videos/s")
        print(f"select, 1 task at a time with Ray on 2 cores (the CLIP actor and the driver get the other core): "
              f"{two['rates'][1]:.1f} videos/s, speed-up to 2 workers {two['rates'][2] / two['rates'][1]:.2f}")
        for label, cpu in (("2 workers, 2 cores", two["cpu"][2]), ("1 worker, 1 core", one["cpu"][1]),
                           ("1 task at a time, 2 cores", two["cpu"][1])):
            parts = ", ".join(f"{role} {sec:.1f}" for role, sec in sorted(cpu.items(), key=lambda kv: -kv[1]))
            print(f"  CPU seconds, {label}: {sum(cpu.values()):.1f} = {parts}")
        print(f"decode and score without Ray (1,200 videos, no CLIP), speed-up 1->2 processes: {ceiling:.2f}")
        print(f"select/decode ratio: {two['rates'][2] / two['decode']:.2f}")
        print(f"speed-up 1->2 workers: {two['rates'][2] / one['rates'][1]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
