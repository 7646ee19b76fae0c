"""`evaluate`: the round's policy against the base (and the previous round's) on held-out prompts.

IPO gates each round on a held-out evaluation by a judge that was not trained on (ALGORITHMS.md
§8). Inputs: `videos` (prompts), `policy` (the round's finetune checkpoints), `baseline` (the base
policy: bootstrap's checkpoints; without it, the base row of `policy`), optionally `previous` (the
previous round's finetune checkpoints) and `reward_model` (train_reward's checkpoints).

Every policy samples the SAME (prompt, seed) pairs, so the comparison is paired: the same noise,
the same prompt, only the weights differ. Prompts are the held-out captions of the `videos`
manifest (no stage that learns ever sees them) or a prompt file; pair j takes prompt j mod P and
its k = j div P-th seed, from a hash that does not involve the round, so every round faces the
same pairs and a policy evaluated twice gives the same numbers.

Each sample is written as an mp4 and judged as decoded from it, as the critics saw the training
samples (`label` decodes `generate`'s mp4s), so a row's verdict is what the file shows:
- the physics judge (embedded world; on by default): plausibility and caption agreement, each
  with a Wilson 95 % interval (256 pairs: about ±5 points at the world's 10–30 % rates);
- VBench-like metrics (`models/video_metrics.py`): subject consistency, motion smoothness,
  dynamic degree, an imaging-quality proxy;
- a reward model (when a `reward_model` input is given): mean z-normalised rewards per policy and
  VideoAlign's win rates of the round's policy against the base and the previous policy on each
  pair (win r_round > r_other, a tie counts half; Wilson 95 % interval), per dimension and overall.

Reward hacking — the reward model prefers the new policy while the judge, which nothing was
optimised against, sees it get worse — raises `reward_hacking_warning`. `gate` turns this round's
numbers (and the previous round's) into keep or stop for the pipeline.

The `evaluation` manifest holds one row per policy role × pair (`eval_id` = role-prompt_id-k); the
aggregates, intervals, win rates and the warning are the stage's metrics (stage.json, the UI).
A policy that two roles share (round 1's previous policy is the base; a round whose finetune
changed nothing) is sampled once and its rows point at the same files. With a
`previous_evaluation` input (the pipeline passes round k-1's from round 2 on), a policy that
evaluation already sampled on the same pairs with the same sampling settings (the base, the
previous round's policy) is not sampled again: its rows reuse those files, verdicts and metrics,
and only the rewards are rescored with this round's reward model. Sampling runs in this
process: the world's 3 × 256 tiny samples take about a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, read_manifest, write_manifest
from models.policy import PolicyConfig
from models.policy_training import frame_strip_png, wilson_interval
from models.reward_guidance import RewardGuidance, RewardGuidanceConfig
from models.video_metrics import METRICS, VideoMetricsConfig, video_metrics
from tasks.common import StageConfig, StageResult
from tasks.generate import load_sampler, policy_fps, policy_from_checkpoints, prompt_id, sample_seed, select_prompts
from tasks.label import load_reward_scorer

ROLES = ("round", "base", "previous")
REWARD_DIMS = ("vq", "mq", "ta")
WIN_DIMS = (*REWARD_DIMS, "overall")
EVAL_SEED_ROUND = 0  # `generate` rounds start at 1: evaluation never draws a training seed


class EvaluateConfig(StageConfig):
    prompt_file: str | None = Field(
        None, description="a UTF-8 text file, one prompt per line; replaces the held-out captions of `videos`"
    )
    max_prompts: int | None = Field(None, ge=1, description="first N distinct prompts in sorted order (None: all)")
    samples: int = Field(
        256, ge=1, description="(prompt, seed) pairs per policy, prompts taken in turn: 256 give a Wilson 95 % interval "
        "of about ±5 points at the world's 10–30 % plausibility (±6 at 50 %)",
    )
    seed: int = Field(0, description="base of every pair's seed; the same pairs for every policy and every round")
    steps: int | None = Field(None, ge=1, description="Euler steps; None: each policy's own default")
    guidance: float | None = Field(None, ge=1.0, description="CFG scale; None: each policy's own default")
    batch_size: int = Field(32, ge=1, description="samples per sampling call")
    judge: bool = Field(
        True, description="ask the physics judge (embedded world's square clips only): plausibility and caption "
        "agreement, the numbers the gate decides on",
    )
    win_rates: bool = Field(
        True, description="score every sample with the `reward_model` input: mean rewards and win rates (off: the "
        "input is not needed)",
    )
    hack_margin: float = Field(
        0.05, ge=0, le=0.5, description="warn of reward hacking when the reward model's win rate against the previous "
        "policy exceeds 0.5 by more than this while the judge's plausibility falls below the previous policy's "
        "interval; 0.05 is below the ±6 points of 256 pairs, so it warns early and the judge's fall confirms",
    )
    hack_dimension: Literal["vq", "mq", "ta", "overall"] = Field(
        "overall", description="the reward the warning watches: overall = the mean of the z-normalised dimensions, "
        "what `label` ranks samples by",
    )
    gate_margin: float = Field(
        0.0, ge=0, description="the gate keeps a policy whose plausibility beats the previous policy's (round 1: the "
        "base's) by more than this; 0: any gain, as IPO keeps a round that helps",
    )
    strip_pairs: int = Field(6, ge=0, description="pairs drawn in the frame strip (rows alternate base and round)")
    metrics: VideoMetricsConfig = Field(
        default_factory=VideoMetricsConfig, description="working sizes and thresholds of the VBench-like metrics"
    )
    reward_guidance: RewardGuidanceConfig = Field(
        default_factory=RewardGuidanceConfig,
        description="Flow-NRG guidance for every policy's samples (scale 0: off); reward_model None: the `reward_model` input",
    )


# ---------------------------------------------------------------------------------------------
# 1. The pure core: pairs, rates, the warning and the gate


def plan_pairs(prompts: Sequence[str], samples: int, seed: int) -> list[dict[str, Any]]:
    """`samples` (prompt, seed) pairs: prompt j mod P, its (j div P)-th seed; independent of the round."""
    if not prompts:
        raise ValueError("evaluate: no prompts to sample; give held-out captions or evaluate.prompt_file")
    pairs = []
    for j in range(samples):
        prompt, k = prompts[j % len(prompts)], j // len(prompts)
        pairs.append({"prompt": prompt, "prompt_id": prompt_id(prompt), "sample_index": k,
                      "seed": sample_seed(seed, EVAL_SEED_ROUND, prompt, k)})
    return pairs


def rate(flags: Sequence[bool]) -> tuple[float, float, float]:
    """(share of True, Wilson 95 % low, high)."""
    n, hits = len(flags), int(sum(bool(f) for f in flags))
    low, high = wilson_interval(hits, n)
    return (hits / n if n else float("nan")), low, high


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> tuple[float, float, float]:
    """VideoAlign's win rate of `ours` over `theirs` on paired samples: wins + ½ ties over pairs, with a
    Wilson 95 % interval on that share; pairs where either reward is not finite are left out."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate: {a.shape} rewards against {b.shape}; score the same pairs for both policies")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if not len(a):
        return float("nan"), 0.0, 1.0
    score = float((a > b).sum()) + 0.5 * float((a == b).sum())
    low, high = wilson_interval(score, len(a))  # a fractional count of successes: ties are half a win
    return score / len(a), low, high


