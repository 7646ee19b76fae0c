"""`select`: PhysHPO's "good data" — a large, messy `videos` manifest in, a `selection` out.

Every input row stays in the output with all its scores, pass/fail per filter, the first failing
reason, a final score and `selected`. Scoring is kept apart from deciding (as Data-Juicer keeps
stats apart from decisions): scores are cached per scoring key (input hashes + the parts of the
config that change a score), so changing only a threshold re-decides from the stored scores
without decoding a video again.

Scoring runs on Ray Data: decode-and-score as CPU tasks (`map_batches` with a function, at most
`workers` at a time, threads pinned per worker), open_clip frame–caption similarity on an actor
pool (one model per actor, `num_gpus` per actor from `infra/resources.py`). A file that fails
to decode fails its row (reason `decode_failed`), never the stage.

Filters, in the order a reason is given:
1. the `videos` reason (unreadable, caption-less, …);
2. metadata bounds (`too_short`, …);
3. frame filters (`static`, `scene_cut`, `flicker`, `blurry`, `low_motion`, `low_quality`);
4. text–video similarity (`low_text_similarity`);
5. physics (`implausible`): the judge in the embedded world, a VLM for real footage
   (`physics_unreadable` when its answer cannot be read — never a guess);
6. caption agreement by the physics judge (`caption_disagrees`);
7. greedy diversity on caption embeddings (`near_duplicate`, PhysHPO τ = 0.9);
8. top-k (`below_top_k`).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from data_contracts import Lineage, ManifestRef, RunLayout, StageDir, config_hash, read_manifest, write_manifest
from data_contracts.lineage import atomic_write_bytes
from infra.ray_cluster import current_node_id
from tasks.common import StageConfig, StageResult
from tasks.select_scores import (
    MetadataLimits,
    ScoreConfig,
    ScoreThresholds,
    decide,
    greedy_diverse,
    metadata_ok,
    score_clip,
)

# The scores' `error` of a clip too large to decode within `select.scoring.max_decode_mib`.
TOO_LARGE = "too_large"
SCORE_COLUMNS = ("motion", "static", "scene_cut", "flicker", "sharpness", "quality", "clip", "physics", "caption")


# --- 1. config -------------------------------------------------------------------------------


class TextSimilarity(BaseModel):
    """Which open_clip model scores frame–caption similarity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        "world",
        description="`world`: the tiny open_clip model that bootstrap trains; an open_clip architecture (e.g. ViT-B-32); "
        "or `none` (no text similarity)",
    )
    pretrained: str | None = Field(None, description="open_clip pretrained tag or local path; required unless model is `world`")
    device: str = Field("auto", description="`auto` (CUDA when the actor has a GPU), `cpu` or `cuda`")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="float32 on CPU; bfloat16 on GPUs")


