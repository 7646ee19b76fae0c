"""The embedded physics world: exact physics, captions, violations and defects that are what
they claim to be, deterministic for a seed, at 16 px x 8 frames and 32 px x 16 frames."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from models.physics_world import (
    DEFECTS,
    MOTIONS,
    PALETTE,
    TELEPORT_RANGE,
    VIOLATIONS,
    Ball,
    CaptionFacts,
    Scene,
    Violation,
    WorldSpec,
    caption,
    collide_tracks,
    corrupt_bytes,
    degrade,
    facts_agree,
    floor_bounce,
    in_frame,
    make_clip,
    parse_caption,
    render,
    render_clip,
    sample_scene,
    scene_facts,
    simulate,
    violate,
)
from tasks.video_io import probe_video

SPECS = [WorldSpec(), WorldSpec(size=32, frames=16)]
SPEC_IDS = ["16px-8f", "32px-16f"]


def clip_for(spec: WorldSpec, violation: str | None = None, defect: str | None = None, seed: int = 0, **look):
    return make_clip(np.random.default_rng(seed), spec, violation, defect, **look)


def violated_trajectory(clip, spec: WorldSpec):
    """(physical, violated) trajectories re-simulated from the clip's truth."""
    scene = Scene.from_json(clip.truth["scene"])
    physical = simulate(scene, spec)
    params = clip.truth["violation_params"]
    return physical, violate(physical, scene, spec, Violation(**json.loads(params))) if params else physical


# ---------------------------------------------------------------------------------------------
# Physics


def test_floor_bounce_matches_a_finely_stepped_simulation():
    """Exact events against 1e-4 s semi-implicit Euler steps: same heights (to 1e-3 of the
    frame) and the same number of bounces, for drops, throws, a ball at rest and e = 0 or 1."""
    spec = WorldSpec(frames=16)
    t = spec.times()
    for y0, v0, e in [(0.2, 0.0, 0.7), (0.5, -1.2, 0.55), (spec.rest_y, 0.0, 0.6), (0.4, 2.0, 0.0), (0.3, -0.5, 1.0)]:
        y, _, bounces = floor_bounce(y0, v0, e, t, floor_y=spec.rest_y, gravity=spec.gravity, rest_speed=spec.rest_speed)
        stepped, count = _stepped(y0, v0, e, t, spec)
        assert np.abs(y[0] - stepped).max() < 1e-3, (y0, v0, e)
        assert bounces[0] == count


def _stepped(y0: float, v0: float, e: float, times: np.ndarray, spec: WorldSpec, dt: float = 1e-4):
    """Heights at `times` and bounces, by small time steps (the reference for the exact solver)."""
    y, v, out, count, resting = y0, v0, [], 0, False
    for step in range(int(round(times[-1] / dt)) + 1):
        if len(out) < len(times) and step * dt >= times[len(out)] - 1e-9:
            out.append(y)
        if resting:
            continue
        v += spec.gravity * dt
        y += v * dt
        if y >= spec.rest_y:
            y = spec.rest_y
            if e * v < spec.rest_speed:
                resting, v = True, 0.0
            else:
                v, count = -e * v, count + 1
    return np.asarray(out), count


