"""Cost of a Flow-DPO step against an SFT step on the same 2B videos: time and peak memory per step.

    .venv/bin/python benchmarks/finetune.py [--batch 16] [--steps 20] [--warmup 3] [--threads 1]
    .venv/bin/python benchmarks/finetune.py --dim 256 --layers 8     # a larger model: does the ratio hold?

The model is the embedded world's base-policy architecture (`build_tiny`: WanTransformer3DModel,
patch (1,4,4), 4 layers, width 128; random weights, the cost does not depend on them) with its
text encoder, on 16 px × 8-frame clips; `--dim/--layers` grow it. One batch of B pairs is drawn
once (B chosen and B rejected latents, seeded uniform in [-1, 1], one world caption per pair) and
every configuration trains on exactly those 2B videos through `train_preference`, with the same
LoRA (r16 on q/k/v/o) and the same AdamW:

- `sft`: SFT over all 2B videos (`PreferenceData(chosen = the 2B videos)`, batch 2B): the policy's
  forward and backward of 2B videos;
- `flow_dpo`, reference = LoRA disabled (the default, no second copy): the policy's forward and
  backward of the same 2B videos plus the reference's forward of them without gradient;
- `flow_dpo`, reference = frozen copy (the naive reference), for contrast.

Time: one process loads the policy, runs `--warmup` steps of each configuration (adds the LoRA,
touches every kernel), then calls `train_preference` for each configuration in turn, blocks of
1 + 5 steps, until each has `--steps` timed steps. Interleaving puts the same share of the other
jobs' load on every configuration; the first step of each call (AdamW building its state) is not
timed. A step's time is the interval between consecutive `on_step` callbacks (batch, loss,
backward, clip, AdamW; on CUDA after a synchronize); the table gives the median.

Peak memory: each configuration in a fresh process loads the policy, runs `--warmup` steps, and
then a second `train_preference` call of 1 + 2 steps is measured: its peak over what was in use
before it (the loaded model with its LoRA), so it holds the optimiser state, the activations kept
for backward, the gradients and, for `frozen_copy`, the copy.

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus
  `memory_allocated` before the call.
- CPU (Linux): the process's peak resident set `VmHWM`, reset to the current RSS through
  `/proc/self/clear_refs` (`5`) just before the call, minus `VmRSS` then, after `malloc_trim(0)`
  has returned the heap's free pages (else the call would reuse them unseen). These processes run
  with glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so every tensor buffer
  is its own mapping and leaves the resident set when freed; with glibc's adaptive threshold the
  heap keeps freed activations and the warm-up steps would hide the training peak. (tracemalloc
  does not see torch's allocations, and torch keeps no CPU allocator statistics.) The setting
  makes steps slower, which is why time is measured in a process without it. Checked against
  the live bytes of torch's allocation events (torch.profiler, profile_memory): sft 153.2,
  flow_dpo 154.0, frozen copy 159.6 MiB where the RSS gave 154.5, 157.2, 162.8; the RSS adds the
  allocator's overhead (page rounding, small blocks), which grows with the number of tensors, so
  at `--batch 4` it shows flow_dpo 45.3 vs sft 40.7 MiB where the live bytes are 39.7 vs 39.4.

About 2 minutes on 2 shared cores (8 with `--dim 256 --layers 8`). The last two lines are the ratios of the default `flow_dpo` to `sft`.
"""

from __future__ import annotations

import os
import sys

# benchmarks/select.py shadows the standard library's `select` when this folder is sys.path[0]:
# put the repository root there instead (as benchmarks/generate.py does).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

RUNS = {  # label: (method, reference)
    "sft on the 2B videos": ("sft", "disabled_adapter"),
    "flow_dpo, reference = LoRA off": ("flow_dpo", "disabled_adapter"),
    "flow_dpo, reference = frozen copy": ("flow_dpo", "frozen_copy"),
}
SFT, DPO, FROZEN = RUNS
BLOCK = 5  # timed steps per call: short enough that load changes hit every configuration alike
MEMORY_STEPS = 2  # measured steps after the first: every step reaches the same peak
MMAP_THRESHOLD = 65536  # bytes; fixed (so not adaptive) and below glibc's 128 KiB default
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# 1. Peak memory of a block


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"benchmarks/finetune.py: /proc/self/status has no {key}; the CPU memory measurement needs Linux")