class SelectConfig(StageConfig):
    limits: MetadataLimits = Field(default_factory=MetadataLimits, description="metadata bounds (decision)")
    scoring: ScoreConfig = Field(default_factory=ScoreConfig, description="how frame scores are computed")
    thresholds: ScoreThresholds = Field(default_factory=ScoreThresholds, description="frame-filter thresholds (decision)")
    text: TextSimilarity = Field(default_factory=TextSimilarity, description="the open_clip model of text–video similarity")
    min_text_similarity: float | None = Field(
        None,
        description="least open_clip cosine of a clip with its caption; None: scored, not thresholded. Off by default: "
        "the world's CLIP scores the clips it was trained on, where wrong captions are partly memorised (a fixed "
        "cutoff of 0.3 caught 20% of them), and the judge checks the world's captions; set it for a real model",
    )
    physics: Literal["judge", "vlm", "none"] = Field(
        "judge",
        description="physical-plausibility scorer: the physics judge (embedded world), a VLM through transformers "
        "(real footage; `select.vlm_model`), or none",
    )
    vlm_model: str | None = Field(
        None, description="VLM for `physics: vlm`: a hub id (Qwen/Qwen2-VL-2B-Instruct) or a local folder"
    )
    min_physics: float = Field(0.5, ge=0, le=1, description="least physics score; the judge gives 1 (plausible) or 0")
    require_caption_agreement: bool = Field(
        True, description="drop clips whose caption the physics scorer finds wrong (colour, motion, direction)"
    )
    diversity_tau: float | None = Field(
        None,
        gt=0,
        le=1,
        description="greedy diversity on caption embeddings, cosine threshold (PhysHPO: 0.9). Off by default: the "
        "embedded world has ~60 distinct captions, and deduplicating them would keep one clip per caption",
    )
    top_k: int | None = Field(None, ge=1, description="keep at most the k best-scoring passing clips (None: all)")
    workers: int = Field(2, ge=1, description="decode-and-score tasks running at once (one core each)")
    clip_actors: int = Field(1, ge=1, description="open_clip actors (one model each)")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per open_clip actor; None: the `select` row of infra/resources.py (clamped to "
        "the GPUs the Ray cluster has). 1 places one actor per GPU, so `clip_actors` = GPUs spreads them over nodes",
    )
    batch_size: int | None = Field(
        None, ge=1, description="videos per map_batches call; None: `auto_batch_size` (about 16 batches per worker, "
        "64 to 256 videos, at least one batch per worker). Ray Data costs ~tens of ms per task, so small clips go in big batches",
    )
    contact_sheet: int = Field(4, ge=0, description="selected and rejected clips shown in the contact sheet PNG")

    def scoring_hash(self) -> str:
        """The parts of the config that change a score (not a decision)."""
        return config_hash(
            {
                "scoring": self.scoring.model_dump(mode="json"),
                "text": self.text.model_dump(mode="json"),
                "physics": self.physics,
                "vlm_model": self.vlm_model,
            }
        )


# --- 2. pure core: deciding from scores ------------------------------------------------------


def decide_row(row: Mapping[str, Any], scores: Mapping[str, Any] | None, cfg: SelectConfig) -> tuple[dict[str, bool], str | None]:
    """Pass/fail per filter and the first failing reason, from the row's metadata and scores."""
    passed: dict[str, bool] = {}
    reasons: list[str] = []

    def check(name: str, ok: bool, reason: str) -> None:
        passed[name] = ok
        if not ok:
            reasons.append(reason)

    check("usable", row["reason"] is None, row["reason"] or "")
    if row["reason"] is not None:
        return passed, reasons[0]
    meta_reason = metadata_ok(row, cfg.limits)
    check("metadata", meta_reason is None, meta_reason or "")
    if scores is None or scores.get("error"):
        too_large = scores is not None and str(scores["error"]).startswith(TOO_LARGE)
        check("decoded", False, "too_large" if too_large else "decode_failed")
        return passed, reasons[0]
    frame_passed, frame_reason = decide({k: scores[k] for k in ("motion", "static", "scene_cut", "flicker", "sharpness", "quality")}, cfg.thresholds)
    passed.update(frame_passed)
    if frame_reason is not None:
        reasons.append(frame_reason)
    if cfg.min_text_similarity is not None and scores.get("clip") is not None:
        check("text_similarity", scores["clip"] >= cfg.min_text_similarity, "low_text_similarity")
    if cfg.physics != "none":
        if scores.get("physics") is None:  # a VLM answer that could not be read: never a guess
            check("physics", False, "physics_unreadable")
            return passed, reasons[0]
        check("physics", scores["physics"] >= cfg.min_physics, "implausible")
        if cfg.require_caption_agreement and scores.get("caption") is not None:
            check("caption_agreement", scores["caption"] >= 0.5, "caption_disagrees")
    return passed, (reasons[0] if reasons else None)


def declared_bytes(row: Mapping[str, Any]) -> float:
    """Memory the row's decoded RGB frames would take by what its `videos` metadata declares."""
    dims = [row.get("num_frames"), row.get("width"), row.get("height")]
    return float(np.prod([max(int(d), 1) for d in dims if d is not None])) * 3.0


