"""open_clip for videos: the text–video similarity of `select`, and the tiny CLIP of the embedded world.

A real run names an open_clip architecture and its pretrained weights (a tag such as
`laion2b_s34b_b79k`, or a local file). An image CLIP sees a video as frames sampled at a fixed
rate, embedded one by one and averaged (`mean`), the usual way to score a video with an image
model.

The embedded world cannot download anything, so `bootstrap` trains a tiny CLIP from scratch on
the ingested clips (`train_clip`). Its config is registered with open_clip under a prefloop
name, its weights are saved as safetensors in open_clip's own folder layout (`save_clip`), and
`select` loads it back by path through the same `open_clip.create_model(name, pretrained=...)`
call a real run uses (`load_clip`): the loading code the tests exercise is the production code.

A mean of frame embeddings forgets the order of the frames, and with it which way a ball rolls.
The tiny model therefore sees a `storyboard`: the clip's frames tiled into one image in time
order, so the image tower can read motion and direction from where each tile's ball sits.
Measured on 400 held-out world clips after the same training (2,000 clips, 400 steps): the
storyboard prefers a clip's own caption to the one with the direction flipped 99.5 % of the
time, the mean of frames 72 % (a thrown ball's arc gives its direction away, a rolling ball's
does not); caption retrieval among the world's 60 captions, bounce counts aside, 99 % vs 75 %.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save as safetensors_bytes

from data_contracts.lineage import atomic_write_bytes, atomic_write_json
from models.frames import check_clip

logger = logging.getLogger(__name__)

MODEL_NAME = "prefloop-tiny-clip"
# open_clip's own folder layout (what `local-dir:` and the hub read), so a saved tiny CLIP is an
# ordinary open_clip checkpoint; prefloop's additions sit under their own key in the config.
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PREFLOOP_KEY = "prefloop"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PRECISIONS = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16"}


# ---------------------------------------------------------------------------------------------
# 1. Configs


class VideoInput(BaseModel):
    """How a video becomes the image tower's input; saved with the checkpoint, used at inference."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["mean", "storyboard"] = Field(
        "mean",
        description="`mean`: embed sampled frames one by one and average (pretrained image CLIPs); "
        "`storyboard`: tile the frames into one image in time order (a model trained to read motion)",
    )
    frames: int = Field(
        8,
        ge=1,
        le=64,
        description="frames taken from a video: at most this many for `mean`, "
        "exactly rows x cols for `storyboard` (CLIP4Clip-style video scoring uses ~8-12)",
    )
    sample_fps: float | None = Field(
        2.0,
        gt=0,
        description="`mean`: take frames at this rate when the caller "
        "gives the video's fps (at most `frames`, evenly spread); otherwise evenly spread",
    )
    grid: tuple[int, int] = Field(
        (2, 4), description="`storyboard`: rows x cols of tiles, filled row by row in time order"
    )
    batch_size: int = Field(64, ge=1, description="videos per forward pass at inference")

    @model_validator(mode="after")
    def _grid_holds_the_frames(self) -> VideoInput:
        rows, cols = self.grid
        if rows < 1 or cols < 1:
            raise ValueError(f"VideoInput.grid must be positive rows x cols, got {self.grid}")
        if self.mode == "storyboard" and rows * cols != self.frames:
            raise ValueError(
                f"VideoInput: a storyboard of grid {self.grid} holds {rows * cols} frames but "
                f"frames={self.frames}; set frames to rows x cols"
            )
        return self


