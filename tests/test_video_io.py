"""Writing, reading and probing mp4 clips, including the broken files a crawl brings home."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.physics_world import PALETTE, Ball, Scene, WorldSpec, render_clip
from tasks.video_io import VideoProbe, VideoReadError, probe_video, read_video, write_video


def moving_block(n: int = 8, size: int = 16) -> np.ndarray:
    """A grey block sliding right on a dark background: smooth enough for mp4 to keep."""
    frames = np.full((n, size, size, 3), 30, np.uint8)
    for i in range(n):
        frames[i, 4:10, i : i + 6] = (200, 200, 200)
    return frames


@pytest.fixture()
def clip_file(tmp_path):
    """A valid 24-frame mp4 and its frames."""
    frames = moving_block(24)
    return write_video(tmp_path / "clip.mp4", frames, 8.0), frames


def test_round_trip_keeps_shape_fps_and_content(clip_file):
    path, frames = clip_file
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # lossy, but close
    probe = probe_video(path)
    assert probe == VideoProbe(True, None, 8.0, 24, 16, 16, 3.0)


def test_read_stops_at_max_frames(clip_file):
    path, _ = clip_file
    assert read_video(path, max_frames=5).shape[0] == 5
    with pytest.raises(ValueError, match="max_frames"):
        read_video(path, max_frames=0)


def test_write_is_atomic_and_overwrites(tmp_path):
    target = tmp_path / "out" / "clip.mp4"
    write_video(target, moving_block(), 8)
    write_video(target, moving_block(12), 8)
    assert read_video(target).shape[0] == 12
    assert sorted(p.name for p in target.parent.iterdir()) == ["clip.mp4"]  # no temporary left behind


@pytest.mark.parametrize(
    "frames, match",
    [
        (np.zeros((4, 16, 16), np.uint8), "RGB clip of shape"),
        (np.zeros((4, 16, 16, 3), np.float32), "dtype uint8"),
        (np.zeros((0, 16, 16, 3), np.uint8), "no frames"),
        (np.zeros((4, 15, 16, 3), np.uint8), "must be even"),
    ],
)
def test_write_rejects_bad_frames_before_touching_disk(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        write_video(tmp_path / "bad.mp4", frames, 8)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_other_containers_and_bad_fps(tmp_path):
    with pytest.raises(ValueError, match="must end in .mp4"):
        write_video(tmp_path / "clip.avi", moving_block(), 8)
    with pytest.raises(ValueError, match="fps must be positive"):
        write_video(tmp_path / "clip.mp4", moving_block(), 0)


def _expect_unreadable(path, reason: str) -> None:
    probe = probe_video(path)
    assert (probe.readable, probe.reason) == (False, reason)
    with pytest.raises(VideoReadError) as err:
        read_video(path)
    assert err.value.reason == reason and str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_file(tmp_path):
    _expect_unreadable(tmp_path / "nowhere.mp4", "missing_file")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    _expect_unreadable(path, "empty_file")


def test_text_renamed_mp4_is_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are my notes, not a video\n" * 20)
    _expect_unreadable(path, "not_a_video")


@pytest.mark.parametrize("share", [0.3, 0.6, 0.95])
def test_truncated_mp4_is_detected(clip_file, tmp_path, share):
    """The first `share` of a valid file's bytes: the header survives, the frames do not."""
    path, _ = clip_file
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * share)])
    _expect_unreadable(cut, "truncated")


def test_small_balls_keep_their_colour_through_mp4(tmp_path):
    """4:2:0 chroma at 16x16: every palette colour, on a ~4.5 px ball, must still be its own hue.

    The centre pixel of each decoded ball is compared with every palette colour by hue; the
    nearest must be the ball's own, with the chroma (max - min) well above the background's.
    """
    spec = WorldSpec()
    hues = {name: _hue(np.asarray(rgb)) for name, rgb in PALETTE.items()}
    for name in PALETTE:
        scene = Scene("rolls", (Ball(name, 0.5, spec.rest_y, 0.3, 0.0, 0.6),))
        frames = render_clip(scene, spec)
        back = read_video(write_video(tmp_path / f"{name}.mp4", frames, spec.fps))
        for f in range(len(frames)):
            x = int((0.5 + 0.3 * f / spec.fps) * spec.size)
            pixel = back[f, int(spec.rest_y * spec.size), x]
            gaps = {other: min(abs(_hue(pixel) - h), 360 - abs(_hue(pixel) - h)) for other, h in hues.items()}
            assert min(gaps, key=gaps.get) == name, (name, f, pixel)
            assert int(pixel.max()) - int(pixel.min()) > 100, (name, f, pixel)


def _hue(rgb: np.ndarray) -> float:
    """Hue in degrees of one RGB triple (OpenCV's float HSV)."""
    pixel = np.asarray(rgb, np.float32).reshape(1, 1, 3)
    return float(cv2.cvtColor(pixel, cv2.COLOR_RGB2HSV)[0, 0, 0])
