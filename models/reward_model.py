"""A VideoReward-style multi-dimensional reward model (VideoAlign, Liu et al. 2025, arXiv 2501.13918).

One model scores a video for a prompt on VQ (visual quality), MQ (motion quality) and TA (text
alignment). Each dimension has its own reward token; VQ and MQ sit after the video and before
the prompt, TA after the prompt, and causal attention keeps VQ and MQ blind to the prompt
(`models/reward_backbones.py`). One shared linear head reads the three tokens' final hidden
states (ALGORITHMS.md §5).

- Training (`train_reward_model`, a pure function): Bradley-Terry with ties (Rao–Kupper, θ = 5)
  per dimension on pairwise A / B / tie labels, invalid labels masked (`models/btt.py`); AdamW;
  seeded. A held-out share of the pairs gives each dimension's z-normalisation statistics (stored
  with the checkpoint; overall = mean of the normalised dimensions) and the accuracy report of
  VideoAlign's protocol (`models/reward_metrics.py`).
- Frame rate: the model reads videos at `cfg.fps`, stored in the checkpoint. A faster clip is
  resampled to it (the nearest frame at each of the model's sample times); a slower one is an
  error, since frames cannot be invented.
- Noisy-latent variant (`noisy_latent=true`, for reward guidance, ALGORITHMS.md §7): trained on
  `x_t = (1-t)·x0 + t·ε` with one t and one ε per pair, shared by A and B (`noisy_pair`), with a
  timestep embedding added to the video tokens; `reward(x_t, t, prompts)` is differentiable in x_t.
- Checkpoint (`save_pretrained` / `from_pretrained`): `config.json` (this config and the backbone's
  architecture), `model.safetensors`, `normalisation.json` (statistics and fps) and, for the VLM
  backbone, peft's adapter files and the processor with the reward tokens. No pickle.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from data_contracts.lineage import atomic_write_bytes, atomic_write_json
from models.btt import INVALID, LABELS, TIE, A, B, btt_loss, encode_labels
from models.clip_model import TinyClipConfig
from models.reward_backbones import ClipBackbone, VlmBackbone
from models.reward_metrics import per_dimension_report, signs_from_labels

logger = logging.getLogger(__name__)

DIMENSIONS = ("VQ", "MQ", "TA")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORMALISATION_FILE = "normalisation.json"
FORMAT = "prefloop-reward-model"
FORMAT_VERSION = 1
MIN_STD = 1e-6  # a dimension whose held-out rewards are constant is not scaled up by 1/0

# ---------------------------------------------------------------------------------------------
# 1. Config


class RewardModelConfig(BaseModel):
    """The reward model's architecture and how it is trained; saved with every checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: Literal["clip", "vlm"] = Field(
        "clip",
        description="`clip`: open_clip towers + a temporal transformer (the embedded world, trains on a CPU); "
        "`vlm`: a Qwen2-VL-class VLM with LoRA, VideoReward's own backbone",
    )
    dims: tuple[str, ...] = Field(
        DIMENSIONS, min_length=1, description="reward dimensions, the output columns in order: VideoReward's three"
    )
    prompt_blind_dims: tuple[str, ...] = Field(
        ("VQ", "MQ"),
        description="dimensions whose token sits before the prompt: VideoReward keeps VQ and MQ blind to it",
    )
    theta: float = Field(5.0, gt=1.0, description="Rao–Kupper tie parameter θ of the BTT loss: VideoReward's 5")
    fps: float = Field(
        8.0,
        gt=0,
        description="frames per second the model reads, stored and enforced at inference: the world's 8 (every frame); "
        "VideoReward samples real videos at 2",
    )
    max_frames: int = Field(16, ge=1, le=1024, description="most frames per clip at `fps`: 2 s of world video")
    noisy_latent: bool = Field(
        False, description="train on x_t at sampled t, the pair sharing t and ε, for reward guidance (clip backbone)"
    )
    clip: TinyClipConfig = Field(
        TinyClipConfig(),
        description="the fresh tiny open_clip model when no init_clip is given: the world CLIP's 2x4 storyboard, "
        "so both read a clip alike (held-out MQ 0.90 vs 0.88 for per-frame images, measured)",
    )
    train_token_embedding: bool = Field(
        False,
        description="`clip`: train the text tower's 49,408-row BPE table too; off: ~95 % of the tiny model's "
        "weights, random rows already tell words apart, and its AdamW update dominates a CPU step",
    )
    width: int = Field(64, ge=8, description="temporal transformer width: the tiny CLIP's own width")
    layers: int = Field(2, ge=1, description="temporal transformer layers (the STYLE's tiny models)")
    head_width: int = Field(32, ge=4, description="channels per attention head (width / head_width heads)")
    vlm_model: str | None = Field(
        None, description="`vlm`: folder or hub id of the base VLM (e.g. Qwen/Qwen2-VL-2B-Instruct); no default"
    )
    lora_rank: int = Field(
        8, ge=1, description="`vlm`: LoRA rank on the language model's attention; small for a tiny model"
    )
    lora_alpha: float = Field(16.0, gt=0, description="`vlm`: LoRA alpha, 2 × rank as is usual")
    lora_target_modules: str = Field(
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
        description="`vlm`: peft regex of the adapted modules: the language model's attention, not the vision tower",
    )
    trust_remote_code: bool = Field(
        False, description="`vlm`: run Python shipped with the checkpoint; Qwen2-VL needs none"
    )
    local_files_only: bool = Field(True, description="`vlm`: never reach for the network; prefetch hub models")
    lr: float = Field(
        1e-3, gt=0, description="AdamW peak learning rate: high, for a tiny model from scratch (3e-3 diverged)"
    )
    steps: int = Field(
        300, ge=1, description="optimizer steps: held-out MQ 0.93 on 500 world pairs (tests/test_reward_model.py)"
    )
    warmup_steps: int = Field(
        20, ge=0, description="linear warm-up, then cosine decay to zero: a fresh model's first steps are noisy"
    )
    batch_size: int = Field(32, ge=1, description="pairs per step (A and B go through one forward)")
    seed: int = Field(0, description="seeds the initialisation, the held-out split, the batches, t and ε")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay on matrices: torch's default")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm: keeps a fresh model's first steps stable")
    device: str = Field("auto", description="`auto`: CUDA when available, else CPU; or any torch device string")

    @model_validator(mode="after")
    def _check(self) -> RewardModelConfig:
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"RewardModelConfig.dims={self.dims}: dimension names must be distinct")
        unknown = [d for d in self.prompt_blind_dims if d not in self.dims]
        if unknown:
            raise ValueError(f"RewardModelConfig.prompt_blind_dims: {unknown} are not in dims={self.dims}")
        if self.width % self.head_width:
            raise ValueError(
                f"RewardModelConfig: width {self.width} must be a multiple of head_width {self.head_width}"
            )
        if self.backbone == "vlm" and not self.vlm_model:
            raise ValueError("RewardModelConfig: backbone=vlm needs vlm_model (a folder or hub id of a video VLM)")
        if self.backbone == "clip" and self.vlm_model:
            raise ValueError(
                f"RewardModelConfig: vlm_model={self.vlm_model!r} is given but backbone=clip; set backbone=vlm"
            )
        if self.backbone == "vlm" and self.noisy_latent:
            raise ValueError(
                "RewardModelConfig: noisy_latent=true needs backbone=clip; a VLM's processor reads uint8 frames, "
                "so its reward has no gradient with respect to x_t"
            )
        return self


