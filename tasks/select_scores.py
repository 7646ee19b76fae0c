"""The pure scoring functions of `select`: decoded frames in, numbers out, decisions apart.

Each frame filter is two things, kept apart the way Data-Juicer keeps stats apart from decisions:
a score computed once from the decoded frames (`score_clip`), and a decision that compares the
stored scores with `ScoreThresholds` (`decide`). Changing a threshold re-decides every clip from
its stored scores without decoding a video again.

Every score is resolution independent, so one set of thresholds serves the 16 px embedded world
and real footage:
- frames are resized to fixed working sizes first (colour and brightness statistics on a small
  analysis size, sharpness at most at `sharpness_side`, optical flow at exactly `flow_side`);
- motion is measured in frame short sides per second on frames sampled at a fixed rate;
- scene cuts and flicker compare a frame with its neighbours, not with an absolute scale.

No files, no Prefect, no Ray: `score_clip` runs inside Ray Data `map_batches` in the stage's edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.frames import farneback, resize_short_side, to_grey

SCORE_KEYS = ("motion", "static", "scene_cut", "flicker", "sharpness", "quality")
# Frame filters in the order `decide` applies them: the first failing one is the clip's reason.
# Imaging first (exposure, blur): they concern every frame and they hide change, so a black or
# blurred clip could also pass for static. Then the temporal filters, most specific first: a
# static clip also has low motion.
FRAME_FILTERS = ("low_quality", "blurry", "static", "flicker", "scene_cut", "low_motion", "high_motion")
METADATA_REASONS = ("missing_metadata", "bad_fps", "too_small", "too_short", "too_long")


# --- 1. configs ------------------------------------------------------------------------------


class MetadataLimits(BaseModel):
    """Bounds on what the container says, checked before anything is decoded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_side: int = Field(16, ge=1, description="smallest short side in px; 16 is the embedded world's frame, raise it for real footage")
    min_frames: int = Field(4, ge=2, description="fewest frames; cut and flicker need neighbours on both sides, the world's too_short clips have 3")
    min_duration_s: float = Field(0.5, ge=0, description="shortest clip in seconds; the world's clips last 1 s, real web sets usually ask for seconds")
    max_duration_s: float | None = Field(None, gt=0, description="longest clip in seconds; none by default, long clips are scored on their frames as they are")
    min_fps: float = Field(4.0, gt=0, description="lowest frame rate; below 4 fps motion is a slide show, not video")
    max_fps: float = Field(120.0, gt=0, description="highest frame rate; above 120 fps the container's rate is usually wrong")


class ScoreConfig(BaseModel):
    """How the scores are computed (working sizes, sampling); thresholds live in `ScoreThresholds`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    analysis_side: int = Field(32, ge=8, description="short side for colour, brightness and change statistics; histograms need no detail")
    sharpness_side: int = Field(64, ge=8, description="short side sharpness is judged at (downscale only): blur finer than a pixel at the largest training size (64 px) does not matter")
    sharpness_frames: int = Field(8, ge=1, description="evenly spaced frames for sharpness and quality; both change slowly within a clip")
    flow_side: int = Field(32, ge=16, description="short side optical flow runs at (resized both ways) so flow pixels mean the same at every resolution")
    flow_fps: float = Field(8.0, gt=0, description="frame rate flow pairs are sampled at: the world's rate, and 2-4x VideoReward's 2 fps so fast motion stays trackable")
    flow_method: Literal["farneback", "dis"] = Field("farneback", description="Farneback (ALGORITHMS.md §9) tracks small objects at 32 px; DIS (fast preset) smears them over its 8 px patches")
    change_level: float = Field(10.0, gt=0, description="grey levels a pixel must change by to count as changed; above mp4 coding noise (a few levels)")
    chroma_noise: float = Field(24.0, ge=0, description="chroma (max-min of RGB, 0-255) that mp4 coding adds to grey pixels; only chroma above it counts as colour")
    cut_min_chroma: float = Field(0.03, gt=0, description="mean chroma (0-1) below which hue statistics are distrusted; the world's one ball gives ~0.05")
    cut_floor: float = Field(0.02, gt=0, description="distance added to the neighbours' change so that noise on a still clip is not a cut")
    luma_floor: float = Field(32.0, gt=0, description="mean grey level flicker is taken relative to at least, so noise in dark clips is not flicker")
    max_decode_mib: float = Field(
        2048.0, gt=0, description="memory one clip may take decoded (RGB frames); a clip declared or found larger "
        "is not scored (`too_large`): 2 GiB is ~330 frames of 1080p, sample long footage down before selecting",
    )


class ScoreThresholds(BaseModel):
    """Decision thresholds on stored scores; calibrated on the embedded world and on OpenCV-drawn clips."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    static_min: float = Field(0.01, ge=0, le=1, description="least share of pixels that must change; a still image changes none, the world's slowest ball ~11%, drawn shapes >= 2%")
    flicker_max: float = Field(0.05, ge=0, description="largest relative frame-to-frame brightness oscillation; the world's flicker scores ~0.7, steady clips < 0.01")
    scene_cut_max: float = Field(2.5, gt=0, description="largest colour change of one step relative to its neighbours; cuts score > 3.3, continuous footage < 1.6")
    sharpness_min: float = Field(2.0, ge=0, description="least inverse edge width at the sharpness size; sharp clips score > 2.4, strongly blurred ones < 1.7 after mp4 coding")
    motion_min: float = Field(0.005, ge=0, description="least mean flow speed (short sides per second); a small shape moving slowly ~0.01, world clips > 0.05, stills < 0.005")
    motion_max: float | None = Field(None, gt=0, description="largest mean flow speed; off by default, set it to drop shaky or chaotic footage")
    quality_min: float = Field(0.5, ge=0, le=1, description="least imaging-quality proxy; normal clips score > 0.68, nearly black or washed-out ones < 0.4")


