"""The two backbones of the VideoReward-style reward model: what turns (video, prompt) into one
hidden state per reward token. `models/reward_model.py` puts the shared linear head on top.

Both place the reward tokens as VideoReward does (Liu et al. 2025, arXiv 2501.13918, §4.1):

    [video tokens] [VQ] [MQ] [prompt tokens] [TA]

under causal attention, so VQ and MQ read the video alone and cannot see the prompt, while TA
reads everything. Which dimensions are prompt-blind is the config's `prompt_blind_dims`.

- `ClipBackbone`: an open_clip model (a fresh tiny one, or a saved world CLIP) and a small
  temporal transformer. The image tower embeds the frames, the text tower gives one feature per
  prompt token, and the temporal transformer reads the sequence above. Input: pixel-space
  latents (B, 3, F, H, W) in [-1, 1], the policy's pixel space, so the reward is differentiable
  with respect to them (reward guidance, ALGORITHMS.md §7). The map to the image tower is
  `image = (x + 1) / 2`, squashed to the tower's input size, then open_clip's mean/std
  normalisation: the same affine map for clean frames and for x_t. Noise is not clipped (a clamp
  would cut the guidance gradient wherever x_t leaves [-1, 1]); the timestep embedding added to
  the video tokens tells the model how noisy its input is.
- `VlmBackbone`: a video VLM loaded with `AutoModelForImageTextToText` (Qwen2-VL class), the
  reward tokens added to its tokenizer as special tokens and written into the chat text in the
  same layout, LoRA on the language model's attention through peft, and the new tokens' embedding
  rows trained through peft's `trainable_token_indices`. Input: uint8 frames (B, F, H, W, 3);
  its processor works on numpy, so it has no noisy-latent variant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from models.clip_model import CONFIG_FILE, PREFLOOP_KEY, VideoInput, load_clip, register_model_config

if TYPE_CHECKING:
    from models.reward_model import RewardModelConfig

# Timesteps t in [0, 1] are embedded as 1000·t, the policy's scale (models/policy.py TIMESTEP_SCALE).
TIMESTEP_SCALE = 1000.0
TIME_FEATURES = 64  # sinusoid channels before the timestep MLP (DiT's frequency embedding size is 256)
ADAPTER_DIR = "adapter"
PROCESSOR_DIR = "processor"


def reward_layout(dims: Sequence[str], prompt_blind: Sequence[str]) -> tuple[list[str], list[str]]:
    """(tokens before the prompt, tokens after it), each in `dims` order."""
    before = [d for d in dims if d in prompt_blind]
    return before, [d for d in dims if d not in prompt_blind]


def timestep_features(t: torch.Tensor, channels: int = TIME_FEATURES) -> torch.Tensor:
    """Sinusoidal features (B, channels) of 1000·t, as in DDPM/DiT timestep embeddings."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = TIMESTEP_SCALE * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


# ---------------------------------------------------------------------------------------------
# 1. open_clip towers + temporal transformer