class PeakMemory:
    """Peak memory of a block above what was in use when it started, in bytes; `how` names the method."""

    def __init__(self, device):
        import torch

        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"
        self.how = (
            "torch.cuda.max_memory_allocated - memory_allocated before training"
            if self.cuda
            else f"VmHWM (reset via /proc/self/clear_refs) - VmRSS before training, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
        )

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
            return
        # free heap pages would be reused unseen: give them back first (glibc only)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.how += ", after malloc_trim(0)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux ≥ 4.0: set the peak resident set to the current one
        except OSError as err:
            raise RuntimeError(
                f"benchmarks/finetune.py: cannot reset the peak RSS through /proc/self/clear_refs ({err}); "
                "the CPU memory measurement needs Linux, or run on CUDA"
            ) from err
        self.base = _proc_status_bytes("VmRSS")

    def peak_increase(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.max_memory_allocated(self.device) - self.base
        return _proc_status_bytes("VmHWM") - self.base


# ---------------------------------------------------------------------------------------------
# 2. The child processes: time (all configurations, interleaved) or memory (one configuration)


def _setup(spec: dict):
    """(policy, train(label, steps, on_step) -> info): the loaded policy and the fixed batch per configuration."""
    import torch

    from models.policy import Policy, PolicyConfig
    from models.preference_training import PreferenceData, PreferenceTrainConfig, train_preference

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    policy = Policy.from_pretrained(
        PolicyConfig(
            family="wan", transformer=spec["transformer"], text_encoder=spec["text_encoder"], device=spec["device"],
            frames=spec["frames"], height=spec["size"], width=spec["size"],
        )
    )
    b, prompts = spec["batch"], spec["prompts"]
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = (torch.rand((b, *policy.latent_shape), generator=gen) * 2 - 1 for _ in range(2))
    pairs = PreferenceData(prompts, chosen=chosen, rejected=rejected)
    videos = PreferenceData(prompts * 2, chosen=torch.cat([chosen, rejected]))

    def train(label: str, steps: int, on_step=None) -> dict:
        method, reference = RUNS[label]
        cfg = PreferenceTrainConfig(
            method=method, reference=reference, batch_size=2 * b if method == "sft" else b, steps=steps, warmup_steps=0
        )
        info = train_preference(policy, videos if method == "sft" else pairs, cfg, on_step=on_step)
        if info["stopped_on_nonfinite"]:
            raise RuntimeError(f"benchmarks/finetune.py: {label}: training stopped: {info['stopped_on_nonfinite']}")
        return info

    return policy, train


def time_child(spec: dict) -> dict:
    """Seconds of each timed step per configuration, the configurations interleaved in blocks of `BLOCK`."""
    import torch

    policy, train = _setup(spec)
    cuda = policy.device.type == "cuda"
    for label in RUNS:
        train(label, spec["warmup"])
    seconds: dict[str, list[float]] = {label: [] for label in RUNS}
    while len(seconds[SFT]) < spec["steps"]:
        block = min(BLOCK, spec["steps"] - len(seconds[SFT]))
        for label in RUNS:
            stamps: list[float] = []

            def on_step(_record: dict, stamps=stamps) -> None:
                if cuda:
                    torch.cuda.synchronize(policy.device)
                stamps.append(time.perf_counter())

            train(label, 1 + block, on_step)
            seconds[label] += [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    return {"seconds": seconds, "threads": torch.get_num_threads(), "device": str(policy.device)}


def memory_child(spec: dict) -> dict:
    """Peak memory of 1 + `MEMORY_STEPS` steps of one configuration after warm-up, and the sizes it is read against."""
    policy, train = _setup(spec)
    train(spec["label"], spec["warmup"])
    memory = PeakMemory(policy.device)
    memory.start()
    train(spec["label"], 1 + MEMORY_STEPS)
    peak = memory.peak_increase()
    lora = policy.lora_parameters()
    lora_ids = {id(p) for p in lora}
    base = [p for p in policy.transformer.parameters() if id(p) not in lora_ids]
    return {
        "peak_bytes": peak,
        "before_bytes": memory.base,
        "how": memory.how,
        "base_params": sum(p.numel() for p in base),
        "base_bytes": sum(p.numel() * p.element_size() for p in base)
        + sum(x.numel() * x.element_size() for x in policy.transformer.buffers()),
        "lora_params": sum(p.numel() for p in lora),
        "lora_bytes": sum(p.numel() * p.element_size() for p in lora),
        "dtype": str(policy.dtype).removeprefix("torch."),
        "latent_shape": list(policy.latent_shape),
    }


def run_child(spec: dict, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        env=dict(os.environ, **(env or {})), capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks/finetune.py: the {spec['mode']} process failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# 3. The comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="B pairs: B chosen + B rejected videos")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration before measuring")
    parser.add_argument("--size", type=int, default=16, help="frame height and width in px (the world's 16)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video (the world's 8)")
    parser.add_argument("--dim", type=int, default=128, help="transformer width (the world base policy's 128)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (the world base policy's 4)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1: steadier on cores shared with other jobs (2 threads ran 2x slower at load 5); 0: torch's default",
    )
    parser.add_argument("--device", default="auto", help="auto: CUDA when available, else CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(time_child(spec) if spec["mode"] == "time" else memory_child(spec)))
        return
    if args.batch < 1 or args.steps < 1 or args.warmup < 1 or args.threads < 0:
        parser.error("--batch, --steps and --warmup must be ≥ 1, --threads ≥ 0")

    import numpy as np

    from models.physics_world import WorldSpec, make_clip
    from models.policy import build_tiny
    from models.text_encoder import build_text_encoder

    tmp = Path(tempfile.mkdtemp(prefix="prefloop-bench-finetune-"))
    try:
        # 1. world captions, the text encoder and the transformer on disk, as bootstrap writes them
        rng = np.random.default_rng(0)
        captions = list(dict.fromkeys(make_clip(rng, WorldSpec()).caption for _ in range(400)))
        text = build_text_encoder(captions, tmp / "text_encoder")
        build_tiny(
            "wan", tmp / "transformer", text_dim=text.hidden_size, text_len=text.max_length,
            frames=args.frames, height=args.size, width=args.size, layers=args.layers, dim=args.dim,
        )
        spec = {
            "transformer": str(tmp / "transformer"), "text_encoder": str(tmp / "text_encoder"),
            "device": args.device, "size": args.size, "frames": args.frames, "batch": args.batch,
            "prompts": [captions[i % len(captions)] for i in range(args.batch)],
            "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
        }

        # 2. time in one process, memory in a fresh process per configuration
        t0 = time.perf_counter()
        timing = run_child({**spec, "mode": "time"})
        median = {label: statistics.median(s) for label, s in timing["seconds"].items()}
        memory = {
            label: run_child({**spec, "mode": "memory", "label": label}, {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
            for label in RUNS
        }
        wall = time.perf_counter() - t0

        # 3. report
        m = memory[SFT]
        c, f, h, w = m["latent_shape"]
        print(
            f"model: WanTransformer3DModel, patch (1, 4, 4), {args.layers} layers, width {args.dim}: "
            f"{m['base_params']:,} parameters = {m['base_bytes'] / MiB:.2f} MiB ({m['dtype']}, {timing['device']}, "
            f"{timing['threads']} threads); LoRA r16 on q/k/v/o: {m['lora_params']:,} parameters = "
            f"{m['lora_bytes'] / MiB:.2f} MiB"
        )
        print(
            f"batch: {args.batch} pairs = {2 * args.batch} videos of {c}x{f}x{h}x{w}, the same latents and prompts "
            f"in every run; {args.warmup} warm-up steps, {args.steps} timed steps per configuration, interleaved"
        )
        print(f"peak memory: {m['how']}; one fresh process per configuration")
        print(f"{'':34s} {'ms/step':>8s} {'quartiles':>15s} {'peak MiB':>9s} {'resident before':>16s}")
        for label in RUNS:
            s = timing["seconds"][label]
            q1, _, q3 = statistics.quantiles(s, n=4) if len(s) > 1 else (s[0], s[0], s[0])
            r = memory[label]
            print(
                f"{label:34s} {median[label] * 1e3:8.1f} {f'{q1 * 1e3:.1f}-{q3 * 1e3:.1f}':>15s} "
                f"{r['peak_bytes'] / MiB:9.2f} {r['before_bytes'] / MiB:12.1f} MiB"
            )
        extra = memory[FROZEN]["peak_bytes"] - memory[DPO]["peak_bytes"]
        print(
            f"frozen copy vs LoRA off: memory x{memory[FROZEN]['peak_bytes'] / memory[DPO]['peak_bytes']:.2f} "
            f"(+{extra / MiB:.2f} MiB; the copied parameters are {(m['base_bytes'] + m['lora_bytes']) / MiB:.2f} MiB), "
            f"time x{median[FROZEN] / median[DPO]:.2f}; all processes took {wall:.0f} s"
        )
        print(f"time ratio dpo/sft: {median[DPO] / median[SFT]:.2f}")
        print(f"memory ratio dpo/sft: {memory[DPO]['peak_bytes'] / memory[SFT]['peak_bytes']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