@dataclass(frozen=True)
class Normalisation:
    """Per-dimension mean and std of rewards on held-out videos: z = (r − mean) / std."""

    dims: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    videos: int  # rewards the statistics were computed from (2 per held-out pair)
    source: str = "heldout"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# 2. Inputs


def resample_indices(num_frames: int, fps: float, target_fps: float, where: str = "videos") -> np.ndarray:
    """Indices of the frames a `num_frames` clip at `fps` shows at the times k / target_fps:
    the nearest frame at each. Raises for a clip slower than the target (frames cannot be made up)."""
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"{where}: fps must be a positive number, got {fps!r}; pass the videos' frame rate")
    if math.isclose(fps, target_fps, rel_tol=1e-6):
        return np.arange(num_frames)
    if fps < target_fps:
        raise ValueError(
            f"{where}: clips at {fps:g} fps are slower than the {target_fps:g} fps the reward model was trained on; "
            f"it cannot invent frames: pass clips at >= {target_fps:g} fps or train a model at {fps:g} fps"
        )
    step = fps / target_fps
    count = int(math.floor((num_frames - 1) / step + 1e-9)) + 1
    return np.minimum(np.rint(np.arange(count) * step).astype(int), num_frames - 1)


def noisy_pair(
    x0_a: torch.Tensor, x0_b: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t^A, x_t^B, t, ε) with x_t = (1−t)·x0 + t·ε, one t ~ U[0, 1) and one ε ~ N(0, I) per pair,
    the same for A and B (ALGORITHMS.md §5): the two differ only in their clean videos, so the
    loss compares the videos and not two noise draws. `generator` is a CPU generator."""
    if x0_a.shape != x0_b.shape:
        raise ValueError(f"noisy_pair: x0_a {tuple(x0_a.shape)} and x0_b {tuple(x0_b.shape)} must have one shape")
    t = torch.rand(x0_a.shape[0], generator=generator)
    eps = torch.randn(x0_a.shape, generator=generator).to(x0_a.device, x0_a.dtype)
    t = t.to(x0_a.device)
    tt = t.to(x0_a.dtype).view(-1, *([1] * (x0_a.ndim - 1)))
    return (1 - tt) * x0_a + tt * eps, (1 - tt) * x0_b + tt * eps, t, eps


def _label_codes(labels: object, n: int, dims: Sequence[str]) -> torch.Tensor:
    """Labels as (N, D) int64 codes; strings ("A", "B", "tie", "invalid") are encoded."""
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    codes = encode_labels(arr.tolist()) if arr.dtype.kind in "OUS" else torch.as_tensor(arr)
    if codes.shape != (n, len(dims)):
        raise ValueError(
            f"labels {tuple(codes.shape)}: expected (pairs, dimensions) = ({n}, {len(dims)}), one column per {tuple(dims)}"
        )
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"labels have dtype {codes.dtype}; pass integer codes A=0, B=1, TIE=2, INVALID=3 or strings")
    bad = (codes < A) | (codes > INVALID)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels[{row}, {col}] ({dims[col]}) = {int(codes[row, col])}: codes must be A=0, B=1, TIE=2, INVALID=3"
        )
    return codes.long()


def _times(t: torch.Tensor | float, count: int) -> torch.Tensor:
    """t as a (count,) float tensor: one time for all, or one per video (checked by `forward`)."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return t.expand(count) if t.numel() == 1 else t


