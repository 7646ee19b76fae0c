"""The one frame-array convention every model and stage shares: uint8 RGB clips (F, H, W, 3)."""

from __future__ import annotations

import cv2
import numpy as np


def check_clip(frames: object, where: str = "frames") -> np.ndarray:
    """Return `frames` as an array if it is a uint8 RGB clip (F, H, W, 3) with F ≥ 1; else raise a
    ValueError that says where and how to fix it (models and encoders misbehave quietly on float
    pixels, alpha channels or missing frame axes)."""
    if frames is None:
        raise ValueError(f"{where} is None (an undecodable video); pass only videos that decode")
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"{where}: expected an RGB clip of shape (frames, height, width, 3), got {arr.shape}; "
            "stack the frames with np.stack and drop any alpha channel"
        )
    if arr.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected dtype uint8, got {arr.dtype}; "
            "scale to 0..255 and convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: the clip has no frames; give at least one frame")
    return arr


def resize_short_side(frames: np.ndarray, side: int, upscale: bool) -> np.ndarray:
    """Frames (F,H,W) or (F,H,W,3) resized so their short side is `side` (area-averaged down,
    bilinear up); unchanged when already that size, or smaller and `upscale` is False."""
    height, width = frames.shape[1:3]
    scale = side / min(height, width)
    if scale == 1.0 or (scale > 1.0 and not upscale):
        return frames
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, size, interpolation=interpolation) for f in frames])


def to_grey(frames: np.ndarray) -> np.ndarray:
    """uint8 luma (Rec. 601, as OpenCV) of RGB frames (F,H,W,3) -> (F,H,W)."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


def farneback(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Dense Farneback flow (H, W, 2) in px between two uint8 grey frames (pyramid 0.5, 3 levels,
    9 px window, 3 iterations, poly_n 5, σ 1.1): the settings select's motion score and the video
    metrics share."""
    return cv2.calcOpticalFlowFarneback(first, second, None, 0.5, 3, 9, 3, 5, 1.1, 0)