def _clip_folder_name(folder: Path) -> str:
    """The open_clip model name a `save_clip` folder was written under."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"init_clip={str(folder)!r}: no {CONFIG_FILE} there; pass a folder written by "
            "models.clip_model.save_clip (the bootstrap stage's CLIP checkpoint)"
        )
    name = json.loads(config_path.read_text()).get(PREFLOOP_KEY, {}).get("model_name")
    if not name:
        raise ValueError(f"{config_path}: no `{PREFLOOP_KEY}.model_name`; write CLIP checkpoints with save_clip")
    return name


class ClipBackbone(nn.Module):
    """open_clip image and text towers feeding a causal temporal transformer with reward tokens."""

    def __init__(self, cfg: RewardModelConfig, clip: nn.Module, architecture: dict) -> None:
        super().__init__()
        # 1. the open_clip model, its tokenizer and how it sees a video
        self.architecture = architecture
        self.clip = clip
        self.video = VideoInput.model_validate(architecture["video"])
        self.tokenizer = open_clip.get_tokenizer(architecture["model_name"])
        visual = clip.visual
        visual.output_tokens = True  # the storyboard reads per-tile patch tokens; `mean` the pooled one
        size = visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        patch = visual.patch_size
        self.patch_size = (patch, patch) if isinstance(patch, int) else tuple(patch)
        preprocess = architecture["preprocess_cfg"]
        self.register_buffer("pixel_mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        # parts of CLIP the reward never reads are frozen, so "trainable" means "used"
        for name in ("logit_scale", "logit_bias", "text_projection"):
            param = getattr(clip, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)
        if not cfg.train_token_embedding:
            token_embedding = clip.text.token_embedding if hasattr(clip, "text") else clip.token_embedding
            token_embedding.requires_grad_(False)
        embed_dim = architecture["model_cfg"]["embed_dim"]
        text_cfg = architecture["model_cfg"]["text_cfg"]
        self.context_length = int(text_cfg.get("context_length", 77))
        # 2. the temporal transformer over [video][blind rewards][prompt][prompt-aware rewards]
        self.dims = tuple(cfg.dims)
        self.before, self.after = reward_layout(cfg.dims, cfg.prompt_blind_dims)
        self.max_frames = cfg.max_frames
        self.heads = cfg.width // cfg.head_width
        self.hidden_size = cfg.width
        self.frame_proj = nn.Linear(embed_dim, cfg.width)
        self.text_proj = nn.Linear(int(text_cfg["width"]), cfg.width)
        self.reward_tokens = nn.Parameter(0.02 * torch.randn(len(cfg.dims), cfg.width))
        self.position = nn.Parameter(
            0.02 * torch.randn(cfg.max_frames + len(cfg.dims) + self.context_length, cfg.width)
        )
        self.time_embed = (
            nn.Sequential(nn.Linear(TIME_FEATURES, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
            if cfg.noisy_latent
            else None
        )
        layer = nn.TransformerEncoderLayer(
            cfg.width, self.heads, 2 * cfg.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.temporal = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def fresh(cls, cfg: RewardModelConfig) -> ClipBackbone:
        """A new tiny open_clip model from `cfg.clip`, built through open_clip's registry."""
        model_cfg = cfg.clip.open_clip_config()
        register_model_config(cfg.clip.model_name, model_cfg)
        clip = open_clip.create_model(cfg.clip.model_name, pretrained=None)
        return cls(cfg, clip, cls._architecture(cfg.clip.model_name, model_cfg, clip, cfg.clip.video))

    @classmethod
    def from_clip_folder(cls, cfg: RewardModelConfig, folder: str | Path) -> ClipBackbone:
        """Towers initialised from a `save_clip` folder (the world CLIP); `cfg.clip` is not used."""
        path = Path(folder)
        name = _clip_folder_name(path)
        loaded = load_clip(name, path)
        return cls(cfg, loaded.model.train(), cls._architecture(name, loaded.model_cfg, loaded.model, loaded.video))

    @classmethod
    def from_architecture(cls, cfg: RewardModelConfig, architecture: dict) -> ClipBackbone:
        """Untrained towers of a saved architecture, for `load_state_dict` to fill."""
        register_model_config(architecture["model_name"], architecture["model_cfg"])
        with _weights_come_next(architecture["model_name"]):
            clip = open_clip.create_model(
                architecture["model_name"],
                pretrained=None,
                force_preprocess_cfg={k: v for k, v in architecture["preprocess_cfg"].items() if k != "size"},
            )
        return cls(cfg, clip, architecture)

    @staticmethod
    def _architecture(model_name: str, model_cfg: dict, clip: nn.Module, video: VideoInput) -> dict:
        preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in clip.visual.preprocess_cfg.items()}
        return {
            "kind": "clip",
            "model_name": model_name,
            "model_cfg": model_cfg,
            "preprocess_cfg": preprocess,
            "video": video.model_dump(mode="json"),
        }

    # -- inputs ---------------------------------------------------------------------------------

    def check_frames(self, frames: int, where: str) -> None:
        """Raise unless a clip of `frames` frames (after fps resampling) fits this backbone."""
        if self.video.mode == "storyboard":
            rows, cols = self.video.grid
            if frames != rows * cols:
                raise ValueError(
                    f"{where}: {frames} frames, but this CLIP reads a {rows}x{cols} storyboard of exactly "
                    f"{rows * cols} frames; give {rows * cols}-frame clips at the model's fps"
                )
        if frames > self.max_frames:
            raise ValueError(
                f"{where}: {frames} frames exceed max_frames={self.max_frames}; give shorter clips "
                "or train with a larger RewardModelConfig.max_frames"
            )

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts))

    # -- forward --------------------------------------------------------------------------------

    def _images(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, 3, h, w) pixel latents in [-1, 1] -> normalised image-tower inputs of `size`."""
        images = (x + 1.0) / 2.0
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (images - self.pixel_mean) / self.pixel_std

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) pixel latents -> one image-tower feature per frame (B, F, embed_dim)."""
        b, _, f, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
        visual = self.clip.visual
        if self.video.mode == "mean":
            pooled, _ = visual(self._images(frames, self.image_size))
            return pooled.reshape(b, f, -1)
        # storyboard: tiles in time order row by row (as clip_model.video_images), then each
        # tile's patch tokens averaged into that frame's feature
        rows, cols = self.video.grid
        th, tw = self.image_size[0] // rows, self.image_size[1] // cols
        tiles = self._images(frames, (th, tw))
        board = tiles.reshape(b, rows, cols, 3, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, rows * th, cols * tw)
        _, tokens = visual(board)
        ph, pw = th // self.patch_size[0], tw // self.patch_size[1]
        width = tokens.shape[-1]
        per_tile = tokens.reshape(b, rows, ph, cols, pw, width).permute(0, 1, 3, 2, 4, 5).reshape(b, f, ph * pw, width)
        feats = per_tile.mean(dim=2)
        return feats @ visual.proj if visual.proj is not None else feats

    def text_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token text-tower features (B, L, text width) and the mask of real tokens (B, L).

        open_clip's BPE ends a prompt with its end-of-text token, the largest id, and pads with
        zeros after it; every position up to and including the end token is real.
        """
        clip = self.clip
        if hasattr(clip, "text"):  # CustomTextCLIP keeps its text tower as one module
            clip.text.output_tokens = True
            _, x = clip.text(tokens)
        else:
            x = clip.token_embedding(tokens) + clip.positional_embedding
            x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        end = tokens.argmax(dim=1, keepdim=True)
        real = torch.arange(tokens.shape[1], device=tokens.device)[None] <= end
        return x, real

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, D, width) at the reward tokens, in `dims` order."""
        b, f = x.shape[0], x.shape[2]
        # 1. video tokens (+ the timestep embedding for the noisy-latent variant)
        video = self.frame_proj(self.frame_features(x))
        if self.time_embed is not None:
            t = torch.zeros(b, device=x.device) if t is None else t
            video = video + self.time_embed(timestep_features(t))[:, None]
        # 2. the sequence [video][blind rewards][prompt][aware rewards] and its positions; the text
        #    tower runs once per distinct prompt (a pair's two videos share theirs)
        distinct, inverse = torch.unique(tokens.to(x.device), dim=0, return_inverse=True)
        text, real = (part[inverse] for part in self.text_features(distinct))
        rewards = dict(zip(self.dims, self.reward_tokens, strict=True))
        before = torch.stack([rewards[d] for d in self.before]).expand(b, -1, -1) if self.before else video[:, :0]
        after = torch.stack([rewards[d] for d in self.after]).expand(b, -1, -1) if self.after else video[:, :0]
        seq = torch.cat([video, before, self.text_proj(text), after], dim=1)
        seq = seq + self.position[: seq.shape[1]]
        # 3. causal attention; padding after a prompt's end token is never attended to
        s = seq.shape[1]
        valid = torch.ones(b, s, dtype=torch.bool, device=x.device)
        start = f + len(self.before)
        valid[:, start : start + real.shape[1]] = real
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        blocked = ~(causal[None] & valid[:, None, :])
        hidden = self.norm(self.temporal(seq, mask=blocked.repeat_interleave(self.heads, dim=0)))
        # 4. read the reward tokens, in `dims` order
        slot = {d: f + i for i, d in enumerate(self.before)}
        slot |= {d: start + real.shape[1] + i for i, d in enumerate(self.after)}
        return hidden[:, [slot[d] for d in self.dims]]


