"""The one frame-array convention every model and stage shares: uint8 RGB clips (F, H, W, 3)."""

from __future__ import annotations

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