class TinyClipConfig(BaseModel):
    """The tiny CLIP of the embedded world and how it is trained (sized for 2 CPU cores)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(MODEL_NAME, description="name the architecture is registered under in open_clip")
    frame_size: int = Field(16, ge=8, description="side of one frame in the image tower's input: the world's 16 px")
    video: VideoInput = Field(
        VideoInput(mode="storyboard", frames=8, grid=(2, 4), sample_fps=None),
        description="storyboard: time order visible, so direction can be learned (measured)",
    )
    embed_dim: int = Field(64, ge=8, description="shared embedding size; a few hundred captions need no more")
    width: int = Field(64, ge=16, description="transformer width of both towers")
    layers: int = Field(2, ge=1, description="transformer layers of each tower (the STYLE's tiny models)")
    head_width: int = Field(32, ge=8, description="channels per attention head (width / head_width heads)")
    patch_size: int = Field(
        8, ge=1, description="8 px patches, 2 x 2 per 16 px frame: as good as 4 px on held-out clips, ~5x faster"
    )
    context_length: int = Field(24, ge=8, description="tokens per caption; the world's longest caption has 15")
    steps: int = Field(400, ge=1, description="optimizer steps; held-out direction 99.5 % here, 96 % at 200")
    batch_size: int = Field(
        128, ge=2, description="clips per step; in-batch negatives teach direction (64 measured worse)"
    )
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate; high, as for a small model from scratch")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay, CLIP's 0.1 (Radford et al. 2021)")
    warmup_steps: int = Field(40, ge=0, description="linear warm-up before the cosine decay (10 % of the steps)")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm; keeps the early steps of a fresh model stable")

    @model_validator(mode="after")
    def _shapes_fit(self) -> TinyClipConfig:
        if not _NAME.match(self.model_name):
            raise ValueError(
                f"TinyClipConfig.model_name {self.model_name!r} must be letters, digits, '.', '_' or '-' "
                "(it becomes a file name in open_clip's config registry)"
            )
        if self.frame_size % self.patch_size:
            raise ValueError(
                f"TinyClipConfig: frame_size {self.frame_size} must be a multiple of patch_size "
                f"{self.patch_size}, so patches never straddle two frames of a storyboard"
            )
        if self.width % self.head_width:
            raise ValueError(f"TinyClipConfig: width {self.width} must be a multiple of head_width {self.head_width}")
        return self

    def image_size(self) -> tuple[int, int]:
        """(height, width) of one image-tower input: a storyboard of tiles, or one frame."""
        if self.video.mode == "storyboard":
            rows, cols = self.video.grid
            return rows * self.frame_size, cols * self.frame_size
        return self.frame_size, self.frame_size

    def open_clip_config(self) -> dict:
        """The open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`) of this tiny CLIP."""
        heads = self.width // self.head_width
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": list(self.image_size()),
                "layers": self.layers,
                "width": self.width,
                "head_width": self.head_width,
                "patch_size": self.patch_size,
                "mlp_ratio": 2.0,
            },
            # open_clip's BPE tokenizer ships in the wheel and needs its full 49,408-token vocabulary
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.width,
                "heads": heads,
                "layers": self.layers,
                "mlp_ratio": 2.0,
            },
        }


# ---------------------------------------------------------------------------------------------
# 2. Registering an architecture with open_clip


@cache
def _registry_dir() -> Path:
    """A folder of this process's registered configs: open_clip's registry reads config files."""
    path = Path(tempfile.mkdtemp(prefix="prefloop-open_clip-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def register_model_config(model_name: str, model_cfg: dict) -> None:
    """Make `model_name` an open_clip architecture, so `create_model(model_name, ...)` and
    `get_tokenizer(model_name)` find it like a built-in one.

    `open_clip.add_model_config` takes a JSON file named after the model; the file stays for the
    process's lifetime because open_clip rescans its config paths whenever one is added.
    Registering the same name again replaces its config.
    """
    if not _NAME.match(model_name):
        raise ValueError(f"model name {model_name!r} must be letters, digits, '.', '_' or '-'")
    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(
            f"open_clip config for {model_name!r} needs `embed_dim`, `vision_cfg` and `text_cfg`, "
            f"got keys {sorted(model_cfg)}"
        )
    path = _registry_dir() / f"{model_name}.json"
    atomic_write_json(path, model_cfg)
    open_clip.add_model_config(path)


# ---------------------------------------------------------------------------------------------
# 3. From frames to the image tower's input


def frame_indices(num_frames: int, video: VideoInput, fps: float | None = None) -> np.ndarray:
    """Which frames of a `num_frames`-frame video the model sees, in time order.

    A storyboard always takes `video.frames` evenly spread frames (repeating frames of a short
    clip), so every tile means the same moment of every clip. `mean` takes frames every
    1/`sample_fps` seconds when the video's fps is known, at most `video.frames` of them.
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if video.mode == "storyboard":
        return np.rint(np.linspace(0, num_frames - 1, video.frames)).astype(int)
    if fps is not None and video.sample_fps is not None:
        idx = np.arange(0.0, num_frames, max(1.0, fps / video.sample_fps)).astype(int)
        if len(idx) <= video.frames:
            return idx
    count = min(video.frames, num_frames)
    return np.rint(np.linspace(0, num_frames - 1, count)).astype(int)


def _resize(images: torch.Tensor, size: tuple[int, int], preprocess_cfg: dict) -> torch.Tensor:
    """Float (N, 3, h, w) images to `size` as open_clip's preprocessing does (`resize_mode`
    shortest: scale and centre-crop; longest: scale and pad; squash: stretch)."""
    h, w = images.shape[-2:]
    if (h, w) == tuple(size):
        return images
    mode = preprocess_cfg.get("interpolation", "bicubic")
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    antialias = mode in ("bilinear", "bicubic")

    def scale(x: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(
            x, size=out, mode=mode, antialias=antialias, **({} if mode == "nearest" else {"align_corners": False})
        )

    if resize_mode == "squash":
        return scale(images, size).clamp(0.0, 1.0)
    factor = (max if resize_mode == "shortest" else min)(size[0] / h, size[1] / w)
    scaled = scale(images, (max(1, round(h * factor)), max(1, round(w * factor)))).clamp(0.0, 1.0)
    sh, sw = scaled.shape[-2:]
    if resize_mode == "shortest":
        top, left = (sh - size[0]) // 2, (sw - size[1]) // 2
        return scaled[..., top : top + size[0], left : left + size[1]]
    fill = preprocess_cfg.get("fill_color", 0) / 255.0
    out = torch.full((*scaled.shape[:-2], *size), float(fill), dtype=scaled.dtype)
    top, left = (size[0] - sh) // 2, (size[1] - sw) // 2
    out[..., top : top + sh, left : left + sw] = scaled
    return out


def video_images(
    frames: np.ndarray, video: VideoInput, image_size: tuple[int, int], preprocess_cfg: dict, fps: float | None = None
) -> torch.Tensor:
    """The normalised image-tower inputs (K, 3, H, W) of one video: K = 1 storyboard, or K frames."""
    picked = torch.from_numpy(np.ascontiguousarray(frames[frame_indices(len(frames), video, fps)]))
    x = picked.permute(0, 3, 1, 2).float() / 255.0
    if video.mode == "storyboard":
        rows, cols = video.grid
        th, tw = image_size[0] // rows, image_size[1] // cols
        tiles = _resize(x, (th, tw), preprocess_cfg)
        x = tiles.reshape(rows, cols, 3, th, tw).permute(2, 0, 3, 1, 4).reshape(1, 3, rows * th, cols * tw)
    else:
        x = _resize(x, image_size, preprocess_cfg)
    mean = torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_video_images(model: torch.nn.Module, images: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Unit video embeddings (B, D) from the concatenated images of B videos (`counts` images
    each): the mean of each video's unit image embeddings, normalised again (for a storyboard,
    one image per video, this is just its embedding)."""
    emb = model.encode_image(images, normalize=True)
    if all(c == 1 for c in counts):
        return emb
    owner = torch.repeat_interleave(
        torch.arange(len(counts), device=emb.device), torch.as_tensor(counts, device=emb.device)
    )
    sums = torch.zeros(len(counts), emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, owner, emb)
    return F.normalize(sums, dim=-1)


def _check_frames(frames_list: Sequence[np.ndarray]) -> None:
    for i, frames in enumerate(frames_list):
        check_clip(frames, f"frames_list[{i}]")


# ---------------------------------------------------------------------------------------------
# 4. The video–text model


class VideoCLIP:
    """An open_clip model, its tokenizer and its video input: unit video and caption embeddings
    and their per-pair cosine similarity, in batches, without gradients."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        model_name: str,
        model_cfg: dict,
        video: VideoInput,
        input_dtype: torch.dtype = torch.float32,
        train_info: dict | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_cfg = model_cfg
        self.video = video
        self.train_info = dict(train_info or {})
        # open_clip's low-precision models keep norms in float32 but want images in their dtype
        self.device, self.dtype = next(model.parameters()).device, input_dtype

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def preprocess_cfg(self) -> dict:
        return self.model.visual.preprocess_cfg

    def embed_videos(self, frames_list: Sequence[np.ndarray], fps: float | None = None) -> np.ndarray:
        """L2-normalised embeddings (N, D) of videos given as uint8 RGB frames (F, H, W, 3);
        `fps` (the videos' frame rate) lets `mean` sample at its fixed rate."""
        _check_frames(frames_list)
        out = []
        with torch.inference_mode():
            for start in range(0, len(frames_list), self.video.batch_size):
                chunk = [
                    video_images(f, self.video, self.image_size, self.preprocess_cfg, fps)
                    for f in frames_list[start : start + self.video.batch_size]
                ]
                images = torch.cat(chunk).to(self.device, self.dtype)
                out.append(encode_video_images(self.model, images, [len(c) for c in chunk]).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model_cfg["embed_dim"]), np.float32)

    def embed_texts(self, captions: Sequence[str]) -> np.ndarray:
        """L2-normalised caption embeddings (N, D)."""
        for i, text in enumerate(captions):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"captions[{i}] is {text!r}: every video needs a non-empty caption to score")
        out = []
        with torch.inference_mode():
            for start in range(0, len(captions), self.video.batch_size):
                tokens = self.tokenizer(list(captions[start : start + self.video.batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model_cfg["embed_dim"]), np.float32)

    def similarity(
        self, frames_list: Sequence[np.ndarray], captions: Sequence[str], fps: float | None = None
    ) -> np.ndarray:
        """Cosine similarity (N,) of each video with its own caption, in [-1, 1]."""
        if len(frames_list) != len(captions):
            raise ValueError(
                f"similarity needs one caption per video, got {len(frames_list)} videos and {len(captions)} captions"
            )
        return np.sum(self.embed_videos(frames_list, fps) * self.embed_texts(captions), axis=1)


# ---------------------------------------------------------------------------------------------
# 5. Training the tiny CLIP


def multi_positive_info_nce(
    video_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE in which every pair that shares a caption is a positive.

    With unit embeddings V, T (B, D), logits L = exp(logit_scale) · V Tᵀ and targets
    P_ij = 1[g_i = g_j] / #{k : g_k = g_i} (g: the caption's id):

        loss = ½ · mean_i [ −Σ_j P_ij log softmax_j(L_i·) ] + ½ · mean_j [ −Σ_i P_ij log softmax_i(L_·j) ]

    With distinct captions P = I and this is CLIP's loss (Radford et al. 2021). The world repeats
    captions, so a plain InfoNCE would push a clip away from the text of its own caption whenever
    another clip in the batch shares it; soft targets over equal captions (UniCL, Yang et al.
    2022) count those pairs as positives instead.
    """
    logits = logit_scale.exp() * video_emb @ text_emb.T
    same = (groups[:, None] == groups[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    video_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_video = -(targets * F.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return 0.5 * (video_to_text + text_to_video)


def _lr_factor(step: int, cfg: TinyClipConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_clip(
    frames_list: Sequence[np.ndarray], captions: Sequence[str], cfg: TinyClipConfig | None = None, seed: int = 0
) -> VideoCLIP:
    """A tiny CLIP trained contrastively from scratch on (clip, caption) pairs, on the CPU.

    The model is built by `open_clip.create_model` from the config registered under
    `cfg.model_name`, exactly as `load_clip` rebuilds it. Seeded: the same inputs, config and
    seed give the same weights (torch's global RNG is left as it was). Threads: torch's default.
    """
    cfg = cfg or TinyClipConfig()
    # 1. check inputs
    if len(frames_list) != len(captions):
        raise ValueError(
            f"train_clip needs one caption per clip, got {len(frames_list)} clips and {len(captions)} captions"
        )
    distinct = sorted(set(captions))
    if len(distinct) < 2:
        raise ValueError(f"train_clip needs at least two distinct captions to contrast, got {distinct}")
    _check_frames(frames_list)
    started = time.perf_counter()
    # 2. the architecture, registered with open_clip and built through it, seeded
    model_cfg = cfg.open_clip_config()
    register_model_config(cfg.model_name, model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(cfg.model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    clip = VideoCLIP(model, tokenizer, cfg.model_name, model_cfg, cfg.video)
    # 3. every input once: image-tower inputs, tokens and caption ids
    per_video = [video_images(f, cfg.video, clip.image_size, clip.preprocess_cfg) for f in frames_list]
    counts = torch.tensor([len(v) for v in per_video])
    offsets = torch.cumsum(counts, 0) - counts
    images = torch.cat(per_video)
    tokens = tokenizer(list(captions))
    group_of = {text: i for i, text in enumerate(distinct)}
    groups = torch.tensor([group_of[c] for c in captions])

    # 4. AdamW without decay on gains, biases and the temperature (as open_clip's trainer)
    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name

    no_decay = [p for n, p in model.named_parameters() if exempt(n, p)]
    decay = [p for n, p in model.named_parameters() if not exempt(n, p)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    batch = min(cfg.batch_size, len(captions))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(cfg.steps):
        # 5. the next batch of an epoch-wise shuffle
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(captions), generator=generator)])
        idx, order = order[:batch], order[batch:]
        picked = torch.cat([torch.arange(offsets[i], offsets[i] + counts[i]) for i in idx.tolist()])
        # 6. one contrastive step; the temperature stays within CLIP's cap of 100
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        video_emb = encode_video_images(model, images[picked], counts[idx].tolist())
        text_emb = model.encode_text(tokens[idx], normalize=True)
        loss = multi_positive_info_nce(video_emb, text_emb, model.logit_scale, groups[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info("tiny CLIP step %d/%d: loss %.4f", step + 1, cfg.steps, loss.item())
    model.eval()
    clip.train_info = {
        "steps": cfg.steps,
        "clips": len(captions),
        "distinct_captions": len(distinct),
        "seed": seed,
        "final_loss": float(loss.item()),
        "seconds": round(time.perf_counter() - started, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": cfg.model_dump(mode="json"),
    }
    return clip


# ---------------------------------------------------------------------------------------------
# 6. Saving and loading


def save_clip(clip: VideoCLIP, out_dir: str | Path) -> Path:
    """Write `clip` as an open_clip checkpoint folder and return the folder.

    `open_clip_model.safetensors` holds the weights (no pickle); `open_clip_config.json` holds
    open_clip's `model_cfg` and `preprocess_cfg` (so `create_model("local-dir:<folder>")` reads it
    too) and, under `prefloop`, the model name, the video input and how it was trained. The
    config is written last: a folder with a config has complete weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in clip.model.state_dict().items()}
    atomic_write_bytes(
        out / WEIGHTS_FILE, safetensors_bytes(state, metadata={"format": "pt", "model_name": clip.model_name})
    )
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in clip.preprocess_cfg.items()}
    atomic_write_json(
        out / CONFIG_FILE,
        {
            "model_cfg": clip.model_cfg,
            "preprocess_cfg": preprocess,
            PREFLOOP_KEY: {
                "model_name": clip.model_name,
                "video": clip.video.model_dump(mode="json"),
                "train": clip.train_info,
            },
        },
    )
    return out


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_clip(
    model_name: str,
    pretrained: str | Path,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    video: VideoInput | None = None,
) -> VideoCLIP:
    """An open_clip model and its tokenizer, by `open_clip.create_model(model_name, pretrained=...)`.

    `pretrained` is an open_clip tag (a real run: open_clip downloads or finds it in its cache),
    a weights file, or a folder written by `save_clip`. A folder's (or a file's neighbouring)
    `open_clip_config.json` registers the architecture under `model_name` first and supplies the
    preprocessing and the video input. `device` may be `auto` (CUDA when present); `dtype` is
    float32, bfloat16 or float16. `video` overrides the saved video input (default `mean`).
    """
    # 1. check inputs
    if not pretrained:
        raise ValueError(
            f"load_clip({model_name!r}): name pretrained weights (an open_clip tag or a path); "
            "a randomly initialised CLIP scores nothing"
        )
    if dtype not in _PRECISIONS:
        raise ValueError(f"load_clip: dtype {dtype!r} is not one of {sorted(_PRECISIONS)}")
    path = Path(pretrained)
    local = path.exists()
    if not local and (len(path.parts) > 1 or path.suffix in (".safetensors", ".bin", ".pt", ".pth")):
        raise FileNotFoundError(
            f"load_clip: {pretrained} does not exist; pass a folder written by save_clip, "
            "a weights file, or an open_clip pretrained tag"
        )
    # 2. a local checkpoint: its config, registered under the given name
    saved: dict = {}
    weights = str(pretrained)
    force_preprocess = None
    if local:
        folder = path if path.is_dir() else path.parent
        weights = str(folder / WEIGHTS_FILE) if path.is_dir() else str(path)
        if not weights.endswith(".safetensors"):
            raise ValueError(
                f"load_clip: {weights} is not a .safetensors file; local open_clip weights load only as "
                "safetensors (a pickled .pt/.bin can run code when loaded): convert it with safetensors.torch.save_file"
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"load_clip: no {WEIGHTS_FILE} in {folder}; pass a folder written by save_clip "
                "or the weights file itself"
            )
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            saved = config.get(PREFLOOP_KEY, {})
            if saved.get("model_name", model_name) != model_name:
                raise ValueError(
                    f"load_clip: {folder} holds model {saved['model_name']!r}, not {model_name!r}; "
                    f"call load_clip({saved['model_name']!r}, {str(pretrained)!r})"
                )
            if "model_cfg" not in config:
                raise ValueError(f"load_clip: {config_path} has no `model_cfg`; write checkpoints with save_clip")
            register_model_config(model_name, config["model_cfg"])
            force_preprocess = {k: v for k, v in config.get("preprocess_cfg", {}).items() if k != "size"} or None
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"load_clip: {model_name!r} is not an open_clip architecture and {pretrained!r} brings no "
            f"{CONFIG_FILE}; name one of open_clip.list_models() or a folder written by save_clip"
        )
    # 3. the model, the same call for a tag and a path
    model = open_clip.create_model(
        model_name,
        pretrained=weights,
        device=_resolve_device(device),
        precision=_PRECISIONS[dtype],
        force_preprocess_cfg=force_preprocess,
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    chosen = video or (VideoInput.model_validate(saved["video"]) if "video" in saved else VideoInput())
    return VideoCLIP(
        model,
        tokenizer,
        model_name,
        open_clip.get_model_config(model_name),
        chosen,
        open_clip.get_input_dtype(_PRECISIONS[dtype]) or torch.float32,
        saved.get("train", {}),
    )
