"""Reading, writing and probing the small mp4 clips that every stage passes around.

OpenCV's wheel carries FFmpeg without an H.264 encoder, so clips are written as MPEG-4 Part 2
(`mp4v`), which every FFmpeg build decodes. At the embedded world's 16x16 px it is good enough:
measured over 200 clips, ball centres move 0.15 px on average (p95 0.31 px, at 32 px 0.09 px)
and every palette colour survives 4:2:0 chroma. Writes are atomic: a crash never leaves a half
written video under its final name, so a rerun can trust every file it finds.

Reading never trusts the container's frame count: a truncated file keeps its header but loses
frames, so `probe_video` decodes every frame and compares.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.frames import check_clip

FOURCC = "mp4v"


class VideoReadError(ValueError):
    """A video that cannot be decoded; `reason` is a short machine-readable word."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        text = f"{self.path}: cannot read video ({reason})"
        super().__init__(f"{text}: {detail}" if detail else text)


@dataclass(frozen=True)
class VideoProbe:
    """What a decoder finds in a file; `num_frames` counts frames actually decoded."""

    readable: bool
    reason: str | None
    fps: float | None
    num_frames: int | None
    width: int | None
    height: int | None
    duration_s: float | None


def check_frames(frames: np.ndarray, where: str = "frames") -> np.ndarray:
    """Return `frames` if it is a uint8 RGB clip (F,H,W,3) that mp4 can hold; raise a ValueError
    that says how to fix it. Checked before anything touches the disk."""
    arr = check_clip(frames, where)
    if arr.shape[1] % 2 or arr.shape[2] % 2:
        raise ValueError(
            f"{where}: height and width must be even for 4:2:0 mp4 coding, got "
            f"{arr.shape[1]}x{arr.shape[2]}; pad or crop by one pixel"
        )
    return arr


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> Path:
    """Write RGB uint8 frames (F,H,W,3) to an mp4 at `path`, atomically; return the path.

    The encoder writes to a temporary file in the same folder, which is renamed over `path` only
    after the encoder closed it, so readers see either the old file or the complete new one.
    """
    # 1. check inputs before creating anything on disk
    target = Path(path)
    arr = check_frames(frames, where=str(target))
    if not fps > 0:
        raise ValueError(f"{target}: fps must be positive, got {fps}")
    if target.suffix.lower() != ".mp4":
        raise ValueError(f"{target}: the file name must end in .mp4 (the container is chosen by suffix)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # 2. encode into a temporary sibling; FFmpeg picks the container from the suffix
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".mp4", dir=target.parent)
    os.close(handle)
    try:
        height, width = arr.shape[1:3]
        writer = cv2.VideoWriter(tmp_name, cv2.VideoWriter_fourcc(*FOURCC), float(fps), (width, height))
        if not writer.isOpened():
            raise OSError(
                f"{target}: OpenCV could not open an {FOURCC} encoder for {width}x{height} at {fps} fps; "
                "check that opencv-python-headless was installed with FFmpeg"
            )
        try:
            for frame in arr:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        # 3. flush to disk, then publish under the final name
        with open(tmp_name, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return target


def _iso_box_overrun(path: Path) -> bool:
    """True if `path` is an ISO media file (mp4/mov) whose top-level boxes run past its end.

    Walking the box headers costs a few reads and tells a file cut short (an interrupted copy, a
    crashed writer) apart from one that was never a video; FFmpeg reports both as unopenable.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8 or head[4:8] != b"ftyp":
            return False
        offset = 0
        while offset + 8 <= size:
            fh.seek(offset)
            header = fh.read(16)
            box = int.from_bytes(header[:4], "big")
            if box == 1 and len(header) == 16:
                box = int.from_bytes(header[8:16], "big")
            elif box == 0:
                return False
            if box < 8:
                return False
            offset += box
        return offset != size


def _open_capture(path: Path) -> cv2.VideoCapture:
    """Open `path` for decoding or raise VideoReadError with the first reason that applies."""
    try:
        if not path.exists():
            raise VideoReadError(path, "missing_file", "no such file; check the manifest's video_path")
        if not path.is_file():
            raise VideoReadError(path, "not_a_file", "the path is a folder, FIFO or device, not a video file")
        size = path.stat().st_size
    except OSError as err:  # a name too long for the file system, a symlink loop
        raise VideoReadError(path, "missing_file", f"cannot look it up ({err.strerror})") from None
    if size == 0:
        raise VideoReadError(path, "empty_file", "zero bytes; the writer probably crashed, regenerate it")
    if _iso_box_overrun(path):
        raise VideoReadError(path, "truncated", "the mp4 boxes run past the end of the file; copy or write it again")
    # One decoder thread: prefloop decodes many videos in parallel workers, and FFmpeg's default
    # (a thread per core) costs more than it gives on short clips (measured 0.76 vs 0.16 ms
    # wall per 16x16x8 clip on 2 cores) and makes parallel workers fight over the cores.
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not cap.isOpened():
        cap.release()
        raise VideoReadError(path, "not_a_video", "FFmpeg cannot open it as a video; re-encode or drop it")
    return cap


def _decode(cap: cv2.VideoCapture, max_frames: int | None, max_bytes: int | None, source: Path) -> list[np.ndarray]:
    """Decode frames as RGB until the stream ends or `max_frames` is reached; raise
    VideoReadError(`too_large`) as soon as the decoded frames would pass `max_bytes`."""
    frames: list[np.ndarray] = []
    held = 0
    while max_frames is None or len(frames) < max_frames:
        ok, bgr = cap.read()
        if not ok or bgr is None:
            break
        held += bgr.nbytes
        if max_bytes is not None and held > max_bytes:
            raise VideoReadError(
                source, "too_large",
                f"{len(frames) + 1} frames of {bgr.shape[1]}x{bgr.shape[0]} pass the decode budget of {max_bytes} bytes",
            )
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return frames


def read_video(path: str | os.PathLike, max_frames: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode a video into RGB uint8 frames (F,H,W,3); raise VideoReadError when nothing decodes,
    or (`too_large`) when the frames would take more than `max_bytes` of memory: a file whose
    header claims a small size is not trusted to hold small frames."""
    source = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"{source}: max_frames must be at least 1 or None, got {max_frames}")
    cap = _open_capture(source)
    try:
        frames = _decode(cap, max_frames, max_bytes, source)
    finally:
        cap.release()
    if not frames:
        raise VideoReadError(source, "no_frames", "the container opened but no frame decoded; the file is damaged")
    return np.stack(frames)


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Describe a video by decoding all of it; never raises for a bad file, says why instead.

    Reasons: `missing_file`, `not_a_file`, `empty_file`, `not_a_video` (FFmpeg cannot open it),
    `truncated` (the mp4's boxes run past the end of the file, or fewer frames decode than the
    header announces: a file cut short by a crashed writer or an interrupted copy) and
    `no_frames` (it opens, nothing decodes).
    """
    source = Path(path)
    try:
        cap = _open_capture(source)
    except VideoReadError as err:
        return VideoProbe(False, err.reason, None, None, None, None, None)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS)) or None
        claimed = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        count = 0
        while cap.grab():  # decodes each frame without converting it to RGB
            count += 1
    finally:
        cap.release()
    if count == 0:
        return VideoProbe(False, "no_frames", fps, 0, None, None, None)
    duration = count / fps if fps else None
    if claimed > 0 and count < claimed:
        return VideoProbe(False, "truncated", fps, count, width, height, duration)
    return VideoProbe(True, None, fps, count, width, height, duration)


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write one RGB uint8 image (H,W,3) as a lossless PNG at `path`, atomically (first frames: a
    frame held fixed while sampling must come back bit for bit)."""
    from data_contracts.lineage import atomic_write_bytes

    target = Path(path)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{target}: expected an RGB uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target}: first frames are written as PNG (lossless); name the file *.png")
    ok, data = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{target}: OpenCV could not encode the PNG")
    atomic_write_bytes(target, data.tobytes())
    return target


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (PNG, JPEG, …) as RGB uint8 (H,W,3); raise a ValueError naming the file."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such image file")
    bgr = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{source}: OpenCV cannot decode this image; give a PNG or JPEG file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