def _check_prompts(prompts: Sequence[str], count: int, where: str) -> list[str]:
    if isinstance(prompts, str) or len(prompts) != count:
        raise ValueError(f"{where}: expected a list of {count} prompts (one per video or pair), got {prompts!r:.80}")
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}[{i}] = {text!r}: every video needs a non-empty prompt to be scored")
    return list(prompts)


# ---------------------------------------------------------------------------------------------
# 3. The model


class RewardModel(nn.Module):
    """A backbone's hidden states at the reward tokens and one shared linear head → rewards (B, D)."""

    def __init__(
        self,
        cfg: RewardModelConfig,
        init_clip: str | Path | None = None,
        backbone: ClipBackbone | VlmBackbone | None = None,
        normalisation: Normalisation | None = None,
    ) -> None:
        """A new model from `cfg` (`init_clip`: towers from a `save_clip` folder), or around a
        given `backbone` (what `from_pretrained` does). Seed torch first for a reproducible init."""
        super().__init__()
        if init_clip is not None and cfg.backbone != "clip":
            raise ValueError(
                f"init_clip={str(init_clip)!r} is given but backbone={cfg.backbone}; it initialises CLIP towers"
            )
        self.cfg = cfg
        if backbone is None:
            if cfg.backbone == "vlm":
                backbone = VlmBackbone.fresh(cfg)
            elif init_clip is not None:
                backbone = ClipBackbone.from_clip_folder(cfg, init_clip)
            else:
                backbone = ClipBackbone.fresh(cfg)
        self.backbone = backbone
        self.head = nn.Linear(backbone.hidden_size, 1)  # shared by every reward token
        self.normalisation = normalisation
        self.to(resolve_device(cfg.device))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # -- inputs ---------------------------------------------------------------------------------

    def prepare(self, videos: object, fps: float, where: str = "videos") -> torch.Tensor:
        """The backbone's input from uint8 frames (B, F, H, W, 3) or pixel-space latents (B, C, F, H, W)
        at `fps`, resampled to the model's fps: float latents in [-1, 1] (clip) or uint8 frames (vlm)."""
        # 1. one array or tensor, frames or latents
        if isinstance(videos, list | tuple):
            try:
                videos = np.stack([np.asarray(v) for v in videos])
            except ValueError as err:
                raise ValueError(f"{where}: videos of different shapes; give clips of one shape ({err})") from err
        x = videos if isinstance(videos, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(videos))
        frames = x.dtype == torch.uint8 and x.ndim == 5 and x.shape[-1] == 3
        latents = x.dtype.is_floating_point and x.ndim == 5 and not (x.shape[-1] == 3 and x.shape[1] != 3)
        if not (frames or latents) or x.shape[0] == 0:
            raise ValueError(
                f"{where}: expected uint8 frames (B, F, H, W, 3) or float latents (B, C, F, H, W) with B >= 1, "
                f"got {x.dtype} {tuple(x.shape)}; stack clips with np.stack and keep uint8 pixels"
            )
        # 2. the model's frame rate
        axis = 1 if frames else 2
        idx = resample_indices(x.shape[axis], fps, self.cfg.fps, where)
        if len(idx) != x.shape[axis]:
            x = x.index_select(axis, torch.from_numpy(idx).to(x.device))
        # 3. the backbone's input form
        if self.cfg.backbone == "vlm":
            if not frames:
                raise ValueError(f"{where}: the vlm backbone reads uint8 frames (B, F, H, W, 3); decode latents first")
            return x
        if latents and x.shape[1] != 3:
            raise ValueError(
                f"{where}: latents with {x.shape[1]} channels; the clip backbone reads pixel-space latents "
                "(B, 3, F, H, W) in [-1, 1]; decode VAE latents to frames first"
            )
        self.backbone.check_frames(x.shape[2] if latents else x.shape[1], where)
        x = x.to(self.device)
        return x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0 if frames else x.float()

    # -- rewards --------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor, prompts: Sequence[str], t: torch.Tensor | None = None) -> torch.Tensor:
        """Raw rewards (B, D) of prepared inputs (see `prepare`); t (B,) in [0, 1] for noisy latents."""
        prompts = _check_prompts(prompts, inputs.shape[0], "prompts")
        if t is not None:
            t = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1)
            if not self.cfg.noisy_latent and bool((t != 0).any()):
                raise ValueError("t > 0 given to a model trained on clean videos; train with noisy_latent=true for x_t")
            if t.shape[0] != inputs.shape[0] or not bool(((t >= 0) & (t <= 1)).all()):
                raise ValueError(f"t: expected {inputs.shape[0]} times in [0, 1], got {t.tolist()}")
        if self.cfg.backbone == "vlm":
            self.backbone.check_prompts(prompts, "prompts")
            hidden = self.backbone(inputs, prompts)
        else:
            hidden = self.backbone(inputs, self.backbone.tokenize(prompts), t)
        return self.head(hidden).squeeze(-1)

    def normalise(self, rewards: torch.Tensor) -> torch.Tensor:
        """z-normalised rewards with the held-out statistics stored with the model."""
        if self.normalisation is None:
            raise ValueError(
                "this reward model has no normalisation statistics; train it with train_reward_model "
                "(held-out pairs give them) or pass normalise=False for raw rewards"
            )
        mean = torch.tensor(self.normalisation.mean, device=rewards.device, dtype=rewards.dtype)
        std = torch.tensor(self.normalisation.std, device=rewards.device, dtype=rewards.dtype)
        return (rewards - mean) / std

    def reward(
        self, x_t: torch.Tensor, t: torch.Tensor | float, prompts: Sequence[str], normalise: bool = True
    ) -> torch.Tensor:
        """Rewards (B, D) of noisy pixel-space latents x_t (B, 3, F, H, W) at the model's fps and
        time t, differentiable with respect to x_t (reward guidance needs ∇_{x_t} r)."""
        if not self.cfg.noisy_latent:
            raise ValueError(
                "reward(x_t, t) needs a model trained with noisy_latent=true; score clean videos with score()"
            )
        if not (x_t.dtype.is_floating_point and x_t.ndim == 5):
            raise ValueError(f"reward: x_t must be float latents (B, C, F, H, W), got {x_t.dtype} {tuple(x_t.shape)}")
        rewards = self(self.prepare(x_t, self.cfg.fps, "x_t"), prompts, _times(t, x_t.shape[0]))
        return self.normalise(rewards) if normalise else rewards

    @torch.no_grad()
    def score(
        self,
        videos: object,
        prompts: Sequence[str],
        *,
        fps: float,
        t: torch.Tensor | float | None = None,
        normalise: bool = True,
    ) -> torch.Tensor:
        """Rewards (B, D) of uint8 frames (B, F, H, W, 3) or pixel-space latents (B, C, F, H, W) at
        `fps` (resampled to the model's), in batches; z-normalised unless `normalise=False`."""
        x = self.prepare(videos, fps)
        prompts = _check_prompts(prompts, x.shape[0], "prompts")
        rewards = _rewards(self, x, prompts, None if t is None else _times(t, x.shape[0]))
        return self.normalise(rewards) if normalise else rewards

    def overall(
        self, videos: object, prompts: Sequence[str], *, fps: float, t: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Overall reward (B,): the mean of the z-normalised dimensions (ALGORITHMS.md §5)."""
        return self.score(videos, prompts, fps=fps, t=t, normalise=True).mean(dim=-1)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write config.json, model.safetensors, normalisation.json (+ adapter/ and processor/ for
        vlm). The config is written last: a folder with a config holds complete weights."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.backbone == "vlm":
            self.backbone.save(out)
            state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        else:
            state = self.state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        atomic_write_bytes(out / WEIGHTS_FILE, safetensors_bytes(state, metadata={"format": "pt"}))
        norm = asdict(self.normalisation) if self.normalisation is not None else None
        atomic_write_json(
            out / NORMALISATION_FILE, {"fps": self.cfg.fps, "dims": list(self.cfg.dims), "statistics": norm}
        )
        atomic_write_json(
            out / CONFIG_FILE,
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "config": self.cfg.model_dump(mode="json"),
                "architecture": self.backbone.architecture,
            },
        )
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | None = None) -> RewardModel:
        """Load a folder written by `save_pretrained` (safetensors only); `device` overrides the config's."""
        path = Path(folder)
        # 1. config and architecture
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, NORMALISATION_FILE) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"RewardModel.from_pretrained({str(path)!r}): missing {missing}; pass a folder written by "
                "RewardModel.save_pretrained (the train_reward stage's checkpoint)"
            )
        saved = json.loads((path / CONFIG_FILE).read_text())
        if saved.get("format") != FORMAT or saved.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path / CONFIG_FILE}: format {saved.get('format')!r} version {saved.get('version')!r}, expected "
                f"{FORMAT!r} version {FORMAT_VERSION}; retrain the reward model with this code"
            )
        cfg = RewardModelConfig.model_validate(saved["config"])
        if device is not None:
            cfg = cfg.model_copy(update={"device": device})
        # 2. the backbone's structure, then the weights
        if cfg.backbone == "vlm":
            backbone = VlmBackbone.from_saved(cfg, path, saved["architecture"])
        else:
            backbone = ClipBackbone.from_architecture(cfg, saved["architecture"])
        model = cls(cfg, backbone=backbone)
        state = load_file(path / WEIGHTS_FILE)
        if cfg.backbone == "vlm":
            model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items()})
        else:
            model.load_state_dict(state)
        # 3. the normalisation statistics
        norm = json.loads((path / NORMALISATION_FILE).read_text())
        if norm.get("fps") != cfg.fps:
            raise ValueError(f"{path / NORMALISATION_FILE}: fps {norm.get('fps')} differs from the config's {cfg.fps}")
        stats = norm.get("statistics")
        if stats is not None:
            model.normalisation = Normalisation(
                tuple(stats["dims"]), tuple(stats["mean"]), tuple(stats["std"]), int(stats["videos"]), stats["source"]
            )
        return model.eval()


