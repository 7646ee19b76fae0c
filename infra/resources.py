"""How much of the machine each stage's Ray work asks for: one table for all stages.

Why one table: stages must agree on a budget that fits the machine. Here that is 2
CPU cores shared with other work and, on some machines, GPUs. On 2 cores an actor
pool whose actors reserved 1 CPU each starved Ray Data's read task and hung, so
model actors reserve a fraction of a CPU (`num_cpus=0.25`) and pin their math
libraries to one thread (`thread_env`) instead of fighting over the cores.

GPU requests say what a stage uses on a GPU machine. `resources_for` clamps them to
the GPUs that exist, because Ray never schedules a request for a GPU the cluster
lacks: the stage would wait forever instead of running on CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

# Environment variables that cap the thread pools of torch (OpenMP), BLAS backends,
# numexpr and OpenCV. Ray sets only OMP_NUM_THREADS by itself: without OPENCV_FOR_THREADS_NUM
# an OpenCV call in a Ray task (select's optical flow, evaluate's dynamic degree) ran on a
# thread per core of the machine, beside the other workers.
_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)


@dataclass(frozen=True)
class StageResources:
    """What one stage's Ray workers reserve.

    num_cpus:   CPUs per actor (or per task when `actors == 0`); fractions let model
                actors share the 2 cores with Ray Data's read tasks.
    num_gpus:   GPUs per actor; fractions share one GPU between actors.
    actors:     size of the actor pool (one model loaded per actor); 0 = plain tasks.
    batch_size: rows per `map_batches` call or per training step.
    share_node: the stage's actors are the only work running while it runs (a training
                worker, the sampling actors), so `resources_for` gives them a node's CPUs
                split between them (`num_cpus` is then the floor): on 2 cores one
                fine-tuning worker with 2 threads takes 0.32 s a step, with 1 thread 0.53 s.
    """

    num_cpus: float
    num_gpus: float
    actors: int
    batch_size: int
    share_node: bool = False

    def __post_init__(self) -> None:
        """Reject budgets Ray would refuse later, far from where they were written."""
        problems = []
        if self.num_cpus < 0 or self.num_gpus < 0:
            problems.append("num_cpus and num_gpus must be >= 0")
        if self.actors < 0:
            problems.append("actors must be >= 0")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if problems:
            raise ValueError(f"{self!r}: " + "; ".join(problems))

    @property
    def threads(self) -> int:
        """Math-library threads per actor: the whole CPUs it reserved, at least one."""
        return max(1, math.floor(self.num_cpus))

    def ray_options(self) -> dict:
        """Keyword arguments for `.options(...)` / `map_batches(...)` of this stage.

        Adds a `runtime_env` with `thread_env(self.threads)` only when the stage
        reserves more than one CPU: the session default is one thread per worker
        (see `infra.ray_cluster`), and Ray merges these env vars over it.
        """
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.threads > 1:
            options["runtime_env"] = {"env_vars": thread_env(self.threads)}
        return options


# Defaults for 2 shared CPU cores; GPU shares apply where GPUs exist.
STAGE_RESOURCES: dict[str, StageResources] = {
    # Decoding and probing files: stateless tasks, no model to keep loaded.
    "ingest": StageResources(num_cpus=0.5, num_gpus=0.0, actors=0, batch_size=16),
    # Trains the tiny CLIP and base policy: one training worker owning the machine.
    "bootstrap": StageResources(num_cpus=1.0, num_gpus=1.0, actors=1, batch_size=16),
    # Scoring with open_clip and optical flow: two small model actors share a GPU.
    "select": StageResources(num_cpus=0.25, num_gpus=0.25, actors=2, batch_size=8),
    # One long-lived policy actor per GPU; video sampling is memory-bound.
    "generate": StageResources(num_cpus=0.5, num_gpus=1.0, actors=1, batch_size=4, share_node=True),
    # Critic inference (VLM / reward model / simulated annotators) in an actor pool.
    "label": StageResources(num_cpus=0.25, num_gpus=0.5, actors=2, batch_size=8),
    # Bradley-Terry reward model training: one worker.
    "train_reward": StageResources(num_cpus=1.0, num_gpus=1.0, actors=1, batch_size=16),
    # DPO-family fine-tuning of the policy (LoRA): one worker, small batches of videos.
    "finetune": StageResources(num_cpus=1.0, num_gpus=1.0, actors=1, batch_size=4, share_node=True),
    # Judge and metrics over held-out generations: an actor pool like `label`.
    "evaluate": StageResources(num_cpus=0.25, num_gpus=0.5, actors=2, batch_size=8),
}


def resources_for(
    stage: str,
    overrides: dict | None = None,
    gpus_available: float | None = None,
    node_cpus: float | None = None,
) -> StageResources:
    """The stage's row of `STAGE_RESOURCES`, with `overrides` applied and GPUs clamped.

    overrides:      field -> value, e.g. from a stage config or CLI flag.
    gpus_available: GPUs the Ray cluster has (e.g. `ray.cluster_resources().get("GPU", 0)`
                    when joining a remote cluster); None counts the GPUs torch sees here.
                    A request above it is cut to it, so no GPU at all means CPU.
    node_cpus:      CPUs of the cluster's largest node (`largest_node_cpus()`); for a
                    `share_node` stage without a `num_cpus` override, each of its actors
                    reserves floor(node_cpus / actors) CPUs (at least the row's), and as
                    many math-library threads.
    """
    if stage not in STAGE_RESOURCES:
        raise KeyError(
            f"resources_for({stage!r}): unknown stage; known stages are "
            f"{sorted(STAGE_RESOURCES)}. Add a row to STAGE_RESOURCES in infra/resources.py."
        )
    overrides = overrides or {}
    row = _with_overrides(stage, STAGE_RESOURCES[stage], overrides)
    if row.share_node and node_cpus is not None and "num_cpus" not in overrides:
        row = replace(row, num_cpus=max(row.num_cpus, float(math.floor(node_cpus / max(1, row.actors)))))
    available = local_gpu_count() if gpus_available is None else gpus_available
    return replace(row, num_gpus=min(row.num_gpus, float(available)))


def largest_node_cpus() -> float:
    """CPUs of the largest alive node of the Ray cluster this process is connected to."""
    import ray

    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def torch_device(num_gpus: float) -> str:
    """"cuda" when the work asked for a GPU and torch can use one, else "cpu".

    Inside a Ray actor with `num_gpus > 0`, Ray sets CUDA_VISIBLE_DEVICES, so "cuda"
    is the GPU Ray gave it.
    """
    if num_gpus <= 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=1)
def local_gpu_count() -> int:
    """GPUs torch sees in this process (cached: importing torch costs seconds)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables capping every math library's thread pool at `threads`."""
    if threads < 1:
        raise ValueError(f"thread_env({threads}): threads must be >= 1")
    return {name: str(threads) for name in _THREAD_VARS}


def _with_overrides(stage: str, row: StageResources, overrides: dict) -> StageResources:
    """`row` with `overrides` applied; unknown fields are an error, not ignored."""
    known = {f.name for f in fields(StageResources)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KeyError(
            f"resources_for({stage!r}): unknown resource field(s) {unknown}; "
            f"allowed: {sorted(known)}."
        )
    return replace(row, **overrides)