def test_equal_mass_collision_swaps_velocities_and_never_overlaps():
    spec = WorldSpec()
    t = np.linspace(0, 2, 401)
    xs = collide_tracks(0.2, 0.4, 0.8, -0.2, spec.ball_radius, t)
    velocity = np.diff(xs, axis=0) / np.diff(t)[:, None]
    assert np.allclose(velocity[0], [0.4, -0.2]) and np.allclose(velocity[-1], [-0.2, 0.4])
    assert np.allclose(velocity.sum(1), 0.2)  # momentum of equal masses
    assert np.all(xs[:, 1] - xs[:, 0] >= 2 * spec.ball_radius - 1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("motion", MOTIONS)
def test_sampled_scenes_stay_in_frame(spec, motion):
    """No walls: a scene that would carry a ball out of view is never sampled, so a ball that
    vanishes is never plausible (checked between frames too)."""
    rng = np.random.default_rng(1)
    fine = np.linspace(0, spec.duration, 20 * spec.frames)
    for _ in range(30):
        scene = sample_scene(rng, spec, motion)
        assert scene.motion == motion
        assert in_frame(simulate(scene, spec, fine).positions, spec)


def test_sample_scene_checks_colours():
    with pytest.raises(ValueError, match="2 distinct palette colours"):
        sample_scene(np.random.default_rng(0), WorldSpec(), "collide", ("red",))
    with pytest.raises(ValueError, match="unknown motion"):
        sample_scene(np.random.default_rng(0), WorldSpec(), "flies")


@pytest.mark.parametrize("kwargs, match", [({"size": 15}, "even"), ({"frames": 3}, "frames"),
                                           ({"restitution": (0.9, 0.5)}, "restitution")])
def test_world_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldSpec(**kwargs)


# ---------------------------------------------------------------------------------------------
# Captions


def test_captions_round_trip_through_the_parser():
    rng = np.random.default_rng(2)
    for spec in SPECS:
        for motion in MOTIONS:
            for _ in range(10):
                scene = sample_scene(rng, spec, motion)
                assert parse_caption(caption(scene, spec)) == scene_facts(scene, spec)


def test_caption_grammar_examples():
    assert parse_caption("A red ball is thrown to the left and bounces twice.") == CaptionFacts(("red",), "thrown", "left", 2)
    assert parse_caption("a blue ball falls and bounces once") == CaptionFacts(("blue",), "falls", "none", 1)
    assert parse_caption("a green ball rolls to the right") == CaptionFacts(("green",), "rolls", "right", 0)
    both = parse_caption("a red ball and a yellow ball roll toward each other and collide")
    assert both == CaptionFacts(("red", "yellow"), "collide", "none", 0)


@pytest.mark.parametrize("text", ["", "a ball falls", "a pink ball falls", "a red ball flies to the left",
                                  "a red ball and a red ball roll toward each other and collide",
                                  "a red ball rolls to the left and bounces twice"])
def test_parser_rejects_what_is_not_the_grammar(text):
    assert parse_caption(text) is None


def test_facts_agree_ignores_bounces_only():
    a = CaptionFacts(("red",), "thrown", "left", 2)
    assert facts_agree(a, CaptionFacts(("red",), "thrown", "left", 1))
    assert not facts_agree(a, CaptionFacts(("blue",), "thrown", "left", 2))
    assert not facts_agree(a, CaptionFacts(("red",), "falls", "none", 2))
    assert not facts_agree(a, CaptionFacts(("red",), "thrown", "right", 2))
    assert not facts_agree(a, None)


# ---------------------------------------------------------------------------------------------
# Clips: determinism, truth, rendering


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_make_clip_is_deterministic_for_a_seed(spec):
    look = {"jitter_px": 1.0, "noise_std": 5.0}
    for violation in (None, *VIOLATIONS):
        a, b = (clip_for(spec, violation, "scene_cut", seed=5, **look) for _ in range(2))
        assert np.array_equal(a.frames, b.frames) and a.caption == b.caption and a.truth == b.truth
    assert not np.array_equal(clip_for(spec, seed=1).frames, clip_for(spec, seed=2).frames)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_truth_is_plain_json_and_rerenders_the_clip(spec):
    for violation in (None, *VIOLATIONS):
        clip = clip_for(spec, violation, seed=3)
        truth = json.loads(json.dumps(clip.truth))
        assert truth["plausible"] is (violation is None)
        assert truth["violation"] == (violation or "none") and truth["defect"] == "none"
        assert truth["caption_matches"] is True and truth["num_frames"] == spec.frames
        assert truth["colours"].split(",") == [b.colour for b in clip.scene.balls]
        assert truth["num_balls"] == len(clip.scene.balls)
        params = truth["violation_params"]
        again = render_clip(Scene.from_json(truth["scene"]), spec, Violation(**json.loads(params)) if params else None)
        assert np.array_equal(again, clip.frames)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_plausible_clips_show_their_balls_whole_in_every_frame(spec):
    """Chroma mass (ball pixels weighted by colour) stays that of whole balls: none leaves the frame."""
    for seed in range(20):
        clip = clip_for(spec, seed=seed)
        assert clip.frames.shape == (spec.frames, spec.size, spec.size, 3) and clip.frames.dtype == np.uint8
        rgb = clip.frames.astype(float)
        mass = (rgb.max(-1) - rgb.min(-1)).sum(axis=(1, 2))
        whole = sum(math.pi * (spec.ball_radius * spec.size) ** 2 * (max(PALETTE[b.colour]) - min(PALETTE[b.colour]))
                    for b in clip.scene.balls)
        assert np.all(np.abs(mass / whole - 1) < 0.05), mass / whole


def test_render_shows_sub_pixel_motion():
    """Anti-aliasing: moving a ball by a quarter pixel moves its chroma-weighted centre by ~0.25 px."""
    spec = WorldSpec()
    scene = Scene("rolls", (Ball("red", 0.5, spec.rest_y, 0.0, 0.0, 0.6),))
    traj = simulate(scene, spec)
    moved = simulate(Scene("rolls", (Ball("red", 0.5 + 0.25 / spec.size, spec.rest_y, 0.0, 0.0, 0.6),)), spec)
    a, b = render(traj, spec)[0].astype(float), render(moved, spec)[0].astype(float)
    assert not np.array_equal(a, b)
    shift = _centre_x(b) - _centre_x(a)
    assert abs(shift - 0.25) < 0.05, shift


def _centre_x(frame: np.ndarray) -> float:
    """Chroma-weighted x of a frame's coloured pixels, in px."""
    chroma = frame.max(-1) - frame.min(-1)
    return float((chroma * (np.arange(frame.shape[1]) + 0.5)).sum() / chroma.sum())


def test_jitter_and_degrade_look_generated():
    spec = WorldSpec()
    rng = np.random.default_rng(0)
    traj = simulate(sample_scene(rng, spec, "rolls"), spec)
    with pytest.raises(ValueError, match="needs an rng"):
        render(traj, spec, jitter_px=1.0)
    shaky = render(traj, spec, np.random.default_rng(1), jitter_px=1.0)
    assert not np.array_equal(shaky, render(traj, spec))
    soft = degrade(render(traj, spec), rng, blur_sigma=0.7, noise_std=6.0)
    assert soft.dtype == np.uint8 and soft.shape == shaky.shape
    background = soft[:, :4, :4].astype(float)  # no ball reaches the top-left corner of a rolling scene
    assert 3.0 < background.std() < 9.0


# ---------------------------------------------------------------------------------------------
# Violations: each is what it claims, starts after the first third, is clearly visible


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("violation", VIOLATIONS)
def test_violations_start_after_the_first_third(spec, violation):
    for seed in range(8):
        clip = clip_for(spec, violation, seed=seed)
        physical, violated = violated_trajectory(clip, spec)
        onset = clip.truth["violation_frame"]
        assert spec.frames / 3 <= onset <= spec.frames - 2
        assert np.array_equal(physical.positions[:onset], violated.positions[:onset])
        assert physical.colours[:onset] == violated.colours[:onset]
        changed = [k for k in range(spec.frames)
                   if not np.allclose(physical.positions[k], violated.positions[k]) or physical.colours[k] != violated.colours[k]]
        assert changed and changed[0] == onset


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_teleport_jumps_sideways(spec):
    for seed in range(8):
        clip = clip_for(spec, "teleport", seed=seed)
        physical, violated = violated_trajectory(clip, spec)
        k = clip.truth["violation_frame"]
        jump = violated.positions[k:, 0, 0] - physical.positions[k:, 0, 0]
        assert np.allclose(jump, jump[0]) and TELEPORT_RANGE[0] <= abs(jump[0]) <= TELEPORT_RANGE[1]
        assert in_frame(violated.positions, spec)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_colour_change_swaps_to_another_palette_colour(spec):
    for seed in range(8):
        clip = clip_for(spec, "colour_change", seed=seed)
        _, violated = violated_trajectory(clip, spec)
        k, before, after = clip.truth["violation_frame"], violated.colours[0], violated.colours[-1]
        assert set(before) != set(after) and len(set(after)) == len(after) and set(after) <= set(PALETTE)
        # the rendered clip shows the old colour exactly at a ball centre before, the new one after
        for frame, names in ((0, before), (spec.frames - 1, after)):
            for (x, y), name in zip(violated.positions[frame], names, strict=True):
                pixel = clip.frames[frame, int(y * spec.size), int(x * spec.size)]
                assert tuple(int(c) for c in pixel) == PALETTE[name]
        assert violated.colours[k] == after


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_stop_midair_freezes_a_moving_ball_in_the_air(spec):
    for seed in range(8):
        clip = clip_for(spec, "stop_midair", seed=seed)
        physical, violated = violated_trajectory(clip, spec)
        k = clip.truth["violation_frame"]
        assert spec.frames - k >= 3  # the ball hangs still for >= 3 frames after its last move
        assert np.all(violated.positions[k:, 0] == violated.positions[k - 1, 0])
        assert np.all(clip.frames[k:] == clip.frames[k - 1])
        assert spec.rest_y - violated.positions[k - 1, 0, 1] >= 0.2  # in mid-air
        assert not np.allclose(physical.positions[k - 2, 0], physical.positions[k - 1, 0])  # it was moving
        assert np.abs(physical.positions[k:, 0] - violated.positions[k:, 0]).max() >= 0.25


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_anti_gravity_makes_a_ball_float_up(spec):
    for seed in range(8):
        clip = clip_for(spec, "anti_gravity", seed=seed)
        physical, violated = violated_trajectory(clip, spec)
        k = clip.truth["violation_frame"]
        y = violated.positions[k - 1:, 0, 1]
        assert y[-1] <= y.max() - 0.25  # it climbs a quarter of the frame with no bounce
        assert np.all(y[1:] < spec.rest_y)  # never touching the floor
        assert np.diff(y)[-1] < np.diff(y)[0]  # accelerating upward
        assert in_frame(violated.positions, spec)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_pass_through_floor_sinks_the_ball(spec):
    for seed in range(8):
        clip = clip_for(spec, "pass_through_floor", seed=seed)
        physical, violated = violated_trajectory(clip, spec)
        k = clip.truth["violation_frame"]
        assert np.all(physical.positions[:k, 0, 1] <= spec.rest_y + 1e-9)
        assert violated.positions[k, 0, 1] > spec.rest_y  # below where it would have bounced
        assert violated.positions[-1, 0, 1] >= spec.rest_y + 0.15
        assert np.all(np.diff(violated.positions[k - 1:, 0, 1]) > 0)  # still falling


# ---------------------------------------------------------------------------------------------
# Defects


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_defects_are_what_they_claim(spec, tmp_path):
    clean = clip_for(spec, seed=4)
    for defect in DEFECTS:
        clip = clip_for(spec, defect=defect, seed=4)
        assert clip.truth["defect"] == defect and clip.truth["plausible"]
        if defect == "static":
            assert np.all(clip.frames == clip.frames[0]) and len(clip.frames) == spec.frames
        elif defect == "too_short":
            assert len(clip.frames) <= 3 and clip.truth["num_frames"] == len(clip.frames)
        elif defect == "flicker":
            brightness = clip.frames.reshape(spec.frames, -1).mean(1)
            ratio = brightness[1:] / brightness[:-1]
            assert np.all((ratio > 1.5) | (ratio < 1 / 1.5))
        elif defect == "blur":
            assert _sharpness(clip.frames) < 0.3 * _sharpness(clean.frames)
        elif defect == "scene_cut":
            half = spec.frames // 2
            assert np.array_equal(clip.frames[:half], clean.frames[:half])
            assert not _palette_colours(clip.frames[0]) & _palette_colours(clip.frames[-1])
        elif defect == "caption_mismatch":
            assert not facts_agree(parse_caption(clip.caption), scene_facts(clip.scene, spec))
            assert clip.truth["caption_matches"] is False and np.array_equal(clip.frames, clean.frames)
        elif defect == "corrupt":
            assert clip.frames is None and clip.truth["num_frames"] == 0
        if defect != "caption_mismatch":
            assert clip.caption == clean.caption and clip.truth["caption_matches"] is True


def _sharpness(frames: np.ndarray) -> float:
    """Mean variance of the Laplacian: high for crisp edges."""
    return float(np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in frames]))


def _palette_colours(frame: np.ndarray) -> set[str]:
    """Palette colours present exactly (ball centres of a clean render)."""
    pixels = {tuple(int(c) for c in p) for p in frame.reshape(-1, 3)}
    return {name for name, rgb in PALETTE.items() if rgb in pixels}


def test_corrupt_bytes_look_like_mp4_but_do_not_decode(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        data = corrupt_bytes(rng)
        assert data[4:8] == b"ftyp"
        path = tmp_path / f"bad{i}.mp4"
        path.write_bytes(data)
        assert not probe_video(path).readable


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="one of"):
        make_clip(np.random.default_rng(0), WorldSpec(), "levitation")
    with pytest.raises(ValueError, match="one of"):
        make_clip(np.random.default_rng(0), WorldSpec(), None, "smudge")