# Frozen, so one shared instance is safe as every function's default.
DEFAULT_LIMITS = MetadataLimits()
DEFAULT_SCORE_CONFIG = ScoreConfig()
DEFAULT_THRESHOLDS = ScoreThresholds()


# --- 2. metadata -----------------------------------------------------------------------------


def _number(meta: Mapping[str, Any], key: str) -> float | None:
    """A finite float from `meta[key]`, or None when it is missing, null or not a number."""
    value = meta.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metadata_ok(meta: Mapping[str, Any], limits: MetadataLimits = DEFAULT_LIMITS) -> str | None:
    """The first metadata reason that rejects a `videos` row, or None if it may be decoded.

    `meta` holds the `videos` columns `fps`, `num_frames`, `width`, `height` and optionally
    `duration_s` (else num_frames / fps). Checks run cheapest-first and name what failed:
    `missing_metadata`, `bad_fps`, `too_small`, `too_short` (too few seconds or frames), `too_long`.
    """
    fps, frames = _number(meta, "fps"), _number(meta, "num_frames")
    width, height = _number(meta, "width"), _number(meta, "height")
    if frames is None or width is None or height is None:
        return "missing_metadata"
    if fps is None or not limits.min_fps <= fps <= limits.max_fps:
        return "bad_fps"
    if min(width, height) < limits.min_side:
        return "too_small"
    duration = _number(meta, "duration_s")
    duration = frames / fps if duration is None else duration
    if frames < limits.min_frames or duration < limits.min_duration_s:
        return "too_short"
    if limits.max_duration_s is not None and duration > limits.max_duration_s:
        return "too_long"
    return None


# --- 3. shared views of one clip -------------------------------------------------------------