# ---------------------------------------------------------------------------------------------
# 2. A video VLM with LoRA


def reward_token(dim: str) -> str:
    return f"<|{dim}_reward|>"


class VlmBackbone(nn.Module):
    """A Qwen2-VL-class VLM with reward tokens in its chat text and LoRA on its language model."""

    def __init__(self, cfg: RewardModelConfig, model: nn.Module, processor, architecture: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.processor = processor
        self.architecture = architecture
        self.dims = tuple(cfg.dims)
        self.before, self.after = reward_layout(cfg.dims, cfg.prompt_blind_dims)
        self.token_ids = {d: int(i) for d, i in architecture["token_ids"].items()}
        self.hidden_size = int(architecture["hidden_size"])
        self.control_tokens = [t for t in processor.tokenizer.all_special_tokens if t]
        self.control_tokens += [reward_token(d) for d in self.dims]
        # right padding: every real token keeps the position it has alone, so a longer prompt in the
        # batch cannot move a VQ/MQ token (left padding would shift them)
        processor.tokenizer.padding_side = "right"

    @staticmethod
    def _load_base(cfg: RewardModelConfig):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        common = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": cfg.local_files_only}
        try:
            processor = AutoProcessor.from_pretrained(cfg.vlm_model, **common)
            # safetensors only: a checkpoint that has only pickled weights is refused, never unpickled
            model = AutoModelForImageTextToText.from_pretrained(
                cfg.vlm_model, dtype=torch.float32, use_safetensors=True, **common
            )
        except OSError as err:
            raise OSError(
                f"RewardModelConfig.vlm_model={cfg.vlm_model!r}: cannot load it with "
                f"local_files_only={cfg.local_files_only} ({err}); pass a folder written by save_pretrained "
                "(e.g. models.vlm.build_tiny_vlm) or a hub id already in the local HF cache"
            ) from err
        if getattr(processor, "video_processor", None) is None or getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"{cfg.vlm_model}: its processor has no video processor or no chat template; use a video VLM "
                "checkpoint (Qwen2-VL / Qwen2.5-VL) saved with its processor"
            )
        return model, processor

    @classmethod
    def fresh(cls, cfg: RewardModelConfig) -> VlmBackbone:
        """The base VLM with new reward tokens, LoRA adapters and trainable reward-token embeddings."""
        from peft import LoraConfig, get_peft_model

        model, processor = cls._load_base(cfg)
        tokenizer = processor.tokenizer
        tokens = [reward_token(d) for d in cfg.dims]
        clash = [t for t in tokens if t in tokenizer.get_vocab()]
        if clash:
            raise ValueError(
                f"{cfg.vlm_model}: its tokenizer already has {clash}; load a trained reward model with "
                "RewardModel.from_pretrained instead of building one on top of it"
            )
        tokenizer.add_tokens(tokens, special_tokens=True)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids = {d: tokenizer.convert_tokens_to_ids(reward_token(d)) for d in cfg.dims}
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=cfg.lora_target_modules,
            trainable_token_indices={"embed_tokens": sorted(ids.values())},
        )
        peft_model = get_peft_model(model, lora)
        return cls(cfg, peft_model, processor, cls._architecture(model, ids))

    @classmethod
    def from_saved(cls, cfg: RewardModelConfig, folder: Path, architecture: dict) -> VlmBackbone:
        """The base VLM, the saved processor (with the reward tokens) and the saved adapter."""
        from peft import PeftModel
        from transformers import AutoProcessor

        model, _ = cls._load_base(cfg)
        processor = AutoProcessor.from_pretrained(folder / PROCESSOR_DIR, local_files_only=True)
        model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
        if not (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder / ADAPTER_DIR}: no adapter_model.safetensors (pickled adapters are not loaded); "
                "retrain the reward model with this code"
            )
        peft_model = PeftModel.from_pretrained(model, folder / ADAPTER_DIR, is_trainable=False)
        return cls(cfg, peft_model, processor, architecture)

    @staticmethod
    def _architecture(model: nn.Module, ids: dict[str, int]) -> dict:
        config = model.config
        text_config = getattr(config, "text_config", config)
        return {"kind": "vlm", "token_ids": ids, "hidden_size": int(text_config.hidden_size)}

    def save(self, folder: Path) -> None:
        """peft adapter files (LoRA + reward-token rows) and the processor with the reward tokens."""
        self.model.save_pretrained(folder / ADAPTER_DIR, save_embedding_layers=False)
        self.processor.save_pretrained(folder / PROCESSOR_DIR)

    # -- forward --------------------------------------------------------------------------------

    def check_prompts(self, prompts: Sequence[str], where: str) -> None:
        for i, text in enumerate(prompts):
            token = next((t for t in self.control_tokens if t in text), None)
            if token is not None:
                raise ValueError(
                    f"{where}[{i}]: contains the control token {token!r}, which would break the chat layout "
                    "(video, reward tokens, prompt); remove it from the prompt"
                )

    def chat(self, prompt: str) -> str:
        content = [{"type": "video"}]
        content.append({"type": "text", "text": "".join(reward_token(d) for d in self.before)})
        content.append({"type": "text", "text": prompt})
        content.append({"type": "text", "text": "".join(reward_token(d) for d in self.after)})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)

    def forward(self, frames: torch.Tensor, prompts: Sequence[str], t: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, D, hidden) of the last layer at the reward tokens, in `dims` order."""
        device = next(self.model.parameters()).device
        videos = [np.ascontiguousarray(v) for v in frames.cpu().numpy()]
        inputs = self.processor(
            text=[self.chat(p) for p in prompts],
            videos=videos,
            video_metadata=[{"total_num_frames": len(v), "fps": self.cfg.fps} for v in videos],
            do_sample_frames=False,
            cap_pixels_per_frame=True,
            padding=True,
            return_tensors="pt",
        ).to(device)
        out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        ids = inputs["input_ids"]
        picked = []
        for d in self.dims:
            hit = ids == self.token_ids[d]
            if not bool((hit.sum(dim=1) == 1).all()):
                raise RuntimeError(f"the chat text must hold {reward_token(d)} exactly once per video")
            picked.append(hidden[torch.arange(len(ids), device=device), hit.float().argmax(dim=1)])
        return torch.stack(picked, dim=1)


@contextlib.contextmanager
def _weights_come_next(model_name: str):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning for
    `model_name` while its towers are built only to be filled by `load_state_dict` (a saved reward
    model): the warning is true of the build step and false of the model a user gets."""

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("No pretrained weights loaded") and f"'{model_name}'" in message)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