def reward_hacking(win_rate_vs_previous: float, plausibility: float, previous_ci_low: float, margin: float) -> bool:
    """The reward model prefers the new policy (win rate > 0.5 + margin against the previous one)
    while the judge's plausibility falls by more than its interval (below the previous policy's
    Wilson low end): the policy learnt what the reward model likes, not what the world allows."""
    values = (win_rate_vs_previous, plausibility, previous_ci_low)
    if not all(math.isfinite(v) for v in values):
        return False
    return win_rate_vs_previous > 0.5 + margin and plausibility < previous_ci_low


def policy_changed(rows: Sequence[Mapping[str, Any]], round_: int) -> bool:
    """Whether a finetune `checkpoints` manifest holds a LoRA of this round (finetune with nothing to
    learn from passes the previous checkpoints through unchanged)."""
    return any(r["kind"] == "policy_lora" and r["round"] == round_ for r in rows)


def gate(current: Mapping[str, float], previous: Mapping[str, float] | None, margin: float) -> tuple[bool, str]:
    """Keep the round's policy, or stop the loop, from `evaluate`'s metrics.

    `current`: this round's metrics; `previous`: the previous round's (None in round 1). The round's
    judge plausibility must beat the previous round's policy (from `previous`, else this round's own
    `plausibility_previous`, else the base's) by more than `margin`. A round whose finetune left the
    policy unchanged (`policy_changed` 0) stops: another round would sample the same policy again.
    """
    if current.get("policy_changed", 1.0) == 0.0:
        return False, "no change, stop: finetune left the policy unchanged (no LoRA of this round)"
    if "plausibility_round" not in current:
        raise ValueError("gate: no `plausibility_round` in the evaluation metrics; run evaluate with evaluate.judge=true")
    if previous is not None and "plausibility_round" in previous:
        reference, name = previous["plausibility_round"], "the previous round's policy"
    elif "plausibility_previous" in current:
        reference, name = current["plausibility_previous"], "the previous policy"
    else:
        reference, name = current["plausibility_base"], "the base policy"
    ours = current["plausibility_round"]
    gain = ours - reference
    verdict = f"plausibility {ours:.3f} vs {reference:.3f} of {name} ({gain:+.3f}, margin {margin:.3f})"
    if gain > margin:
        return True, f"keep: {verdict}"
    return False, f"stop: {verdict}"