def _check_clip(frames: np.ndarray, fps: float) -> np.ndarray:
    """Return frames as a uint8 (F,H,W,3) array, or raise saying how to fix the input."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"frames: expected uint8 RGB of shape (frames, height, width, 3), got {arr.dtype} {arr.shape}; "
            "decode with tasks.video_io.read_video"
        )
    if arr.shape[0] < 2:
        raise ValueError(f"frames: scores compare frames, got {arr.shape[0]}; reject such clips with metadata_ok first")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}; take it from the `videos` manifest")
    return np.ascontiguousarray(arr)  # OpenCV refuses strided views such as frames[..., ::-1]


def sample_indices(num_frames: int, fps: float, target_fps: float) -> np.ndarray:
    """Indices of the frames nearest to times 0, 1/target_fps, 2/target_fps, … (all frames if
    the video is slower, first and last if it is shorter than one step), so that every video
    is measured at the same frame rate."""
    if fps <= target_fps:
        return np.arange(num_frames)
    times = np.arange(0.0, num_frames / fps, 1.0 / target_fps)
    picks = np.unique(np.clip(np.rint(times * fps).astype(int), 0, num_frames - 1))
    return picks if len(picks) > 1 else np.array([0, num_frames - 1])


def even_picks(num_frames: int, count: int) -> np.ndarray:
    """Indices of up to `count` frames spread evenly from the first to the last."""
    return np.unique(np.linspace(0, num_frames - 1, min(num_frames, count)).round().astype(int))


class ClipViews:
    """The resized and sampled views every score reads, each made at most once per clip.

    `score_clip` shares one instance between all scores (decode once, resize once); a single
    score function builds only the views it needs.
    """

    def __init__(self, frames: np.ndarray, fps: float, cfg: ScoreConfig) -> None:
        self.frames = _check_clip(frames, fps)
        self.fps = float(fps)
        self.cfg = cfg

    @cached_property
    def small_rgb(self) -> np.ndarray:
        """All frames at the analysis size (never upscaled: histograms gain nothing from it)."""
        return resize_short_side(self.frames, self.cfg.analysis_side, upscale=False)

    @cached_property
    def small_grey(self) -> np.ndarray:
        """Luma of `small_rgb` as float32."""
        return to_grey(self.small_rgb).astype(np.float32)

    @cached_property
    def sharp_grey(self) -> np.ndarray:
        """Luma of up to `sharpness_frames` evenly spaced frames, at most `sharpness_side` px."""
        picks = even_picks(len(self.frames), self.cfg.sharpness_frames)
        return resize_short_side(to_grey(self.frames[picks]), self.cfg.sharpness_side, upscale=False).astype(np.float32)

    @cached_property
    def flow_frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 luma at exactly `flow_side`, seconds between consecutive sampled frames)."""
        picks = sample_indices(len(self.frames), self.fps, self.cfg.flow_fps)
        grey = resize_short_side(to_grey(self.frames[picks]), self.cfg.flow_side, upscale=True)
        return grey, np.diff(picks) / self.fps


# --- 4. scores ---------------------------------------------------------------------------------


def _flow_engine(method: str):
    """A function (first, second) -> dense flow (H,W,2) in pixels between uint8 grey frames."""
    if method == "dis":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST).calc
    # 3 pyramid levels and a 9 px window: at 32 px that follows a shift of a quarter frame per step
    return lambda first, second, _: farneback(first, second)


def _motion(views: ClipViews) -> float:
    grey, seconds = views.flow_frames
    side = min(grey.shape[1:3])
    flow = _flow_engine(views.cfg.flow_method)
    speeds = [
        float(np.linalg.norm(flow(a, b, None), axis=-1).mean()) / side / step
        for a, b, step in zip(grey[:-1], grey[1:], seconds, strict=True)
    ]
    return float(np.mean(speeds))


def _static(views: ClipViews) -> float:
    grey = views.small_grey
    changed = np.abs(grey - grey[0]) > views.cfg.change_level
    return float(changed.mean(axis=(1, 2)).max())


HUE_BINS = 24  # 15 degrees each; the world's palette hues lie 50-90 degrees apart


def hue_histograms(rgb: np.ndarray, chroma_noise: float) -> np.ndarray:
    """Per frame, hue histograms (F, HUE_BINS) weighted by chroma above the coding noise, as a
    share of all pixels: the mass is how colourful the frame is, the shape which colours.

    Hue is soft-binned (split linearly between the two nearest bins) so a hue wobbling across a
    bin edge moves no mass, and grey pixels, whose hue is coding noise, weigh nothing.
    """
    count = len(rgb)
    hsv = cv2.cvtColor(rgb.reshape(-1, rgb.shape[-2], 3), cv2.COLOR_RGB2HSV_FULL).reshape(count, -1, 3).astype(np.float32)
    chroma = hsv[..., 1] * hsv[..., 2] / 255.0  # OpenCV: V = max(R,G,B), S = 255 (max - min) / max
    weight = np.maximum(chroma - chroma_noise, 0.0) / 255.0
    hue = hsv[..., 0] * (HUE_BINS / 256.0)
    low = np.floor(hue).astype(np.int64)
    upper = hue - low
    rows = np.arange(count)[:, None] * HUE_BINS
    hist = np.bincount((rows + low % HUE_BINS).ravel(), (weight * (1 - upper)).ravel(), count * HUE_BINS)
    hist += np.bincount((rows + (low + 1) % HUE_BINS).ravel(), (weight * upper).ravel(), count * HUE_BINS)
    return hist.reshape(count, HUE_BINS) / hsv.shape[1]


