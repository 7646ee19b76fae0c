"""Scores and decisions of `select` (tasks/select_scores.py), calibrated on two sets that went
through mp4 and back, so coding artefacts are part of what the thresholds see:

- the embedded world (default WorldSpec: 16x16, 8 frames, 8 fps) with its web-video defects;
- real-format clips drawn with OpenCV: textured shapes moving over textured backgrounds, 64-256 px,
  8-30 fps, some with a panning camera, plus a static, a cut, a blurred and a flickering variant.

One set of default thresholds must serve both (the scores are resolution independent).
"""

from __future__ import annotations

import math
from collections import Counter

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from models.physics_world import VIOLATIONS, WorldSpec, make_clip
from tasks.select_scores import (
    FRAME_FILTERS,
    SCORE_KEYS,
    MetadataLimits,
    ScoreConfig,
    ScoreThresholds,
    circular_emd,
    decide,
    flicker_score,
    greedy_diverse,
    metadata_ok,
    motion_score,
    sample_indices,
    scene_cut_score,
    score_clip,
    sharpness_score,
    spike_ratio,
    static_score,
)
from tasks.video_io import read_video, write_video

# The world's defect name → the reason its filter gives.
OWN_REASON = {"static": "static", "scene_cut": "scene_cut", "flicker": "flicker", "blur": "blurry"}
PER_DEFECT = 40
PLAUSIBLE = 150
PER_VIOLATION = 20  # 100 implausible of 250 clean clips: ingest's default 40% implausible rate


def _round_trip(frames: np.ndarray, fps: float, path) -> np.ndarray:
    """Frames as a decoder returns them after mp4 coding."""
    return read_video(write_video(path, frames, fps))


# --- the embedded world ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Decoded world clips: (defect, violation, frames), each rendered from its own seed."""
    folder = tmp_path_factory.mktemp("world")
    spec = WorldSpec()
    plan = [(None, None)] * PLAUSIBLE + [(None, v) for v in VIOLATIONS for _ in range(PER_VIOLATION)]
    plan += [(d, None) for d in (*OWN_REASON, "too_short") for _ in range(PER_DEFECT)]
    clips = []
    for i, (defect, violation) in enumerate(plan):
        clip = make_clip(np.random.default_rng([7, i]), spec, violation, defect)
        frames = _round_trip(clip.frames, spec.fps, folder / f"{i}.mp4")
        clips.append((defect or "none", violation or "none", frames))
    return spec, clips


@pytest.fixture(scope="module")
def world_decisions(world):
    """(defect, violation, first reason) of every world clip that metadata lets through."""
    spec, clips = world
    out = []
    for defect, violation, frames in clips:
        if defect == "too_short":
            continue
        _, reason = decide(score_clip(frames, spec.fps))
        out.append((defect, violation, reason))
    return out


def test_world_defects_are_rejected_with_their_own_reason(world_decisions):
    for defect, reason in OWN_REASON.items():
        got = Counter(r for d, _, r in world_decisions if d == defect)
        assert sum(got.values()) == PER_DEFECT
        assert got == {reason: PER_DEFECT}, f"{defect}: {dict(got)}"


def test_world_defect_free_clips_pass(world_decisions):
    """>= 97% of defect-free clips pass every frame filter, plausible or not, except the
    `colour_change` violation. A ball that turns into another colour from one frame to the next
    is, for any statistic of the frames, the world's scene cut: there the cut replaces the ball
    by one of another colour, and in a quarter of the cuts the new ball appears within a pixel
    of the old one. So colour changes are rejected as `scene_cut` (they are implausible anyway).
    """
    clean = [(v, r) for d, v, r in world_decisions if d == "none"]
    assert len(clean) == PLAUSIBLE + PER_VIOLATION * len(VIOLATIONS)
    others = [r for v, r in clean if v != "colour_change"]
    assert sum(r is None for r in others) / len(others) >= 0.97, Counter(others)
    plausible = [r for v, r in clean if v == "none"]
    assert sum(r is None for r in plausible) / len(plausible) >= 0.97, Counter(plausible)
    changed = Counter(r for v, r in clean if v == "colour_change")
    assert set(changed) <= {"scene_cut", None}