def summarise(rows: Sequence[Mapping[str, Any]], roles: Sequence[str]) -> dict[str, float]:
    """Per role: judge rates with intervals, metric means and mean rewards; win rates of `round`
    against `base` and `previous`; from the manifest's rows (pairs in the same order per role)."""
    by_role = {role: [r for r in rows if r["eval_id"].startswith(f"{role}-")] for role in roles}
    out: dict[str, float] = {}
    rewards: dict[str, np.ndarray] = {}
    for role, group in by_role.items():
        for key in ("plausible", "caption_agreement"):
            flags = [r[key] for r in group if r[key] is not None]
            if flags:
                name = "plausibility" if key == "plausible" else key
                out[f"{name}_{role}"], out[f"{name}_{role}_ci_low"], out[f"{name}_{role}_ci_high"] = rate(flags)
        for metric in METRICS:
            values = [r[metric] for r in group if r[metric] is not None]
            if values:
                out[f"{metric}_{role}"] = float(np.mean(values))
        if group and all(r["reward_vq"] is not None for r in group):
            per_dim = np.array([[r[f"reward_{d}"] for d in REWARD_DIMS] for r in group], dtype=np.float64)
            rewards[role] = np.concatenate([per_dim, per_dim.mean(1, keepdims=True)], axis=1)
            for i, d in enumerate(WIN_DIMS):
                out[f"reward_{d}_{role}"] = float(rewards[role][:, i].mean())
    for other in ("base", "previous"):
        if "round" in rewards and other in rewards:
            for i, d in enumerate(WIN_DIMS):
                wr, low, high = win_rate(rewards["round"][:, i], rewards[other][:, i])
                out[f"win_rate_{d}_vs_{other}"] = wr
                out[f"win_rate_{d}_vs_{other}_ci_low"], out[f"win_rate_{d}_vs_{other}_ci_high"] = low, high
    return out


def hacking_warning(metrics: Mapping[str, float], roles: Sequence[str], cfg: EvaluateConfig) -> float | None:
    """1.0 / 0.0 for the reward-hacking rule against the previous policy (without one: the base), or
    None when the metrics cannot decide it (no reward model or no judge)."""
    other = "previous" if "previous" in roles else "base"
    keys = (f"win_rate_{cfg.hack_dimension}_vs_{other}", "plausibility_round", f"plausibility_{other}_ci_low")
    if not all(k in metrics for k in keys):
        return None
    return float(reward_hacking(*(metrics[k] for k in keys), cfg.hack_margin))


# ---------------------------------------------------------------------------------------------
# 2. The edge


@dataclass(frozen=True)
class PolicyUnderTest:
    role: str
    policy_cfg: PolicyConfig
    lora: str | None
    policy_id: str

    @property
    def key(self) -> str:
        """Two roles with the same key are the same weights: sampled once."""
        return f"{self.policy_cfg.model_dump_json()}|{self.lora}"