# ---------------------------------------------------------------------------------------------
# 4. Training


def pair_loss(
    model: RewardModel,
    video_a: torch.Tensor,
    video_b: torch.Tensor,
    prompts: Sequence[str],
    labels: torch.Tensor,
    t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BTT loss per dimension (models.btt.btt_loss, θ = cfg.theta) of prepared pairs; A and B go
    through one forward. Returns (loss, per-entry nll (N, D)); invalid entries give no gradient."""
    n = video_a.shape[0]
    rewards = model(torch.cat([video_a, video_b]), list(prompts) * 2, None if t is None else torch.cat([t, t]))
    return btt_loss(rewards[:n], rewards[n:], labels.to(rewards.device), model.cfg.theta)


def _optimizer(model: nn.Module, cfg: RewardModelConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (biases, norms' gains and scalars are not shrunk)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )


def _lr_factor(step: int, cfg: RewardModelConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _rewards(model: RewardModel, x: torch.Tensor, prompts: Sequence[str], t: torch.Tensor | None) -> torch.Tensor:
    """Raw rewards (N, D) of prepared inputs, `batch_size` at a time, on the CPU."""
    step = model.cfg.batch_size
    parts = [
        model(x[i : i + step], prompts[i : i + step], None if t is None else t[i : i + step])
        for i in range(0, x.shape[0], step)
    ]
    return torch.cat(parts).float().cpu()


def train_reward_model(
    videos_a: object,
    videos_b: object,
    prompts: Sequence[str],
    labels: object,
    cfg: RewardModelConfig,
    heldout_fraction: float = 0.2,
    init_clip: str | Path | None = None,
    *,
    fps: float | None = None,
    overall_labels: object | None = None,
) -> tuple[RewardModel, dict]:
    """Train a reward model on pairs (videos_a[i], videos_b[i]) of prompts[i] with labels[i] (N, D).

    videos: uint8 frames (N, F, H, W, 3), or pixel-space latents (N, 3, F, H, W) (the natural input
    of `noisy_latent`), at `fps` (None: already at cfg.fps); labels: codes A=0, B=1, TIE=2,
    INVALID=3 or the strings. `overall_labels` (N,) adds an "overall" row to the report.
    Deterministic for cfg.seed; torch's global RNG is left as it was.

    Returns (model, info): info["report"] is `per_dimension_report` on the held-out pairs (z-normalised
    signals), info["reward_differences"] the held-out raw d = r_A − r_B with their labels (for
    `reward_difference_histogram_png`), info["loss_history"] the loss per step.
    """
    started = time.perf_counter()
    # 1. check inputs
    prompts = _check_prompts(prompts, len(prompts), "prompts")
    n = len(prompts)
    codes = _label_codes(labels, n, cfg.dims)
    overall = (
        None if overall_labels is None else _label_codes(np.asarray(overall_labels).reshape(-1, 1), n, ("overall",))
    )
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(
            f"heldout_fraction={heldout_fraction}: must be in (0, 1); held-out pairs give the normalisation"
        )
    n_held = round(n * heldout_fraction)
    if n_held < 1 or n - n_held < 1:
        raise ValueError(
            f"{n} pairs with heldout_fraction={heldout_fraction} leave {n_held} held-out and {n - n_held} training "
            "pairs; both need at least one: give more pairs or change heldout_fraction"
        )
    # 2. the model, seeded, and the videos in its input form
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = RewardModel(cfg, init_clip=init_clip)
    rate = cfg.fps if fps is None else fps
    x_a, x_b = model.prepare(videos_a, rate, "videos_a"), model.prepare(videos_b, rate, "videos_b")
    if x_a.shape != x_b.shape or x_a.shape[0] != n:
        raise ValueError(
            f"videos_a {tuple(x_a.shape)} and videos_b {tuple(x_b.shape)} (after preparation) must have one shape "
            f"with one row per prompt ({n})"
        )
    # 3. held-out split and training
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=generator)
    held, train = order[:n_held].sort().values, order[n_held:]
    optimizer = _optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = min(cfg.batch_size, len(train))
    queue = torch.empty(0, dtype=torch.long)
    history: list[float] = []
    model.train()
    for step in range(cfg.steps):
        # 3a. the next batch of an epoch-wise shuffle of the training pairs
        if len(queue) < batch:
            queue = torch.cat([queue, train[torch.randperm(len(train), generator=generator)]])
        idx, queue = queue[:batch], queue[batch:]
        a, b, t = x_a[idx.to(x_a.device)], x_b[idx.to(x_b.device)], None
        # 3b. noisy latents: one t and one ε per pair
        if cfg.noisy_latent:
            a, b, t, _ = noisy_pair(a, b, generator)
        # 3c. one BTT step at the scheduled learning rate
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        loss, _ = pair_loss(model, a, b, [prompts[i] for i in idx.tolist()], codes[idx], t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        history.append(float(loss.item()))
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info("reward model step %d/%d: loss %.4f", step + 1, cfg.steps, history[-1])
    model.eval()
    # 4. held-out rewards (noisy models at pair-shared t drawn as in training); normalisation
    held_a, held_b = x_a[held.to(x_a.device)], x_b[held.to(x_b.device)]
    held_prompts = [prompts[i] for i in held.tolist()]
    t_held = None
    if cfg.noisy_latent:
        held_a, held_b, t_held, _ = noisy_pair(held_a, held_b, torch.Generator().manual_seed(cfg.seed + 1))
    r_a, r_b = _rewards(model, held_a, held_prompts, t_held), _rewards(model, held_b, held_prompts, t_held)
    both = torch.cat([r_a, r_b])
    std = both.std(dim=0, unbiased=False)
    if bool((std < MIN_STD).any()):
        logger.warning(
            "reward model: held-out rewards of %s are constant; their std is floored at %g",
            [d for d, s in zip(cfg.dims, std.tolist(), strict=True) if s < MIN_STD],
            MIN_STD,
        )
    model.normalisation = Normalisation(
        tuple(cfg.dims), tuple(both.mean(dim=0).tolist()), tuple(std.clamp_min(MIN_STD).tolist()), len(both)
    )
    # 5. metrics on the held-out pairs
    held_codes = codes[held]
    heldout_loss, _ = btt_loss(r_a, r_b, held_codes, cfg.theta)
    m = (model.normalise(r_a) - model.normalise(r_b)).numpy()
    h_overall = None if overall is None else signs_from_labels(overall[held, 0])
    report = per_dimension_report(m, signs_from_labels(held_codes), cfg.dims, h_overall, seed=cfg.seed)
    info = {
        "report": report,
        "reward_differences": {
            "dims": list(cfg.dims),
            "d": (r_a - r_b).tolist(),
            "labels": [[LABELS[c] for c in row] for row in held_codes.tolist()],
            "tie_band": math.log(cfg.theta),
        },
        "loss_history": history,
        "heldout_loss": float(heldout_loss),
        "normalisation": asdict(model.normalisation),
        "train_pairs": len(train),
        "heldout_pairs": n_held,
        "heldout_indices": held.tolist(),
        "init_clip": None if init_clip is None else str(init_clip),
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - started, 2),
        "config": cfg.model_dump(mode="json"),
    }
    return model, info


# ---------------------------------------------------------------------------------------------
# 5. The reward-difference histogram (VideoAlign Fig. 4)

_PANEL = (240, 360)  # height, width of one dimension's panel in px
_MARGIN = (34, 30, 28, 14)  # top, bottom, left, right
_COLOURS = {"chosen − rejected": (200, 110, 30), "tie (A − B)": (40, 150, 240)}  # BGR: blue, orange


def _histogram_panel(name: str, margins: np.ndarray, ties: np.ndarray, band: float, bins: int) -> np.ndarray:
    h, w = _PANEL
    top, bottom, left, right = _MARGIN
    panel = np.full((h, w, 3), 255, np.uint8)
    values = np.concatenate([margins, ties])
    span = max(float(np.abs(values).max()) if len(values) else 0.0, band) * 1.1
    edges = np.linspace(-span, span, bins + 1)
    plot_w, plot_h = w - left - right, h - top - bottom

    def x_of(v: float) -> int:
        return int(round(left + (v + span) / (2 * span) * plot_w))

    # 1. the tie band |d| <= log θ, where the BTT model predicts a tie, and d = 0
    cv2.rectangle(panel, (x_of(-band), top), (x_of(band), top + plot_h), (235, 235, 235), -1)
    cv2.line(panel, (x_of(0.0), top), (x_of(0.0), top + plot_h), (120, 120, 120), 1)
    # 2. one translucent histogram per group, as shares of that group's pairs
    for colour, group in zip(_COLOURS.values(), (margins, ties), strict=True):
        if len(group) == 0:
            continue
        share = np.histogram(group, edges)[0] / len(group)
        layer = panel.copy()
        for k, s in enumerate(share):
            y = int(round(top + plot_h * (1 - s / max(share.max(), 1e-12) * 0.95)))
            cv2.rectangle(layer, (x_of(edges[k]), y), (x_of(edges[k + 1]) - 1, top + plot_h), colour, -1)
        panel = cv2.addWeighted(layer, 0.55, panel, 0.45, 0)
    # 3. axes and text
    cv2.line(panel, (left, top + plot_h), (left + plot_w, top + plot_h), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(panel, f"{name}: reward difference", (left, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for v in (-span, 0.0, span):
        cv2.putText(panel, f"{v:.1f}", (x_of(v) - 12, top + plot_h + 16), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    for k, (label, colour) in enumerate(_COLOURS.items()):
        count = len(margins) if k == 0 else len(ties)
        cv2.rectangle(panel, (left + 4, top + 6 + 14 * k), (left + 14, top + 16 + 14 * k), colour, -1)
        cv2.putText(
            panel,
            f"{label} (n={count})".replace("−", "-"),
            (left + 18, top + 15 + 14 * k),
            font,
            0.35,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    cv2.rectangle(panel, (left + 4, top + 34), (left + 14, top + 44), (200, 200, 200), -1)
    cv2.putText(
        panel,
        f"|d| <= log theta = {band:.2f}: tie likeliest",
        (left + 18, top + 43),
        font,
        0.35,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return panel


def reward_difference_histogram_png(info: dict, path: str | Path, bins: int = 30) -> Path:
    """Draw, per dimension, the held-out reward margins r_chosen − r_rejected of decisive pairs and
    the differences r_A − r_B of tied pairs, over the BTT tie band |d| ≤ log θ (VideoAlign Fig. 4),
    and write them side by side as a PNG. `info` is `train_reward_model`'s second result."""
    data = info.get("reward_differences")
    if not data or not {"dims", "d", "labels", "tie_band"} <= set(data):
        raise ValueError(
            "reward_difference_histogram_png: info has no `reward_differences`; pass train_reward_model's info"
        )
    d = np.asarray(data["d"], dtype=np.float64).reshape(-1, len(data["dims"]))
    labels = np.asarray(data["labels"], dtype=object).reshape(d.shape)
    panels = []
    for j, name in enumerate(data["dims"]):
        col, lab = d[:, j], labels[:, j]
        margins = np.concatenate([col[lab == LABELS[A]], -col[lab == LABELS[B]]])
        panels.append(_histogram_panel(name, margins, col[lab == LABELS[TIE]], float(data["tie_band"]), bins))
    ok, png = cv2.imencode(".png", np.concatenate(panels, axis=1))
    if not ok:
        raise RuntimeError("reward_difference_histogram_png: OpenCV could not encode the PNG")
    out = Path(path)
    atomic_write_bytes(out, png.tobytes())
    return out