def circular_emd(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Earth mover's distance between distributions on a circle of bins, row by row, as a share
    of the full circle (0..0.5).

    On a circle the flow between neighbours is the cumulative difference minus any constant;
    the median constant minimises the total (Werman, Peleg & Rosenfeld 1985). Unlike a bin-wise
    distance, a hue that drifts by a few degrees moves the distribution only a little.
    """
    cumulative = np.cumsum(q - p, axis=-1)
    return np.abs(cumulative - np.median(cumulative, axis=-1, keepdims=True)).sum(-1) / p.shape[-1]


def colour_steps(rgb: np.ndarray, grey: np.ndarray, cfg: ScoreConfig) -> np.ndarray:
    """How much the colour distribution changes between consecutive frames (F-1,).

    The sum of two distances between whole-frame distributions, both blind to where things are,
    so an object moving on a still background changes nothing: the circular EMD of the hue
    histograms (trusted in proportion to how colourful both frames are) and the 1-D EMD of the
    grey levels as a share of the range (for cuts between scenes of the same colours).
    """
    hist = hue_histograms(rgb, cfg.chroma_noise)
    mass = hist.sum(-1)
    shape = hist / np.maximum(mass, 1e-12)[:, None]
    trust = np.minimum(1.0, np.minimum(mass[:-1], mass[1:]) / cfg.cut_min_chroma)
    hue_step = circular_emd(shape[:-1], shape[1:]) * trust
    levels = np.sort(grey.reshape(len(grey), -1), axis=1)
    grey_step = np.abs(np.diff(levels, axis=0)).mean(-1) / 255.0
    return hue_step + grey_step


def spike_ratio(steps: np.ndarray, floor: float) -> float:
    """max_t steps[t] / (max(steps[t-1], steps[t+1]) + floor): how far one step stands out from
    its neighbours. A cut is a lone spike; a flash or flicker raises neighbouring steps too, and
    gradual changes (a fade, an object entering) spread over several steps."""
    padded = np.concatenate([[0.0], steps, [0.0]])
    neighbours = np.maximum(padded[:-2], padded[2:])
    return float(np.max(steps / (neighbours + floor)))


def _scene_cut(views: ClipViews) -> float:
    return spike_ratio(colour_steps(views.small_rgb, views.small_grey, views.cfg), views.cfg.cut_floor)


def _flicker(views: ClipViews) -> float:
    luma = views.small_grey.mean(axis=(1, 2))
    padded = np.concatenate([luma[:1], luma, luma[-1:]])
    trend = np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)
    return float(np.sqrt(np.mean((luma - trend) ** 2)) / max(float(luma.mean()), views.cfg.luma_floor))


def _sharpness(views: ClipViews) -> float:
    lap_energy = grad_energy = 0.0
    for grey in views.sharp_grey:
        lap_energy += float(np.square(cv2.Laplacian(grey, cv2.CV_32F, ksize=1)).sum())
        dx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=1) * 0.5
        dy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=1) * 0.5
        grad_energy += float(np.square(dx).sum() + np.square(dy).sum())
    return math.sqrt(2.0 * lap_energy / grad_energy) if grad_energy > 0 else 0.0


def noise_sigma(grey: np.ndarray) -> float:
    """Standard deviation of white noise in one grey frame (Immerkær 1996, "Fast noise variance
    estimation"): the mask below cancels planes and ramps, so what is left is mostly noise.

    sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * N|,  N = [[1,-2,1],[-2,4,-2],[1,-2,1]].
    """
    height, width = grey.shape
    if height < 3 or width < 3:
        return 0.0
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    response = cv2.filter2D(grey, cv2.CV_32F, mask)[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2.0) * np.abs(response).sum() / (6.0 * (width - 2) * (height - 2)))


def quality_parts(rgb: np.ndarray, grey: np.ndarray) -> dict[str, float]:
    """The four parts of the imaging-quality proxy, each in [0, 1] (1 is good).

    - exposure: share of pixels neither crushed (< 16) nor blown out (> 239);
    - contrast: RMS contrast (grey std / 255) against 0.15, a plainly visible scene;
    - colourfulness: Hasler & Süsstrunk (2003) M against 60 ("highly colourful");
    - cleanliness: 1 - Immerkær noise sigma against 10 grey levels (heavy grain).
    `rgb` is the colour statistics' view, `grey` the sharpness view (noise needs detail).
    """
    values = rgb.astype(np.float32)
    luma = to_grey(rgb).astype(np.float32)
    exposure = float(((luma >= 16) & (luma <= 239)).mean())
    contrast = float(np.mean([f.std() for f in luma]) / 255.0 / 0.15)
    rg = values[..., 0] - values[..., 1]
    yb = 0.5 * (values[..., 0] + values[..., 1]) - values[..., 2]
    colourful = float(np.mean([
        math.hypot(float(a.std()), float(b.std())) + 0.3 * math.hypot(float(a.mean()), float(b.mean()))
        for a, b in zip(rg, yb, strict=True)
    ]))
    noise = float(np.mean([noise_sigma(g) for g in grey]))
    return {
        "exposure": exposure,
        "contrast": min(1.0, contrast),
        "colourfulness": min(1.0, colourful / 60.0),
        "cleanliness": max(0.0, 1.0 - noise / 10.0),
    }


def _quality(views: ClipViews) -> float:
    picks = even_picks(len(views.small_rgb), views.cfg.sharpness_frames)  # the frames `sharp_grey` holds
    return float(np.mean(list(quality_parts(views.small_rgb[picks], views.sharp_grey).values())))


_SCORES = {
    "motion": _motion,
    "static": _static,
    "scene_cut": _scene_cut,
    "flicker": _flicker,
    "sharpness": _sharpness,
    "quality": _quality,
}


def motion_score(frames: np.ndarray, fps: float, cfg: ScoreConfig = DEFAULT_SCORE_CONFIG) -> float:
    """Mean dense optical-flow speed in frame short sides per second (0 for a still clip).

    Frames are sampled at `flow_fps` and resized to a `flow_side` short side, so the number
    means the same at any resolution and frame rate (Data-Juicer's video_motion_score, with
    OpenCV DIS or Farneback).
    """
    return _motion(ClipViews(frames, fps, cfg))


def static_score(frames: np.ndarray, fps: float, cfg: ScoreConfig = DEFAULT_SCORE_CONFIG) -> float:
    """Largest share of pixels that differ from the first frame by more than `change_level`
    grey levels (0 for a still image; a world ball rolling slowly changes ~10%).

    Comparing with the first frame, not the previous one, catches slow motion at high frame
    rates; the threshold on each pixel ignores coding noise and sensor grain.
    """
    return _static(ClipViews(frames, fps, cfg))


def scene_cut_score(frames: np.ndarray, fps: float, cfg: ScoreConfig = DEFAULT_SCORE_CONFIG) -> float:
    """How far the largest frame-to-frame change of the colour distribution stands out from
    the changes next to it (`colour_steps`, `spike_ratio`): ~1 or less for continuous footage,
    large for a hard cut. Colour distributions ignore where things are, so a ball moving on a
    still background does not register; a flash or flicker raises both neighbours and does not
    either."""
    return _scene_cut(ClipViews(frames, fps, cfg))


def flicker_score(frames: np.ndarray, fps: float, cfg: ScoreConfig = DEFAULT_SCORE_CONFIG) -> float:
    """Frame-to-frame oscillation of mean brightness, relative to the clip's mean brightness.

    Each frame's brightness minus the running median of three (which follows ramps and steps,
    such as fades and cuts, but not a frame that jumps up and back), as an RMS.
    """
    return _flicker(ClipViews(frames, fps, cfg))


def sharpness_score(frames: np.ndarray, fps: float, cfg: ScoreConfig = DEFAULT_SCORE_CONFIG) -> float:
    """Inverse edge width (1/px) at the sharpness size: sqrt(2 E[(∇²I)²] / E[|∇I|²]).

    The variance of the Laplacian grows with contrast and with how much texture a scene has;
    dividing by the gradient energy leaves only the edge profile. For a step edge blurred by a
    Gaussian of sigma px the ratio is 1/(2 sigma²), so the score reads as 1/sigma (for sigma >= 1
    px; a pixel-sharp edge scores ~2.8 with these kernels, and mp4 blocking lifts a blurred clip
    to ~1.5). Frames larger than `sharpness_side` are judged downscaled to it, smaller ones as
    they are (upscaling would only add blur).
    """
    return _sharpness(ClipViews(frames, fps, cfg))


def quality_score(frames: np.ndarray, fps: float, cfg: ScoreConfig = DEFAULT_SCORE_CONFIG) -> float:
    """Imaging-quality proxy in [0, 1]: the mean of exposure, contrast, colourfulness and
    cleanliness (`quality_parts`). A cheap stand-in for an aesthetic or IQA model: it catches
    black, washed-out and grainy clips, not bad composition."""
    return _quality(ClipViews(frames, fps, cfg))


def score_clip(frames: np.ndarray, fps: float, cfg: ScoreConfig = DEFAULT_SCORE_CONFIG) -> dict[str, float]:
    """Every frame score of one decoded clip (keys `SCORE_KEYS`), sharing one set of resized
    views: decode once, resize once, score six times."""
    views = ClipViews(frames, fps, cfg)
    return {key: fn(views) for key, fn in _SCORES.items()}


# --- 5. decisions ----------------------------------------------------------------------------


def _checks(thresholds: ScoreThresholds) -> dict[str, tuple[str, Any]]:
    """Filter name → (score key, predicate that is True when the clip passes)."""
    t = thresholds
    return {
        "static": ("static", lambda s: s >= t.static_min),
        "flicker": ("flicker", lambda s: s <= t.flicker_max),
        "scene_cut": ("scene_cut", lambda s: s <= t.scene_cut_max),
        "blurry": ("sharpness", lambda s: s >= t.sharpness_min),
        "low_motion": ("motion", lambda s: s >= t.motion_min),
        "high_motion": ("motion", lambda s: t.motion_max is None or s <= t.motion_max),
        "low_quality": ("quality", lambda s: s >= t.quality_min),
    }


def decide(scores: Mapping[str, float], thresholds: ScoreThresholds = DEFAULT_THRESHOLDS) -> tuple[dict[str, bool], str | None]:
    """(pass/fail per frame filter, the first failing filter in `FRAME_FILTERS` order or None).

    A NaN score fails its filter: a number that could not be computed vouches for nothing.
    """
    checks = _checks(thresholds)
    missing = sorted({key for key, _ in checks.values()} - set(scores))
    if missing:
        raise KeyError(f"scores lack {missing}; compute them with score_clip (keys {SCORE_KEYS})")
    passed = {}
    for name in FRAME_FILTERS:
        key, ok = checks[name]
        value = float(scores[key])
        passed[name] = bool(not math.isnan(value) and ok(value))
    first = next((name for name in FRAME_FILTERS if not passed[name]), None)
    return passed, first


# --- 6. diversity ----------------------------------------------------------------------------


def greedy_diverse(embeddings: np.ndarray | Sequence[Sequence[float]], scores: np.ndarray | Sequence[float],
                   tau: float = 0.9) -> list[int]:
    """PhysHPO's greedy diversity selection (arXiv 2508.10858): walk the candidates by
    descending score and keep one unless its cosine similarity to a kept one exceeds `tau`.

    Returns the kept indices in the order they were kept (best first); equal scores keep the
    input order. tau = 1 keeps everything, tau = -1 only the best candidate (and exact
    opposites of everything kept). Cost O(n · kept · dim).
    """
    # 1. check inputs
    vectors = np.asarray(embeddings, dtype=np.float64)
    values = np.asarray(scores, dtype=np.float64)
    if vectors.ndim != 2 or values.shape != (vectors.shape[0],):
        raise ValueError(f"embeddings must be (n, dim) and scores (n,), got {vectors.shape} and {values.shape}")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau is a cosine similarity and must lie in [-1, 1], got {tau}")
    if not (np.isfinite(vectors).all() and np.isfinite(values).all()):
        raise ValueError("embeddings and scores must be finite; drop or re-embed the rows with NaN or inf")
    norms = np.linalg.norm(vectors, axis=1)
    if (norms == 0).any():
        raise ValueError(f"row {int(np.argmin(norms))} of embeddings is all zeros, so its cosine similarity is undefined; re-embed it")
    # 2. walk by descending score, comparing with the kept unit vectors only
    unit = vectors / norms[:, None]
    kept: list[int] = []
    bank = np.empty_like(unit)
    for index in np.argsort(-values, kind="stable"):
        if kept and float(np.clip(bank[: len(kept)] @ unit[index], -1.0, 1.0).max()) > tau:
            continue
        bank[len(kept)] = unit[index]
        kept.append(int(index))
    return kept