def policies_under_test(inputs: Mapping[str, ManifestRef], layout: RunLayout) -> list[PolicyUnderTest]:
    """round (`policy`), base (`baseline`; without it, the `policy` row of the round's checkpoints with
    no LoRA) and, when given, previous (`previous`), from their checkpoints manifests."""
    if "policy" not in inputs:
        raise ValueError("evaluate: no `policy` input; pass the round's finetune checkpoints manifest")
    names = {"round": "policy", "base": "baseline", "previous": "previous"}
    out = []
    for role in ROLES:
        if names[role] in inputs:
            where = inputs[names[role]].path
            rows = read_manifest(where, "checkpoints", layout).rows()
            out.append(PolicyUnderTest(role, *policy_from_checkpoints(rows, layout, where)))
        elif role == "base":
            where = inputs["policy"].path
            rows = [r for r in read_manifest(where, "checkpoints", layout).rows() if r["kind"] == "policy"]
            out.append(PolicyUnderTest(role, *policy_from_checkpoints(rows, layout, where)))
    return out


def reward_folder(inputs: Mapping[str, ManifestRef], cfg: EvaluateConfig, layout: RunLayout) -> str | None:
    """The `reward_model` checkpoint folder, or None when win rates are off."""
    if not cfg.win_rates:
        return None
    if "reward_model" not in inputs:
        raise ValueError(
            "evaluate.win_rates is on but there is no `reward_model` input; pass train_reward's checkpoints manifest, "
            "or set evaluate.win_rates=false"
        )
    where = inputs["reward_model"].path
    rows = [r for r in read_manifest(where, "checkpoints", layout).rows() if r["kind"] == "reward_model"]
    if len(rows) != 1:
        raise ValueError(f"`{where}`: expected one `reward_model` row, found {len(rows)}; pass train_reward's checkpoints manifest")
    return str(layout.resolve(rows[0]["path"]))


def guidance_reward_folder(inputs: Mapping[str, ManifestRef], cfg: EvaluateConfig, layout: RunLayout) -> str | None:
    """The reward model that guides sampling: `reward_guidance.reward_model`, else the `reward_model` input."""
    if not cfg.reward_guidance.enabled or cfg.reward_guidance.reward_model is not None:
        return cfg.reward_guidance.reward_model
    if "reward_model" not in inputs:
        raise ValueError(
            "evaluate.reward_guidance.scale > 0 but there is no reward model: set evaluate.reward_guidance.reward_model "
            "or pass train_reward's checkpoints as the `reward_model` input"
        )
    return reward_folder(inputs, cfg.model_copy(update={"win_rates": True}), layout)


REUSE_SETTINGS = ("steps", "guidance", "judge", "metrics", "reward_guidance")  # what decides a sample and its stored verdicts


def reusable_rows(
    previous: Sequence[Mapping[str, Any]], previous_cfg: Mapping[str, Any] | None, policy_id: str,
    pairs: Sequence[Mapping[str, Any]], cfg: EvaluateConfig,
) -> list[Mapping[str, Any]] | None:
    """The previous evaluation's rows of `policy_id` for exactly these (prompt, seed) pairs, in pair
    order, when it sampled with the same settings; None when anything differs (then sample anew)."""
    here = cfg.model_dump(mode="json")
    # a setting the previous evaluation's config predates (reward_guidance) had its default then
    defaults = EvaluateConfig().model_dump(mode="json")
    if previous_cfg is None or any(previous_cfg.get(k, defaults[k]) != here[k] for k in REUSE_SETTINGS):
        return None
    by_pair = {(r["prompt"], r["seed"]): r for r in previous if r["policy_id"] == policy_id}
    rows = [by_pair.get((p["prompt"], p["seed"])) for p in pairs]
    return None if any(r is None for r in rows) else rows