def final_score(scores: Mapping[str, Any] | None) -> float | None:
    """Rank of a passing clip: imaging quality weighted by text similarity and physics."""
    if scores is None or scores.get("error"):
        return None
    text = 1.0 if scores.get("clip") is None else (1.0 + scores["clip"]) / 2.0
    physics = 1.0 if scores.get("physics") is None else scores["physics"]
    return float(scores["quality"] * text * (0.5 + 0.5 * physics))


# --- 3. the edge: scoring on Ray -------------------------------------------------------------


@dataclass(frozen=True)
class ScoringSetup:
    """Everything a Ray worker needs to score (picklable, no models inside)."""

    scoring: ScoreConfig
    physics: str
    world_size: int | None
    world_frames: int | None
    world_fps: float | None
    clip_name: str | None
    clip_pretrained: str | None
    clip_device: str
    clip_dtype: str
    vlm_model: str | None = None


def frame_scores_batch(batch: dict[str, np.ndarray], setup: ScoringSetup, keep_frames: bool = True) -> dict[str, np.ndarray]:
    """Ray Data task: decode each video once and compute its frame scores and physics verdict.

    With `keep_frames`, returns the frames the model actors need (`frames`) so they do not decode
    again; a video that fails to decode gets an `error` and empty frames.
    """
    from tasks.video_io import VideoReadError, read_video

    judge = _judge(setup) if setup.physics == "judge" else None
    out: dict[str, list] = {k: [] for k in ("video_id", "text", "fps", "frames", "error", "node_id", *SCORE_COLUMNS)}
    node_id = current_node_id()
    for vid, path, text, fps in zip(batch["video_id"], batch["path"], batch["text"], batch["fps"], strict=True):
        scores: dict[str, Any] = {k: None for k in SCORE_COLUMNS}
        frames = np.zeros((0, 1, 1, 3), np.uint8)
        error = ""
        try:
            frames = read_video(path, max_bytes=int(setup.scoring.max_decode_mib * 2**20))
            scores.update(score_clip(frames, float(fps), setup.scoring))
            if judge is not None:
                verdict = judge.judge(frames, str(text))
                scores["physics"] = float(verdict.plausible)
                scores["caption"] = float(verdict.caption_agreement)
        except VideoReadError as err:
            error = f"{TOO_LARGE}: {err}"[:500] if err.reason == TOO_LARGE else f"{type(err).__name__}: {err}"[:500]
        except Exception as err:  # a bad file fails its row, never the stage
            error = f"{type(err).__name__}: {err}"[:500]
        out["video_id"].append(vid)
        out["text"].append(text)
        out["fps"].append(float(fps))
        out["frames"].append(frames)
        out["error"].append(error)
        out["node_id"].append(node_id)
        for k in SCORE_COLUMNS:
            out[k].append(np.nan if scores[k] is None else float(scores[k]))
    result = {k: np.asarray(v) for k, v in out.items() if k != "frames"}
    if keep_frames:
        result["frames"] = _object_array(out["frames"])
    return result


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # element-wise: a slice assignment would broadcast equal shapes
        arr[i] = item
    return arr


_JUDGES: dict[tuple, Any] = {}


def _judge(setup: ScoringSetup):
    """One judge per worker process (its construction is cheap but not free)."""
    from models.physics_judge import PhysicsJudge
    from models.physics_world import WorldSpec

    key = (setup.world_size, setup.world_frames, setup.world_fps)
    if key not in _JUDGES:
        _JUDGES[key] = PhysicsJudge(WorldSpec(size=setup.world_size, frames=setup.world_frames, fps=setup.world_fps))
    return _JUDGES[key]


class ClipScorer:
    """Ray Data actor: one open_clip model, loaded once, scoring frame–caption similarity.

    The last model actor of the pipeline drops the frames (`drop_frames`): nothing after it needs
    them, and a separate operator for that cost a Ray task per batch."""

    def __init__(self, setup: ScoringSetup, drop_frames: bool = False):
        from models.clip_model import load_clip

        self.clip = load_clip(setup.clip_name, setup.clip_pretrained, device=setup.clip_device, dtype=setup.clip_dtype)
        self.drop_frames = drop_frames

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, e in enumerate(batch["error"]) if not e and len(batch["frames"][i])]
        sims = np.full(len(batch["video_id"]), np.nan)
        if ok:
            frames = [batch["frames"][i] for i in ok]
            captions = [str(batch["text"][i]) for i in ok]
            sims[ok] = self.clip.similarity(frames, captions, fps=float(batch["fps"][ok[0]]))
        return _without_frames({**batch, "clip": sims}, self.drop_frames)