def test_world_too_short_clips_fail_metadata_and_full_clips_pass(world):
    spec, clips = world
    for defect, _, frames in clips:
        meta = {"fps": spec.fps, "num_frames": len(frames), "width": frames.shape[2], "height": frames.shape[1],
                "duration_s": len(frames) / spec.fps}
        assert metadata_ok(meta) == ("too_short" if defect == "too_short" else None)


# --- real-format clips drawn with OpenCV -----------------------------------------------------


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour field crossed by lines and rectangle outlines: texture at every scale."""
    base = rng.integers(20, 235, size=(3, 3, 3)).astype(np.uint8)
    image = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(8, 16))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.line(image, p1, p2, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            cv2.rectangle(image, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return image


def _sprite(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A checkered disc, square or triangle: (texture (s,s,3), alpha mask (s,s,1))."""
    light, dark = (rng.integers(0, 256, 3) for _ in range(2))
    yy, xx = np.mgrid[:size, :size]
    cell = max(2, size // 4)
    texture = np.where(((yy // cell + xx // cell) % 2 == 0)[..., None], light, dark).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    kind = int(rng.integers(3))
    if kind == 0:
        cv2.circle(mask, (size // 2, size // 2), size // 2 - 1, 255, -1, cv2.LINE_AA)
    elif kind == 1:
        cv2.rectangle(mask, (1, 1), (size - 2, size - 2), 255, -1)
    else:
        cv2.fillPoly(mask, [np.array([[size // 2, 1], [size - 2, size - 2], [1, size - 2]])], 255, cv2.LINE_AA)
    return texture, mask.astype(np.float32)[..., None] / 255.0


def draw_scene(rng: np.random.Generator, height: int, width: int, frames: int, fps: float) -> np.ndarray:
    """1-3 textured shapes bouncing around a textured background, the camera panning in 40% of
    scenes; speeds are fractions of the short side per second, so any size looks alike."""
    short = min(height, width)
    pad = width // 4
    background = _background(rng, height + 2 * pad, width + 2 * pad)
    pan = rng.uniform(-0.3, 0.3, 2) * short if rng.random() < 0.4 else np.zeros(2)
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        size = int(rng.uniform(0.15, 0.35) * short)
        start = rng.uniform([0, 0], [width - size, height - size])
        velocity = rng.uniform(0.2, 0.6) * short * rng.choice([-1, 1], 2) * rng.uniform(0.5, 1.0, 2)
        shapes.append((*_sprite(rng, size), start, velocity, size))
    out = []
    for i in range(frames):
        t = i / fps
        x0, y0 = np.clip(pad + pan * t, 0, 2 * pad).astype(int)
        image = background[y0 : y0 + height, x0 : x0 + width].astype(np.float32)
        for texture, mask, start, velocity, size in shapes:
            room = np.array([width - size, height - size], dtype=float)
            x, y = np.rint(np.abs((start + velocity * t + room) % (2 * room) - room)).astype(int)
            patch = image[y : y + size, x : x + size]
            patch[:] = patch * (1 - mask) + texture * mask
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(out)


SIZES = [(64, 64), (64, 96), (96, 128), (128, 128), (144, 192), (192, 256), (256, 256), (240, 160)]
RATES = [8.0, 10.0, 12.0, 15.0, 24.0, 25.0, 30.0]


def real_clip(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, float]:
    """A drawn clip of 1.5-3 s at a random size and frame rate, with the defect `kind`."""
    height, width = SIZES[int(rng.integers(len(SIZES)))]
    fps = RATES[int(rng.integers(len(RATES)))]
    count = int(round(rng.uniform(1.5, 3.0) * fps))
    frames = draw_scene(rng, height, width, count, fps)
    if kind == "static":
        frames = np.repeat(frames[:1], count, axis=0)
    elif kind == "static_grain":  # a still shot with sensor grain in every frame
        grain = rng.normal(0.0, 2.0, size=(count, *frames.shape[1:]))
        frames = np.clip(np.rint(frames[:1] + grain), 0, 255).astype(np.uint8)
    elif kind == "scene_cut":
        other = draw_scene(rng, height, width, count, fps)
        cut = int(rng.integers(count // 3, 2 * count // 3))
        frames = np.concatenate([frames[:cut], other[cut:]])
    elif kind == "blur":  # sigma 1/24 of the short side: 2.7 px at 64 px, 10.7 px at 256 px
        frames = np.stack([cv2.GaussianBlur(f, (0, 0), min(height, width) / 24) for f in frames])
    elif kind == "flicker":
        gains = 1.0 + np.where(np.arange(count) % 2 == 0, 1.0, -1.0) * rng.uniform(0.2, 0.35, count)
        frames = np.clip(np.rint(frames * gains[:, None, None, None]), 0, 255).astype(np.uint8)
    elif kind == "dark":  # an underexposed shot: everything below grey level ~25
        frames = np.rint(frames * 0.1).astype(np.uint8)
    return frames, fps


REAL_KINDS = {"normal": 24, "static": 4, "static_grain": 4, "scene_cut": 6, "blur": 6, "flicker": 6, "dark": 4}
REAL_REASON = {"normal": None, "static": "static", "static_grain": "static", "scene_cut": "scene_cut",
               "blur": "blurry", "flicker": "flicker", "dark": "low_quality"}


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    """(kind, frames, fps) for drawn clips, after mp4 and back."""
    folder = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(11)
    clips = []
    for kind, count in REAL_KINDS.items():
        for i in range(count):
            frames, fps = real_clip(rng, kind)
            clips.append((kind, _round_trip(frames, fps, folder / f"{kind}{i}.mp4"), fps))
    return clips


def test_real_format_clips_land_with_the_right_reason(real_set):
    got = [(kind, decide(score_clip(frames, fps))[1]) for kind, frames, fps in real_set]
    wrong = [(kind, reason) for kind, reason in got if reason != REAL_REASON[kind]]
    assert not wrong


def test_real_format_metadata_passes(real_set):
    for _, frames, fps in real_set:
        meta = {"fps": fps, "num_frames": len(frames), "width": frames.shape[2], "height": frames.shape[1]}
        assert metadata_ok(meta) is None


# --- resolution and frame-rate independence --------------------------------------------------


def test_scores_do_not_depend_on_resolution():
    """The same drawn clip at 256 px and area-downscaled to 64 px scores alike."""
    rng = np.random.default_rng(3)
    for _ in range(3):
        big = draw_scene(rng, 256, 256, 24, 12.0)
        small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in big])
        a, b = score_clip(big, 12.0), score_clip(small, 12.0)
        assert a["motion"] == pytest.approx(b["motion"], rel=0.1)
        assert a["static"] == pytest.approx(b["static"], abs=0.05)
        assert a["sharpness"] == pytest.approx(b["sharpness"], rel=0.1)
        assert max(a["scene_cut"], b["scene_cut"]) < ScoreThresholds().scene_cut_max
        assert a["flicker"] == pytest.approx(b["flicker"], abs=0.01)


def test_motion_does_not_depend_on_frame_rate():
    """A clip at 24 fps and the same clip keeping every third frame (8 fps) move alike."""
    fast = draw_scene(np.random.default_rng(5), 96, 128, 48, 24.0)
    assert motion_score(fast, 24.0) == pytest.approx(motion_score(fast[::3], 8.0), rel=0.05)


def test_sample_indices():
    assert sample_indices(8, 8.0, 8.0).tolist() == list(range(8))
    assert sample_indices(30, 30.0, 8.0).tolist() == [0, 4, 8, 11, 15, 19, 22, 26]
    assert sample_indices(2, 30.0, 8.0).tolist() == [0, 1]  # shorter than one step: both ends


# --- single scores on hand-made clips --------------------------------------------------------


def _grey_clip(values: list[float], size: int = 32) -> np.ndarray:
    """A clip of flat frames with the given grey levels and a fixed dark square for structure."""
    frames = np.zeros((len(values), size, size, 3), np.uint8)
    for frame, value in zip(frames, values, strict=True):
        frame[:] = int(value)
        frame[8:16, 8:16] = int(value) // 4
    return frames


def test_static_score_counts_changed_pixels():
    still = _grey_clip([100.0] * 6)
    assert static_score(still, 8.0) == 0.0
    moved = still.copy()
    moved[3:, :, :16] = 0  # the left half turns black from frame 3 on
    assert static_score(moved, 8.0) == pytest.approx(0.5)


def test_flicker_score_sees_oscillation_not_ramps_or_steps():
    """Alternating 100/140: the median of three follows the frame's neighbours, so every residual
    is ±40 around a mean of 120, an RMS of 40/120 = 1/3 (a darker square changes it slightly)."""
    assert flicker_score(_grey_clip([100, 140] * 4), 8.0) == pytest.approx(1 / 3, rel=0.15)
    assert flicker_score(_grey_clip([60 + 20 * i for i in range(8)]), 8.0) < 0.01  # a fade
    assert flicker_score(_grey_clip([80] * 4 + [160] * 4), 8.0) < 0.01  # a cut


def test_scene_cut_ignores_fades_and_flashes():
    fade = _grey_clip([60 + 20 * i for i in range(8)])
    flash = _grey_clip([100, 100, 100, 220, 100, 100, 100, 100])
    cut = _grey_clip([100] * 4 + [200] * 4)
    limit = ScoreThresholds().scene_cut_max
    assert scene_cut_score(fade, 8.0) < limit
    assert scene_cut_score(flash, 8.0) < limit
    assert scene_cut_score(cut, 8.0) > limit


def test_spike_ratio_and_circular_emd():
    """A lone step of 1 between steps of 0 with floor 0.1: 1 / (0 + 0.1) = 10; two equal steps
    side by side: 1 / (1 + 0.1). A delta moved one bin on a circle of 24: 1/24; to the opposite
    bin: 12/24 = 0.5, the largest distance."""
    assert spike_ratio(np.array([0.0, 1.0, 0.0]), 0.1) == pytest.approx(10.0)
    assert spike_ratio(np.array([0.0, 1.0, 1.0, 0.0]), 0.1) == pytest.approx(1 / 1.1)
    delta = np.eye(24)
    assert circular_emd(delta[0], delta[1]) == pytest.approx(1 / 24)
    assert circular_emd(delta[0], delta[23]) == pytest.approx(1 / 24)
    assert circular_emd(delta[3], delta[15]) == pytest.approx(0.5)


def test_sharpness_reads_as_inverse_blur_width():
    image = np.zeros((64, 64, 3), np.uint8)
    cv2.circle(image, (32, 32), 16, (200, 100, 50), -1, cv2.LINE_AA)
    scores = [sharpness_score(np.stack([f, f]), 8.0) for f in
              [image] + [cv2.GaussianBlur(image, (0, 0), s) for s in (1.0, 2.0)]]
    assert scores[0] > ScoreThresholds().sharpness_min > scores[1] > scores[2]
    assert scores[1] == pytest.approx(1.0, rel=0.15) and scores[2] == pytest.approx(0.5, rel=0.2)


def test_score_clip_matches_the_single_scores():
    frames = draw_scene(np.random.default_rng(9), 64, 96, 16, 10.0)
    scores = score_clip(frames, 10.0)
    assert tuple(scores) == SCORE_KEYS
    assert scores["motion"] == motion_score(frames, 10.0)
    assert scores["sharpness"] == sharpness_score(frames, 10.0)
    assert all(0.0 <= scores[k] <= 1.0 for k in ("static", "quality"))


def test_scores_reject_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        score_clip(np.zeros((4, 16, 16, 3), np.float32), 8.0)
    with pytest.raises(ValueError, match="metadata_ok"):
        score_clip(np.zeros((1, 16, 16, 3), np.uint8), 8.0)
    with pytest.raises(ValueError, match="fps"):
        score_clip(np.zeros((4, 16, 16, 3), np.uint8), 0.0)


# --- metadata --------------------------------------------------------------------------------


def test_metadata_reasons():
    good = {"fps": 8.0, "num_frames": 8, "width": 16, "height": 16}
    assert metadata_ok(good) is None
    assert metadata_ok({**good, "width": None}) == "missing_metadata"
    assert metadata_ok({**good, "fps": float("nan")}) == "bad_fps"
    assert metadata_ok({**good, "fps": 2.0}) == "bad_fps"
    assert metadata_ok({**good, "height": 12}) == "too_small"
    assert metadata_ok({**good, "num_frames": 3}) == "too_short"
    assert metadata_ok({**good, "duration_s": 0.25}) == "too_short"
    assert metadata_ok({**good, "num_frames": 900, "fps": 30.0}) is None
    assert metadata_ok({**good, "num_frames": 900, "fps": 30.0}, MetadataLimits(max_duration_s=10)) == "too_long"


# --- decisions -------------------------------------------------------------------------------


GOOD = {"motion": 0.2, "static": 0.2, "scene_cut": 1.0, "flicker": 0.0, "sharpness": 2.6, "quality": 0.8}


def test_decide_reports_the_first_failing_filter_in_order():
    passed, reason = decide(GOOD)
    assert reason is None and list(passed) == list(FRAME_FILTERS) and all(passed.values())
    still = {**GOOD, "static": 0.0, "motion": 0.0}
    passed, reason = decide(still)
    assert reason == "static"
    assert {name for name, ok in passed.items() if not ok} == {"static", "low_motion"}
    assert decide({**still, "sharpness": 0.5})[1] == "blurry"  # blur hides change: it comes first


def test_changing_a_threshold_redecides_from_stored_scores():
    stored = {**GOOD, "motion": 0.05}
    assert decide(stored)[1] is None
    assert decide(stored, ScoreThresholds(motion_min=0.1))[1] == "low_motion"
    assert decide(stored, ScoreThresholds(motion_max=0.04))[1] == "high_motion"


def test_decide_fails_nan_and_refuses_missing_scores():
    assert decide({**GOOD, "sharpness": math.nan})[1] == "blurry"
    with pytest.raises(KeyError, match="quality"):
        decide({k: v for k, v in GOOD.items() if k != "quality"})


def test_configs_are_frozen_and_strict():
    with pytest.raises(ValidationError):
        ScoreThresholds(static_minimum=0.1)
    with pytest.raises(ValidationError):
        ScoreConfig(flow_method="lucas_kanade")
    thresholds = ScoreThresholds()
    with pytest.raises(ValidationError):
        thresholds.static_min = 0.5


# --- greedy diversity ------------------------------------------------------------------------


def test_greedy_diverse_drops_near_duplicates_and_keeps_score_order():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.05], [0.6, 0.8]])
    scores = np.array([0.5, 0.9, 0.7, 0.1, 0.3])
    # by score: 1 (0.9), 2 (0.7), 0 (0.5, duplicate of 2), 4 (0.3), 3 (0.1, cos 0.999 to 2)
    assert greedy_diverse(embeddings, scores) == [1, 2, 4]


def test_greedy_diverse_tau_edges():
    """cos([1,0],[0,1]) is exactly 0: kept at tau = 0 (not above it), dropped just below it."""
    orthogonal = np.eye(2)
    assert greedy_diverse(orthogonal, [1.0, 0.5], tau=0.0) == [0, 1]
    assert greedy_diverse(orthogonal, [1.0, 0.5], tau=-0.01) == [0]
    duplicates = np.ones((3, 4))
    assert greedy_diverse(duplicates, [0.1, 0.3, 0.2], tau=1.0) == [1, 2, 0]  # nothing exceeds 1
    assert greedy_diverse(duplicates, [0.1, 0.3, 0.2], tau=0.9) == [1]
    assert greedy_diverse(np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), [3, 2, 1], tau=-1.0) == [0, 1]
    assert greedy_diverse(np.eye(3), [0.5, 0.5, 0.5]) == [0, 1, 2]  # ties keep input order
    assert greedy_diverse(np.zeros((0, 3)), []) == []


def test_greedy_diverse_rejects_bad_input():
    with pytest.raises(ValueError, match="all zeros"):
        greedy_diverse(np.array([[1.0, 0.0], [0.0, 0.0]]), [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        greedy_diverse(np.eye(2), [1.0, math.nan])
    with pytest.raises(ValueError, match=r"\(n, dim\)"):
        greedy_diverse(np.eye(2), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="tau"):
        greedy_diverse(np.eye(2), [1.0, 2.0], tau=1.5)