def rescore_reused(
    rows: Sequence[Mapping[str, Any]], layout: RunLayout, scorer: Callable | None, fps: float, batch_size: int,
    keep_frames: int,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """`sample_and_score`'s results from reused rows: the same files and verdicts, this round's rewards."""
    from tasks.video_io import read_video

    results, kept = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        frames = None
        if scorer is not None or start < keep_frames:
            frames = np.stack([read_video(layout.resolve(r["video_path"])) for r in batch])
        rewards = None
        if scorer is not None:
            rewards = np.asarray(scorer(frames, [r["prompt"] for r in batch], fps), dtype=np.float64)
        for i, r in enumerate(batch):
            results.append({
                "video_path": layout.resolve(r["video_path"]),
                "plausible": r["plausible"], "caption_agreement": r["caption_agreement"],
                **{f"reward_{d}": None if rewards is None else float(rewards[i, j]) for j, d in enumerate(REWARD_DIMS)},
                **{m: r[m] for m in METRICS},
            })
            if start + i < keep_frames:
                kept.append(frames[i])
    return results, kept


def sample_and_score(
    policy: PolicyUnderTest,
    pairs: Sequence[Mapping[str, Any]],
    cfg: EvaluateConfig,
    videos_dir: Path,
    judge: Any,
    scorer: Callable[[np.ndarray, Sequence[str], float], np.ndarray] | None,
    keep_frames: int,
    tick: Callable[[], None],
    guidance_folder: str | None = None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Sample every pair (with reward guidance when `cfg.reward_guidance` is on), write its mp4, and
    judge, measure and score it as decoded from the file.

    Returns one result per pair (path, verdicts, rewards, metrics) and the decoded frames of the
    first `keep_frames` pairs (for the strip)."""
    from tasks.video_io import read_video, write_video

    sampler = load_sampler(policy.policy_cfg, policy.lora, fold=True)
    fps = policy_fps(policy.policy_cfg)
    steer = None
    if cfg.reward_guidance.enabled:
        steer = RewardGuidance.from_reward_model(cfg.reward_guidance, guidance_folder, fps, str(sampler.device))
    results, kept = [], []
    for start in range(0, len(pairs), cfg.batch_size):
        batch = pairs[start : start + cfg.batch_size]
        # 1. sample, write, decode: every number below is about the file the manifest points at
        videos = sampler.sample(
            [p["prompt"] for p in batch], [p["seed"] for p in batch], cfg.steps, cfg.guidance, reward_guidance=steer
        )
        paths = [videos_dir / policy.role / f"{p['prompt_id']}-{p['sample_index']:03d}.mp4" for p in batch]
        decoded = []
        for path, video in zip(paths, videos, strict=True):
            write_video(path, video, fps)
            decoded.append(read_video(path))
        frames = np.stack(decoded)
        # 2. judge, metrics, rewards
        metrics = video_metrics(frames, cfg.metrics)
        rewards = None
        if scorer is not None:
            rewards = np.asarray(scorer(frames, [p["prompt"] for p in batch], fps), dtype=np.float64)
            if rewards.shape != (len(batch), len(REWARD_DIMS)):
                raise ValueError(f"reward scorer returned shape {rewards.shape} for {len(batch)} videos; expected ({len(batch)}, 3)")
        for i, (pair, path) in enumerate(zip(batch, paths, strict=True)):
            verdict = judge.judge(frames[i], pair["prompt"]) if judge is not None else None
            results.append({
                "video_path": path,
                "plausible": None if verdict is None else bool(verdict.plausible),
                "caption_agreement": None if verdict is None else bool(verdict.caption_agreement),
                **{f"reward_{d}": None if rewards is None else float(rewards[i, j]) for j, d in enumerate(REWARD_DIMS)},
                **{m: float(metrics[m][i]) if math.isfinite(metrics[m][i]) else None for m in METRICS},
            })
            if start + i < keep_frames:
                kept.append(frames[i])
        tick()
    return results, kept


def build_judge(policy_cfg: PolicyConfig) -> Any:
    from models.physics_judge import PhysicsJudge
    from models.physics_world import WorldSpec

    if policy_cfg.height != policy_cfg.width:
        raise ValueError(
            f"evaluate.judge=true: the physics judge reads the embedded world's square clips, the policy makes "
            f"{policy_cfg.width}x{policy_cfg.height}; set evaluate.judge=false for other policies"
        )
    return PhysicsJudge(WorldSpec(size=policy_cfg.height, frames=policy_cfg.frames))


def run(
    inputs: Mapping[str, ManifestRef],
    cfg: EvaluateConfig,
    layout: RunLayout,
    out: StageDir,
    lineage: Lineage,
    *,
    round: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> StageResult:
    """Held-out prompts × the round's, the base and the previous policy → the `evaluation` manifest,
    its summary metrics (judge, VBench-like, reward-model win rates, the hacking warning) and a strip."""
    # 1. prompts, pairs, policies, critics
    prompts = select_prompts(inputs, "heldout", cfg.prompt_file, cfg.max_prompts, layout, "evaluate")
    pairs = plan_pairs(prompts, cfg.samples, cfg.seed)
    policies = policies_under_test(inputs, layout)
    folder = reward_folder(inputs, cfg, layout)
    changed = policy_changed(read_manifest(inputs["policy"].path, "checkpoints", layout).rows(), round)
    scorer = load_reward_scorer(folder) if folder is not None else None
    guidance_folder = guidance_reward_folder(inputs, cfg, layout)
    # 2. sample each distinct policy once (the first role that has it names its files)
    videos_dir = out.files("videos")
    unique: dict[str, PolicyUnderTest] = {}
    for policy in policies:
        unique.setdefault(policy.key, policy)
    total, done = len(unique) * math.ceil(len(pairs) / cfg.batch_size), [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    keep = cfg.strip_pairs
    previous, previous_cfg = [], None
    if "previous_evaluation" in inputs:
        previous = read_manifest(inputs["previous_evaluation"].path, "evaluation", layout).rows()
        marker = layout.resolve(inputs["previous_evaluation"].path).parent / "stage.json"
        previous_cfg = json.loads(marker.read_text()).get("config") if marker.exists() else None
    results: dict[str, tuple[list[dict], list[np.ndarray]]] = {}
    reused, t0 = 0, time.perf_counter()
    for key, policy in unique.items():
        old = reusable_rows(previous, previous_cfg, policy.policy_id, pairs, cfg)
        if old is not None:
            fps = policy_fps(policy.policy_cfg)
            results[key] = rescore_reused(old, layout, scorer, fps, cfg.batch_size, keep)
            reused += 1
            for _ in range(math.ceil(len(pairs) / cfg.batch_size)):
                tick()
            continue
        judge = build_judge(policy.policy_cfg) if cfg.judge else None
        results[key] = sample_and_score(policy, pairs, cfg, videos_dir, judge, scorer, keep, tick, guidance_folder)
    compute = time.perf_counter() - t0  # sampling, judging, metrics, rewards (and their mp4 round trips)
    # 3. the manifest: one row per role and pair, in pair order
    rows = []
    for policy in policies:
        for pair, res in zip(pairs, results[policy.key][0], strict=True):
            rows.append({
                "eval_id": f"{policy.role}-{pair['prompt_id']}-{pair['sample_index']:03d}", "round": round,
                "policy_id": policy.policy_id, "prompt_id": pair["prompt_id"], "prompt": pair["prompt"],
                "seed": pair["seed"], **res, "video_path": layout.stored_path(res["video_path"]),
            })
    ref = write_manifest(rows, "evaluation", out.manifest_path, layout, lineage)
    # 4. numbers and the strip
    roles = [p.role for p in policies]
    metrics = summarise(rows, roles)
    metrics["policy_changed"] = float(changed)
    metrics["compute_s"] = compute
    warning = hacking_warning(metrics, roles, cfg)
    metrics["reward_hacking_warning"] = 0.0 if warning is None else warning
    counts = {"pairs": len(pairs), "prompts": len({p["prompt_id"] for p in pairs}), "policies": len(policies),
              "policies_sampled": len(unique) - reused, "policies_reused": reused, "reward_hacking_checked": int(warning is not None)}
    images = {}
    by_role = {p.role: p for p in policies}
    if keep:
        base_frames, round_frames = results[by_role["base"].key][1], results[by_role["round"].key][1]
        strip = [clip for pair in zip(base_frames, round_frames, strict=True) for clip in pair]
        path = frame_strip_png(strip, out.files("figures") / "base_vs_round.png")
        images["base (rows 1, 3, …) vs. round (rows 2, 4, …): same prompts and seeds"] = str(path)
    return StageResult(ref, counts=counts, metrics=metrics, images=images)