class VLMPhysicsScorer:
    """Ray Data actor: one VLM (transformers), asked whether each clip is physically plausible.

    An answer the strict parser cannot read leaves the score empty (`physics_unreadable`)."""

    def __init__(self, setup: ScoringSetup, drop_frames: bool = False):
        from models.vlm import VLMConfig, VLMCritic

        self.critic = VLMCritic(VLMConfig(model=setup.vlm_model))
        self.drop_frames = drop_frames

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, e in enumerate(batch["error"]) if not e and len(batch["frames"][i])]
        physics = np.full(len(batch["video_id"]), np.nan)
        if ok:
            answers = self.critic.physics(
                [batch["frames"][i] for i in ok], [str(batch["text"][i]) for i in ok], [float(batch["fps"][i]) for i in ok]
            )
            for i, (score, _raw) in zip(ok, answers, strict=True):
                physics[i] = np.nan if score is None else score
        return _without_frames({**batch, "physics": physics}, self.drop_frames)


def auto_batch_size(videos: int, workers: int, per_worker: int = 16, smallest: int = 64, largest: int = 256) -> int:
    """Videos per batch when `select.batch_size` is None: about `per_worker` batches per worker, so the last
    batches do not leave a worker idle, but no fewer than `smallest` videos, since each Ray task costs
    ~65-145 ms of scheduling here (a 16x16x8 clip costs ~6.5 ms to score), and no more than `largest`;
    and never so many that a worker gets no batch at all (a folder of 100 videos is 2 batches of 50 for
    2 workers, not one of 64 and one of 36). Measured with benchmarks/select.py on 8,000 clips (session 8, 1 vs 2 tasks on 2 cores): speed-up
    1->2 workers 1.31 at 64, 1.49-1.52 at 245."""
    workers = max(1, workers)
    wanted = max(smallest, min(largest, -(-videos // (workers * per_worker))))
    return max(1, min(wanted, -(-videos // workers)))


def scoring_setup(cfg: SelectConfig, layout: RunLayout, inputs: Mapping[str, ManifestRef]) -> ScoringSetup:
    """What the Ray workers need to score this run's videos, after checking that its scorers can run."""
    world = _world_spec(layout) if cfg.physics == "judge" else None
    if cfg.physics == "judge" and world is None:
        raise ValueError(
            "select.physics `judge` works on the embedded world only; for real footage set select.physics=vlm "
            "with select.vlm_model, or select.physics=none"
        )
    if cfg.physics == "vlm" and not cfg.vlm_model:
        raise ValueError("select.physics is `vlm` but select.vlm_model is not set; name a VLM hub id or local folder")
    clip_name, clip_path = _clip_location(inputs, cfg, layout)
    world_size, world_frames, world_fps = world or (None, None, None)
    return ScoringSetup(
        scoring=cfg.scoring,
        physics=cfg.physics,
        world_size=world_size,
        world_frames=world_frames,
        world_fps=world_fps,
        clip_name=clip_name,
        clip_pretrained=clip_path,
        clip_device=cfg.text.device,
        clip_dtype=cfg.text.dtype,
        vlm_model=cfg.vlm_model,
    )


def scoring_items(rows: Sequence[Mapping[str, Any]], layout: RunLayout) -> list[dict]:
    """The rows of a `videos` manifest as the scoring workers read them (id, absolute path, caption, fps)."""
    return [
        {"video_id": r["video_id"], "path": str(layout.resolve(r["video_path"])), "text": r["caption"], "fps": r["fps"]}
        for r in rows
    ]


def score_on_ray(items: list[dict], setup: ScoringSetup, cfg: SelectConfig, address: str | None) -> list[dict]:
    """Scores of every item (video_id, path, text = caption, fps) through Ray Data."""
    import ray

    from infra.ray_cluster import ray_session
    from infra.resources import resources_for

    overrides = {"actors": cfg.clip_actors, "batch_size": cfg.batch_size or auto_batch_size(len(items), cfg.workers)}
    if cfg.num_gpus is not None:
        overrides["num_gpus"] = cfg.num_gpus
    with ray_session(address=address), _no_op_reservation():
        # GPUs of the cluster, not of this machine: a driver without a GPU may join a GPU cluster
        res = resources_for("select", overrides, gpus_available=ray.cluster_resources().get("GPU", 0.0))
        # one block per batch: Ray Data's default splits small item lists into many tiny blocks,
        # and per-task overhead then dominates the few milliseconds a small clip costs to score
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // res.batch_size)))
        # Each task runs one thread; its logical CPU share is what is left beside the CLIP actors,
        # so that `workers` tasks really run at once (1 CPU each plus 0.25 for an actor does not
        # fit twice on 2 cores, and Ray would quietly run one task at a time).
        models = [actor for actor, wanted in ((ClipScorer, setup.clip_name is not None), (VLMPhysicsScorer, setup.physics == "vlm")) if wanted]
        model_pools = len(models)
        actor_cpus = res.num_cpus * res.actors * model_pools
        task_cpus = min(1.0, max(0.05, (ray.cluster_resources().get("CPU", 1.0) - actor_cpus) / cfg.workers))
        ds = ds.map_batches(
            frame_scores_batch,
            fn_kwargs={"setup": setup, "keep_frames": bool(models)},
            batch_size=res.batch_size,
            compute=ray.data.TaskPoolStrategy(size=cfg.workers),
            num_cpus=task_cpus,
        )
        for i, actor in enumerate(models):
            ds = ds.map_batches(
                actor,
                fn_constructor_kwargs={"setup": setup, "drop_frames": i == len(models) - 1},
                batch_size=res.batch_size,
                compute=ray.data.ActorPoolStrategy(size=res.actors),
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
            )
        return [_plain(r) for r in ds.take_all()]


@contextlib.contextmanager
def _no_op_reservation():
    """Ray Data reserves a share of the CPUs for each operator by default; with a model actor pool
    beside the decode tasks on 2 cores, that reservation held the tasks to about one at a time
    (measured speed-up from 1 to 2 tasks on 2 cores 1.03-1.07 with it, 1.30-1.46 without)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


def _without_frames(batch: dict[str, np.ndarray], drop: bool) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k != "frames"} if drop else batch


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and np.isnan(v):
            v = None
        out[k] = v
    return out


# --- scores cache: what lets a threshold change skip decoding --------------------------------

_CACHE_SCHEMA = pa.schema(
    [pa.field("video_id", pa.string()), pa.field("error", pa.string())]
    + [pa.field(k, pa.float64()) for k in SCORE_COLUMNS]
)


def _scores_path(out: StageDir) -> Path:
    return out.path / "scores.parquet"


def load_scores(out: StageDir, key: str) -> dict[str, dict] | None:
    path = _scores_path(out)
    if not path.exists():
        return None
    meta = pq.read_schema(path).metadata or {}
    if meta.get(b"prefloop.scoring_key", b"").decode() != key:
        return None
    table = pq.read_table(path, schema=_CACHE_SCHEMA)
    return {r["video_id"]: r for r in table.to_pylist()}


def save_scores(out: StageDir, key: str, scores: Mapping[str, dict]) -> None:
    rows = [{c: s.get(c) for c in _CACHE_SCHEMA.names} for s in scores.values()]
    table = pa.Table.from_pylist(rows, schema=_CACHE_SCHEMA).replace_schema_metadata({b"prefloop.scoring_key": key.encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(_scores_path(out), sink.getvalue())


# --- the stage -------------------------------------------------------------------------------


def _world_spec(layout: RunLayout) -> tuple[int, int, float] | None:
    """The embedded world's frame size, frame count and fps, from the run's saved config."""
    import yaml

    if not layout.config_path.exists():
        return None
    ingest = (yaml.safe_load(layout.config_path.read_text()) or {}).get("ingest", {})
    if ingest.get("source", "synthetic") != "synthetic":
        return None
    world = ingest.get("world", {})
    return int(world.get("size", 16)), int(world.get("frames", 8)), float(world.get("fps", 8.0))


def _clip_location(inputs: Mapping[str, ManifestRef], cfg: SelectConfig, layout: RunLayout) -> tuple[str | None, str | None]:
    """(open_clip model name, weights) for text similarity, or (None, None) when it is off."""
    if cfg.text.model == "none":
        return None, None
    if cfg.text.model != "world":
        if not cfg.text.pretrained:
            raise ValueError(
                f"select.text.model is `{cfg.text.model}` but select.text.pretrained is not set; "
                "name open_clip pretrained weights (a tag or a local path)"
            )
        return cfg.text.model, cfg.text.pretrained
    if "checkpoints" not in inputs:
        raise ValueError(
            "select.text.model `world` needs the bootstrap stage's checkpoints: run `bootstrap` first, "
            "or name an open_clip model (select.text.model, select.text.pretrained), or set select.text.model=none"
        )
    ckpts = read_manifest(inputs["checkpoints"].path, "checkpoints", layout)
    clip = [r for r in ckpts.rows() if r["kind"] == "clip"]
    if not clip:
        raise ValueError(f"{ckpts.ref.path}: no `clip` checkpoint; rerun `bootstrap`")
    return clip[0]["base_id"], str(layout.resolve(clip[0]["path"]))


def run(
    inputs: Mapping[str, ManifestRef],
    cfg: SelectConfig,
    layout: RunLayout,
    out: StageDir,
    lineage: Lineage,
    ray_address: str | None = None,
) -> StageResult:
    """Score every readable video (or reuse the stored scores), decide, and write `selection`."""
    # 0. check inputs: which scorers this run uses
    videos = read_manifest(inputs["videos"].path, "videos", layout)
    rows = videos.rows()
    setup = scoring_setup(cfg, layout, inputs)
    clip_path = setup.clip_pretrained
    # 1. scores: from the cache when only decisions changed, else decoded and scored on Ray
    clip_hash = inputs["checkpoints"].content_hash if clip_path and "checkpoints" in inputs else clip_path
    key = config_hash({"videos": videos.ref.content_hash, "clip": clip_hash, "scoring": cfg.scoring_hash()})
    t0 = time.perf_counter()
    scores = None if out.fresh else load_scores(out, key)  # forced: score again
    decoded = scoring_nodes = 0
    if scores is None:
        # every readable video is scored, whatever the metadata bounds (bounds are decisions too),
        # unless its declared size alone passes the decode budget: that is known without opening it
        budget = cfg.scoring.max_decode_mib * 2**20
        todo = [r for r in rows if r["reason"] is None and declared_bytes(r) <= budget]
        items = scoring_items(todo, layout)
        scores = {s["video_id"]: s for s in score_on_ray(items, setup, cfg, ray_address)} if items else {}
        scoring_nodes = len({s["node_id"] for s in scores.values() if s.get("node_id")})
        for r in rows:
            if r["reason"] is None and declared_bytes(r) > budget:
                scores[r["video_id"]] = {
                    "video_id": r["video_id"], **{k: None for k in SCORE_COLUMNS},
                    "error": f"{TOO_LARGE}: declared {r['num_frames']} frames of {r['width']}x{r['height']} pass "
                    f"select.scoring.max_decode_mib={cfg.scoring.max_decode_mib:g}",
                }
        save_scores(out, key, scores)
        decoded = len(items)
    seconds = time.perf_counter() - t0
    # 2. decisions
    out_rows = []
    for r in rows:
        s = scores.get(r["video_id"])
        passed, reason = decide_row(r, s, cfg)
        out_rows.append(
            {
                "video_id": r["video_id"],
                "video_path": r["video_path"],
                "caption": r["caption"],
                "split": r["split"],
                **{f"score_{k}": (None if s is None else s.get(k)) for k in SCORE_COLUMNS},
                "final_score": final_score(s),
                "passed_json": json.dumps(passed, sort_keys=True),
                "reason": reason,
                "selected": reason is None,
            }
        )
    _apply_diversity_and_top_k(out_rows, cfg, setup.clip_name, clip_path)
    # 3. the manifest, the contact sheet and the counts for the UI
    ref = write_manifest(out_rows, "selection", out.manifest_path, layout, lineage)
    images = {}
    sheet = out.files("plots") / "contact_sheet.png"
    if cfg.contact_sheet and write_contact_sheet(out_rows, layout, sheet, cfg.contact_sheet):
        images["selected and rejected clips"] = str(sheet)
    counts = summarize(out_rows)
    counts["decoded"] = decoded
    counts["scoring_nodes"] = scoring_nodes
    return StageResult(ref, counts=counts, metrics={"scoring_seconds": seconds, "compute_s": seconds}, images=images)


def _apply_diversity_and_top_k(rows: list[dict], cfg: SelectConfig, clip_name: str | None, clip_path: str | None) -> None:
    candidates = [i for i, r in enumerate(rows) if r["selected"]]
    if cfg.diversity_tau is not None and candidates:
        if clip_name is None:
            raise ValueError("select.diversity_tau needs caption embeddings: configure select.text (open_clip)")
        from models.clip_model import load_clip

        clip = load_clip(clip_name, clip_path, device="cpu")
        emb = clip.embed_texts([rows[i]["caption"] for i in candidates])
        keep = set(greedy_diverse(emb, np.array([rows[i]["final_score"] for i in candidates]), cfg.diversity_tau))
        for j, i in enumerate(candidates):
            if j not in keep:
                _fail(rows[i], "diversity", "near_duplicate")
    if cfg.top_k is not None:
        ranked = sorted((i for i, r in enumerate(rows) if r["selected"]), key=lambda i: -rows[i]["final_score"])
        for i in ranked[cfg.top_k :]:
            _fail(rows[i], "top_k", "below_top_k")


def _fail(row: dict, name: str, reason: str) -> None:
    passed = json.loads(row["passed_json"])
    passed[name] = False
    row["passed_json"] = json.dumps(passed, sort_keys=True)
    row["reason"] = row["reason"] or reason
    row["selected"] = False


def summarize(rows: list[dict]) -> dict[str, int]:
    from collections import Counter

    counts = {"videos": len(rows), "selected": sum(r["selected"] for r in rows)}
    for reason, n in sorted(Counter(r["reason"] for r in rows if r["reason"]).items()):
        counts[f"reason:{reason}"] = n
    return counts


def write_contact_sheet(rows: list[dict], layout: RunLayout, path: Path, per_side: int) -> bool:
    """A PNG of frame strips: a few selected clips, then a few rejected ones with their reasons."""
    import cv2

    from tasks.video_io import read_video

    chosen = [r for r in rows if r["selected"]][:per_side]
    rejected = [r for r in rows if not r["selected"] and r["score_quality"] is not None][:per_side]
    strips = []
    for r in chosen + rejected:
        try:
            frames = read_video(layout.resolve(r["video_path"]), max_frames=8)
        except ValueError:
            continue
        scale = max(1, 48 // frames.shape[1])
        strip = np.concatenate([cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) for f in frames], axis=1)
        label = np.zeros((14, strip.shape[1], 3), np.uint8)
        text = ("selected: " if r["selected"] else f"{r['reason']}: ") + (r["caption"] or "")
        cv2.putText(label, text[:90], (2, 11), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1)
        strips.append(np.concatenate([label, strip], axis=0))
    if not strips:
        return False
    width = max(s.shape[1] for s in strips)
    sheet = np.concatenate([np.pad(s, ((0, 2), (0, width - s.shape[1]), (0, 0))) for s in strips], axis=0)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if ok:
        atomic_write_bytes(path, png.tobytes())
    return bool(ok)
