"""The policy: one interface over diffusers' video transformers, trained and sampled as rectified flow.

Conventions (ALGORITHMS.md): `x_t = (1-t)·x0 + t·ε`, t=1 is pure noise, t=0 data; the network
predicts the velocity `v = ε - x0`; a per-sample error is the **mean** over every element of
the video. Sampling integrates `dx/dt = v` with Euler steps from t=1 down to t=0.

Two families, each the real diffusers class loaded by `<Class>.from_pretrained(path_or_id)`:

| family | class | input layout | timestep passed |
|---|---|---|---|
| `wan` | `WanTransformer3DModel` | (B, C, F, H, W) | `1000·t` (float) |
| `cogvideox` | `CogVideoXTransformer3DModel` | (B, F, C, H, W) | `1000·t` (float) |

Latents are always held in the Wan/VAE layout (B, C, F, H, W); `velocity` permutes for
CogVideoX. Both classes were trained with timesteps in [0, 1000) (`num_train_timesteps=1000`),
and diffusers' `FlowMatchEulerDiscreteScheduler` feeds Wan `1000·σ` where σ is our t, so the
policy passes `TIMESTEP_SCALE·t`. Neither transformer takes a text mask: padded positions of the
text embeddings are zeroed (what `WanPipeline` does), so the mask enters through the zeros.

Latent space:
- `pixel_space=True` (the embedded world): the transformer works on RGB frames scaled to
  [-1, 1]; `encode`/`decode` only rescale and permute.
- `pixel_space=False` (real Wan checkpoints): frames go through the pipeline's
  `AutoencoderKLWan`, with the latents normalised by the VAE config's `latents_mean`/`latents_std`
  exactly as `WanPipeline` does. `cogvideox` runs in pixel space only: released CogVideoX
  checkpoints are v-prediction models on a DDPM schedule, not rectified-flow velocity models.

Sampling options: `first_frame` holds latent frame 0 on the given frame's path (HuViDPO),
`reward_guidance` adds Flow-NRG's reward gradient after CFG (`models/reward_guidance.py`), and
`attention=sparse_causal` (Wan) lets frame i attend to frames 0 and i−1 only
(`models/sparse_causal_attention.py`).

LoRA goes through peft, injected with diffusers' `add_adapter` so the transformer keeps its own
class and forward. `save_lora` writes `pytorch_lora_weights.safetensors` in the pipeline layout
diffusers' `WanPipeline.load_lora_weights` / `CogVideoXPipeline.load_lora_weights` read: peft
key names without the adapter name (`blocks.0.attn1.to_q.lora_A.weight`), prefixed with
`transformer.`, and the peft `LoraConfig` (rank, alpha, targets) as JSON under the safetensors
metadata key `lora_adapter_metadata`, its keys prefixed with `transformer.` too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from diffusers import AutoencoderKLWan, CogVideoXTransformer3DModel, WanTransformer3DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from data_contracts.lineage import atomic_write_bytes
from models.losses.common import held_frame_times, noisy_input
from models.text_encoder import TextEmbeddings, TextEncoder, load_text_encoder

if TYPE_CHECKING:
    from models.reward_guidance import RewardGuidance

Family = Literal["wan", "cogvideox"]
TRANSFORMER_CLASSES = {"wan": WanTransformer3DModel, "cogvideox": CogVideoXTransformer3DModel}
# Both families were trained on integer timesteps in [0, 1000); t in [0, 1] is scaled to that range.
TIMESTEP_SCALE = 1000.0
# diffusers' names (loaders/lora_base.py) for the pipeline-level LoRA file and its metadata.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"
LORA_PREFIX = "transformer"
ADAPTER = "default"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# 1. Config


class PolicyConfig(BaseModel):
    """Which checkpoints make the policy, where it runs, and how it samples."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Family = Field(description="`wan` (WanTransformer3DModel) or `cogvideox` (CogVideoXTransformer3DModel)")
    transformer: str = Field(description="local folder or hub id of the transformer (`save_pretrained` layout)")
    transformer_subfolder: str | None = Field(
        None, description="subfolder of a diffusers pipeline repo that holds the transformer, e.g. `transformer`"
    )
    text_encoder: str = Field(description="local folder or hub id of the tokenizer and text encoder")
    tokenizer_subfolder: str | None = Field(None, description="subfolder of the tokenizer in a pipeline repo")
    text_encoder_subfolder: str | None = Field(None, description="subfolder of the text encoder in a pipeline repo")
    text_max_length: int | None = Field(
        None, ge=1, description="tokens per prompt; None: the tokenizer's own limit (Wan2.1's pipeline uses 512)"
    )
    pixel_space: bool = Field(
        True, description="the transformer works on RGB frames in [-1, 1] (the embedded world); False: through `vae`"
    )
    vae: str | None = Field(None, description="local folder or hub id of the AutoencoderKLWan (pixel_space=False)")
    vae_subfolder: str | None = Field(None, description="subfolder of the VAE in a pipeline repo, e.g. `vae`")
    device: str = Field("auto", description="`auto`: CUDA when available, else CPU; or any torch device string")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto`: bfloat16 on CUDA (the released checkpoints' dtype), float32 on CPU"
    )
    frames: int = Field(8, ge=1, description="frames per video: the embedded world's 8")
    height: int = Field(16, ge=1, description="frame height in px: the embedded world's 16")
    width: int = Field(16, ge=1, description="frame width in px: the embedded world's 16")
    channels: int = Field(
        3, ge=1, description="channels the transformer sees: 3 (RGB) in pixel space, the VAE's z_dim otherwise"
    )
    patch_size: tuple[int, int, int] | None = Field(
        None, description="(t, h, w) patch of the transformer, checked against the checkpoint; None: take the checkpoint's"
    )
    steps: int = Field(20, ge=1, description="Euler steps from t=1 to 0; 20 with CFG samples 8 world videos in 0.8 s on 2 cores")
    guidance_scale: float = Field(5.0, ge=1.0, description="classifier-free guidance weight; WanPipeline's default 5.0")
    flow_shift: float = Field(
        1.0, gt=0, description="time-grid shift σ' = sσ/(1+(s-1)σ); 1: uniform, as the tiny base trains; Wan2.1 480p: 3.0"
    )
    attention: Literal["full", "sparse_causal"] = Field(
        "full",
        description="self-attention of the Wan family: full (as trained), or sparse_causal (HuViDPO: frame i attends "
        "to frame 0 and frame i-1 only; models/sparse_causal_attention.py)",
    )
    first_frame_mode: Literal["path", "clean"] = Field(
        "path",
        description="how a given first frame is held while sampling: path (latent frame 0 follows the frame's noisy "
        "path (1-t)·x0_f + t·ε; any text-to-video model, untrained for it) or clean (frame 0 stays the clean frame "
        "and its tokens get timestep 0, as Wan 2.2 TI2V; needs a Wan policy trained so: "
        "bootstrap.policy.first_frame_rate > 0)",
    )

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        if self.pixel_space and self.vae is not None:
            raise ValueError(f"policy: vae={self.vae!r} is given but pixel_space=true; set pixel_space=false to use it")
        if not self.pixel_space and self.vae is None:
            raise ValueError("policy: pixel_space=false needs `vae` (a folder or hub id of an AutoencoderKLWan)")
        if not self.pixel_space and self.family != "wan":
            raise ValueError(
                "policy: family=cogvideox runs in pixel space only (released CogVideoX checkpoints are v-prediction "
                "DDPM models, not rectified flow); use family=wan for a latent-space checkpoint"
            )
        if self.pixel_space and self.channels != 3:
            raise ValueError(f"policy: pixel_space=true works on RGB frames: channels must be 3, not {self.channels}")
        if self.attention == "sparse_causal" and self.family != "wan":
            raise ValueError(
                "policy: attention=sparse_causal is an attention processor of the Wan family; CogVideoX's joint "
                "text-video attention has no such option here: set family=wan or attention=full"
            )
        if self.first_frame_mode == "clean" and self.family != "wan":
            raise ValueError(
                "policy: first_frame_mode=clean gives frame 0's tokens their own timestep, which only the Wan family "
                "takes (diffusers' per-token timesteps of Wan 2.2 TI2V); set family=wan or first_frame_mode=path"
            )
        return self


POLICY_CONFIG_FILE = "policy.json"


def save_policy_folder(folder: str | Path, cfg: PolicyConfig, within: str | Path | None = None) -> Path:
    """Write `folder/policy.json`: the `PolicyConfig` a policy folder loads with. Local paths inside
    `within` (default: the folder itself; a stage passes its run directory) are stored relative to the
    folder, so the run folder can move; paths outside it and hub ids are stored as given."""
    root = Path(folder).absolute()
    inside = root if within is None else Path(within).absolute()
    data = cfg.model_dump(mode="json")
    for key in ("transformer", "text_encoder", "vae"):
        value = data.get(key)
        if value and Path(value).is_absolute() and Path(value).is_relative_to(inside):
            data[key] = Path(os.path.relpath(value, root)).as_posix()
    path = root / POLICY_CONFIG_FILE
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())
    return path


def load_policy_folder_config(folder: str | Path) -> PolicyConfig:
    """The `PolicyConfig` of a folder written by `save_policy_folder`, relative paths resolved."""
    root = Path(folder).absolute()
    path = root / POLICY_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"policy: `{root}` has no {POLICY_CONFIG_FILE}; rerun the stage that wrote the policy")
    data = json.loads(path.read_text())
    for key in ("transformer", "text_encoder", "vae"):
        value = data.get(key)
        if value and (root / value).exists():
            data[key] = str(root / value)
    try:
        return PolicyConfig.model_validate(data)
    except ValueError as err:
        raise ValueError(f"`{path}`: not a valid policy config: {err}") from err


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------------
# 2. Tiny checkpoints built from configs


def build_tiny(
    family: Family,
    out_dir: str | Path,
    *,
    text_dim: int = 64,
    text_len: int = 24,
    channels: int = 3,
    frames: int = 8,
    height: int = 16,
    width: int = 16,
    patch_size: tuple[int, int, int] = (1, 4, 4),
    layers: int = 4,
    dim: int = 128,
    head_dim: int = 32,
    seed: int = 0,
) -> Path:
    """A randomly initialised transformer of the real diffusers class, saved with `save_pretrained`.

    Defaults are ENVIRONMENT.md's prototype base for the world's 8×16×16 clips: Wan with patch
    (1, 4, 4), 4 layers, width 128 (128 tokens, ~1M parameters) learned recognisable balls, where
    patch (1, 2, 2) at width 64 only made fragments. `text_len` is the text encoder's padded length
    (CogVideoX's joint position table is built for exactly that many text tokens).
    """
    if dim % head_dim:
        raise ValueError(f"build_tiny: dim={dim} is not a multiple of head_dim={head_dim}")
    pt, ph, pw = patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"build_tiny: frames×height×width {frames}×{height}×{width} is not divisible by patch {patch_size}")
    torch.manual_seed(seed)
    if family == "wan":
        model = WanTransformer3DModel(
            patch_size=patch_size,
            num_attention_heads=dim // head_dim,
            attention_head_dim=head_dim,
            in_channels=channels,
            out_channels=channels,
            text_dim=text_dim,
            freq_dim=64,  # sinusoidal timestep features; 256 in Wan2.1, more than a tiny model uses
            ffn_dim=dim * 2,
            num_layers=layers,
            rope_max_seq_len=64,  # longest axis in tokens the rotary table covers; the world has ≤ 16
        )
    elif family == "cogvideox":
        if ph != pw:
            raise ValueError(f"build_tiny: CogVideoX patches are square; patch {patch_size} has h≠w")
        model = CogVideoXTransformer3DModel(
            num_attention_heads=dim // head_dim,
            attention_head_dim=head_dim,
            in_channels=channels,
            out_channels=channels,
            time_embed_dim=dim,
            text_embed_dim=text_dim,
            num_layers=layers,
            sample_width=width,
            sample_height=height,
            sample_frames=frames,
            patch_size=ph,
            patch_size_t=None if pt == 1 else pt,
            temporal_compression_ratio=1,  # pixel space: one position per frame, no VAE compression
            max_text_seq_length=text_len,
        )
    else:
        raise ValueError(f"build_tiny: unknown family {family!r}; use one of {sorted(TRANSFORMER_CLASSES)}")
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


# ---------------------------------------------------------------------------------------------
# 3. The policy


class Policy:
    """A video transformer with its text encoder (and VAE), as a rectified-flow velocity model."""

    def __init__(
        self,
        cfg: PolicyConfig,
        transformer: torch.nn.Module,
        text_encoder: TextEncoder,
        vae: AutoencoderKLWan | None = None,
    ):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if transformer.dtype != self.dtype:
            transformer = transformer.to(dtype=self.dtype)
        self.transformer = transformer.to(device=self.device).requires_grad_(False)
        self.text_encoder = text_encoder
        # The VAE stays float32: WanPipeline's recommendation, its decoder is sensitive to bf16.
        self.vae = None if vae is None else vae.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self._empty: TextEmbeddings | None = None
        # LoRAs folded into the transformer's weights (`fold_lora`): per module, (A, s·B) of each
        self._folded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.latent_shape = self._check_shapes()
        if cfg.attention == "sparse_causal":
            from models.sparse_causal_attention import use_sparse_causal_attention

            _, ph, pw = self.transformer.config.patch_size
            use_sparse_causal_attention(self.transformer, (self.latent_shape[2] // ph) * (self.latent_shape[3] // pw))

    @classmethod
    def from_pretrained(cls, cfg: PolicyConfig) -> Policy:
        """Load the transformer with `<Class>.from_pretrained`, the text encoder, and the VAE if any."""
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        model_cls = TRANSFORMER_CLASSES[cfg.family]
        try:
            # safetensors only: a checkpoint that has only pickled weights is refused, never unpickled
            transformer = model_cls.from_pretrained(
                cfg.transformer, subfolder=cfg.transformer_subfolder, torch_dtype=dtype, use_safetensors=True
            )
        except (OSError, ValueError) as err:
            raise OSError(
                f"policy: cannot load a {model_cls.__name__} from `{cfg.transformer}` "
                f"(subfolder {cfg.transformer_subfolder!r}): {err}. Give a folder written by `build_tiny` or "
                "`save_pretrained`, or a hub id with `transformer_subfolder` for a pipeline repo"
            ) from err
        text_encoder = load_text_encoder(
            cfg.text_encoder,
            device,
            dtype,
            max_length=cfg.text_max_length,
            tokenizer_subfolder=cfg.tokenizer_subfolder,
            encoder_subfolder=cfg.text_encoder_subfolder,
        )
        vae = None if cfg.pixel_space else load_wan_vae(cfg.vae, cfg.vae_subfolder)
        return cls(cfg, transformer, text_encoder, vae)

    def _check_shapes(self) -> tuple[int, int, int, int]:
        """(C, F, H, W) of a latent, after checking that config, checkpoints and video size agree."""
        cfg, tcfg = self.cfg, self.transformer.config
        # 1. the latent grid
        if self.vae is None:
            shape = (cfg.channels, cfg.frames, cfg.height, cfg.width)
        else:
            st, ss = vae_scale_factors(self.vae)
            if (cfg.frames - 1) % st or cfg.height % ss or cfg.width % ss:
                raise ValueError(
                    f"policy: {cfg.frames}×{cfg.height}×{cfg.width} does not fit the VAE (frames = {st}k+1, "
                    f"height and width multiples of {ss}); e.g. frames={(cfg.frames - 1) // st * st + 1}"
                )
            if cfg.channels != self.vae.config.z_dim:
                raise ValueError(f"policy: channels={cfg.channels} but the VAE's z_dim is {self.vae.config.z_dim}; set channels={self.vae.config.z_dim}")
            shape = (cfg.channels, (cfg.frames - 1) // st + 1, cfg.height // ss, cfg.width // ss)
        # 2. the transformer's channels and patches
        if tcfg.in_channels != cfg.channels:
            raise ValueError(
                f"policy: `{cfg.transformer}` takes {tcfg.in_channels} channels, the config says channels={cfg.channels}; pair the right checkpoint"
            )
        if self.cfg.family == "wan":
            patch = tuple(tcfg.patch_size)
        else:
            patch = (tcfg.patch_size_t or 1, tcfg.patch_size, tcfg.patch_size)
        if cfg.patch_size is not None and tuple(cfg.patch_size) != patch:
            raise ValueError(f"policy: config patch_size={cfg.patch_size} but `{cfg.transformer}` has {patch}; set it or leave it None")
        if any(n % p for n, p in zip(shape[1:], patch, strict=True)):
            raise ValueError(f"policy: latent grid {shape[1:]} (F, H, W) is not divisible by the patch {patch}; change frames/height/width")
        # 3. the text encoder's width (and CogVideoX's fixed text length)
        text_dim = tcfg.text_dim if self.cfg.family == "wan" else tcfg.text_embed_dim
        if text_dim != self.text_encoder.hidden_size:
            raise ValueError(
                f"policy: `{cfg.transformer}` expects text embeddings of width {text_dim}, "
                f"`{cfg.text_encoder}` gives {self.text_encoder.hidden_size}; pair the matching text encoder"
            )
        if self.cfg.family == "cogvideox" and tcfg.max_text_seq_length != self.text_encoder.max_length:
            raise ValueError(
                f"policy: `{cfg.transformer}` was built for {tcfg.max_text_seq_length} text tokens, the text encoder "
                f"pads to {self.text_encoder.max_length}; set text_max_length={tcfg.max_text_seq_length}"
            )
        return shape

    # -- text -----------------------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str]) -> TextEmbeddings:
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    def empty_text(self, batch: int) -> TextEmbeddings:
        """The empty prompt's embedding, classifier-free guidance's unconditional, repeated `batch` times."""
        if self._empty is None:
            self._empty = self.encode_text([""])
        return TextEmbeddings(
            self._empty.embeddings.expand(batch, -1, -1), self._empty.mask.expand(batch, -1)
        )

    def _as_text(self, text: TextEmbeddings | Sequence[str]) -> TextEmbeddings:
        return text.to(self.device, self.dtype) if isinstance(text, TextEmbeddings) else self.encode_text(text)

    # -- frames <-> latents ---------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, F, H, W, 3) -> latents (B, C, F', H', W') in the policy's dtype."""
        video = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
        expected = (self.cfg.frames, self.cfg.height, self.cfg.width, 3)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected or video.dtype != torch.uint8:
            raise ValueError(
                f"policy.encode: expected uint8 frames (B, {', '.join(map(str, expected))}), "
                f"got {video.dtype} {tuple(video.shape)}; resize or trim clips to the policy's frames/height/width"
            )
        x = video.to(self.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        if self.vae is None:
            return x.to(self.dtype)
        mean, inv_std = self._latent_stats()
        z = self.vae.encode(x).latent_dist.mode()
        return ((z - mean) * inv_std).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """latents (B, C, F', H', W') -> uint8 frames (B, F, H, W, 3) as a numpy array."""
        x = latents.float()
        if self.vae is not None:
            mean, inv_std = self._latent_stats()
            x = self.vae.decode(x / inv_std + mean).sample
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 4, 1).cpu().numpy()

    @torch.no_grad()
    def encode_first_frame(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> latent frame 0 (B, C, H', W') in float32.

        Pixel space: the image scaled to [-1, 1], so a frame held at this value decodes to the same
        uint8 image. VAE: Wan's VAE is causal in time (its first latent frame encodes pixel frame 0
        alone), so the image is encoded as a one-frame clip and its normalised latent is what the
        sampler holds; it decodes to the VAE's reconstruction of the image, not the image bit for bit.
        """
        image = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        expected = (self.cfg.height, self.cfg.width, 3)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected or image.dtype != torch.uint8:
            raise ValueError(
                f"policy.encode_first_frame: expected uint8 images (B, {', '.join(map(str, expected))}), got "
                f"{image.dtype} {tuple(image.shape)}; resize the first frames to the policy's height/width"
            )
        x = image.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.vae is None:
            return x
        mean, inv_std = self._latent_stats()
        z = self.vae.encode(x.unsqueeze(2)).latent_dist.mode()
        return ((z - mean) * inv_std)[:, :, 0].float()

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, device=self.device).view(1, c.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(c.latents_std, device=self.device).view(1, c.z_dim, 1, 1, 1)
        return mean, inv_std

    # -- the velocity field ---------------------------------------------------------------------

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """v_θ(x_t, t, y) for latents (B, C, F, H, W); returns (B, C, F, H, W).

        t is (B,) in [0, 1], one time per video, or (B, F), one time per latent frame (Wan only:
        diffusers' per-token timesteps, as Wan 2.2 TI2V gives a clean first frame timestep 0).
        """
        if x_t.ndim != 5 or tuple(x_t.shape[1:]) != self.latent_shape:
            raise ValueError(f"policy.velocity: x_t must be (B, {self.latent_shape}), got {tuple(x_t.shape)}")
        batch, frames = x_t.shape[0], x_t.shape[2]
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        if t.ndim == 2:
            if tuple(t.shape) != (batch, frames):
                raise ValueError(f"policy.velocity: per-frame t must be (B, F) = ({batch}, {frames}), got {tuple(t.shape)}")
            timestep = self._token_timesteps(t) * TIMESTEP_SCALE
        else:
            timestep = t.reshape(-1).expand(batch) * TIMESTEP_SCALE
        emb = (text_emb * text_mask.unsqueeze(-1).to(text_emb.dtype)).to(self.dtype)
        x = x_t.to(self.dtype)
        if self.cfg.family == "wan":
            return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]
        out = self.transformer(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=emb,
            timestep=timestep,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    def _token_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Per-frame times (B, F) → one time per patch token (B, F/pt · H/ph · W/pw), in the order Wan flattens them."""
        if self.cfg.family != "wan":
            raise ValueError("policy.velocity: per-frame times need the Wan family (CogVideoX takes one timestep per video)")
        pt, ph, pw = self.transformer.config.patch_size
        _, frames, height, width = self.latent_shape
        if pt > 1 and not bool((t.unflatten(1, (frames // pt, pt)) == t[:, ::pt, None]).all()):
            raise ValueError(f"policy.velocity: frames of one temporal patch (pt={pt}) must share a time")
        return t[:, ::pt].repeat_interleave((height // ph) * (width // pw), dim=1)

    def flow_matching_loss(
        self,
        x0: torch.Tensor,
        text: TextEmbeddings | Sequence[str],
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        clean_first_frame: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample rectified-flow error, shape (B,).

        `e = mean over C·F·H·W of (v_θ(x_t, t, y) - (ε - x0))²`, `x_t = (1-t)·x0 + t·ε`
        (Liu et al. 2022; Lipman et al. 2022). t ~ U(0, 1) and ε ~ N(0, I) unless given: pass
        both to share them between a winner and a loser (Flow-DPO). `clean_first_frame` (B,) bool
        marks rows trained to continue a given frame (Wan 2.2 TI2V): their frame 0 stays x0's,
        its tokens get t = 0, and the error is the mean over frames 1..F-1.
        """
        # 1. draw t and ε where not given
        batch = x0.shape[0]
        x0 = x0.to(self.device, self.dtype)
        if t is None:
            t = torch.rand(batch, generator=generator, device="cpu").to(self.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=torch.float32).to(self.device, self.dtype)
        t = t.to(self.device, torch.float32)
        # 2. interpolate (frame 0 held clean in the marked rows) and regress the velocity
        held = torch.zeros(batch, dtype=torch.bool) if clean_first_frame is None else clean_first_frame
        held = held.to(self.device, torch.bool)
        x_t, t_in = noisy_input(x0, t, noise, held)
        text = self._as_text(text)
        pred = self.velocity(x_t, t_in, text.embeddings, text.mask)
        sq_err = (pred.float() - (noise - x0).float()).pow(2)
        if not bool(held.any()):
            return sq_err.flatten(1).mean(1)
        return torch.where(held, sq_err[:, :, 1:].flatten(1).mean(1), sq_err.flatten(1).mean(1))

    # -- sampling -------------------------------------------------------------------------------

    def time_grid(self, steps: int) -> torch.Tensor:
        """steps+1 times from 1 to 0, shifted like Wan's scheduler: σ' = sσ / (1 + (s-1)σ)."""
        sigma = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        s = self.cfg.flow_shift
        return (s * sigma / (1 + (s - 1) * sigma)).float()

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """ε for each seed, drawn one video at a time on the CPU: the same seed gives the same noise anywhere."""
        return torch.stack(
            [torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        ).to(self.device, self.dtype)

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        *,
        first_frame: np.ndarray | torch.Tensor | None = None,
        reward_guidance: RewardGuidance | None = None,
    ) -> torch.Tensor:
        """Euler integration of dx/dt = ṽ from t=1 to 0 with ṽ = v_u + g·(v_c - v_u).

        `first_frame` (uint8 (B, H, W, 3), HuViDPO): latent frame 0 is held on the path of the given
        frame: at every step frame 0 of x_t is replaced by `(1-t)·x0_f + t·ε_0` (ε_0 the seed's noise
        of frame 0) — or, with `first_frame_mode=clean`, by x0_f itself with its tokens at t = 0
        (Wan 2.2 TI2V, for a policy trained so) — and the end point's frame 0 is x0_f itself
        (`encode_first_frame` says what that reproduces). `reward_guidance` (Flow-NRG, models/reward_guidance.py): after CFG,
        `ṽ = v - w·t/(1-t)·∇_x r(x_t, y, t)` at every step but t = 1.
        """
        # 1. check inputs
        if isinstance(prompts, str) or len(prompts) != len(seeds):
            raise ValueError(
                f"policy.sample: give one seed per prompt (a list each); got {len(prompts)} prompts, {len(seeds)} seeds"
            )
        steps = self.cfg.steps if steps is None else int(steps)
        guidance = self.cfg.guidance_scale if guidance is None else float(guidance)
        if steps < 1 or guidance < 1.0:
            raise ValueError(f"policy.sample: steps={steps} must be ≥ 1 and guidance={guidance} ≥ 1 (1: no guidance)")
        x0_f = None
        if first_frame is not None:
            x0_f = self.encode_first_frame(first_frame)
            if x0_f.shape[0] != len(prompts):
                raise ValueError(f"policy.sample: {x0_f.shape[0]} first frames for {len(prompts)} prompts; give one per prompt")
        if reward_guidance is not None and self.vae is not None:
            raise ValueError(
                "policy.sample: reward guidance needs a pixel-space policy (the reward model reads RGB frames and "
                "differentiating through the Wan VAE decoder is not implemented); sample without reward guidance"
            )
        # 2. conditional and unconditional text, in one batch
        batch = len(prompts)
        text = self.encode_text(prompts)
        if guidance != 1.0:
            text = TextEmbeddings.cat([text, self.empty_text(batch)])
        # 3. integrate from noise to data
        x = self.initial_noise(seeds)
        eps_0 = x[:, :, 0].float().clone()
        grid = self.time_grid(steps)
        clean = x0_f is not None and self.cfg.first_frame_mode == "clean"
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            if x0_f is not None:
                x[:, :, 0] = (x0_f if clean else (1 - t) * x0_f + t * eps_0).to(self.dtype)
            xin = torch.cat([x, x]) if guidance != 1.0 else x
            t_in = t.expand(xin.shape[0])
            if clean:  # frame 0's tokens are told they are clean (t = 0), as the policy was trained
                t_in = held_frame_times(t_in, xin.shape[2])
            v = self.velocity(xin, t_in, text.embeddings, text.mask).float()
            if guidance != 1.0:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            if reward_guidance is not None and float(t) < 1.0:
                v = v - reward_guidance.correction(x.float(), v, float(t), prompts)
            x = (x.float() + (t_next - t).item() * v).to(self.dtype)
        if x0_f is not None:
            x[:, :, 0] = x0_f.to(self.dtype)
        if reward_guidance is not None:
            reward_guidance.report_clipping()
        return x

    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        *,
        first_frame: np.ndarray | torch.Tensor | None = None,
        reward_guidance: RewardGuidance | None = None,
    ) -> np.ndarray:
        """uint8 videos (B, F, H, W, 3), one per (prompt, seed); the same seed gives the same video in any batch."""
        latents = self.sample_latents(
            prompts, seeds, steps, guidance, first_frame=first_frame, reward_guidance=reward_guidance
        )
        return self.decode(latents)

    # -- LoRA -----------------------------------------------------------------------------------

    @property
    def has_lora(self) -> bool:
        return ADAPTER in (getattr(self.transformer, "peft_config", None) or {})

    def add_lora(
        self,
        rank: int,
        alpha: float,
        target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Inject a fresh peft LoRA (B = 0, so the output is the base's) and make only it trainable."""
        if self.has_lora:
            raise ValueError("policy.add_lora: the transformer already has a LoRA adapter; load or add only one")
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights=True
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.transformer.add_adapter(config, adapter_name=ADAPTER)
            except ValueError as err:
                raise ValueError(
                    f"policy.add_lora: target_modules={list(target_modules)} do not fit "
                    f"{type(self.transformer).__name__} ({err}); the attention projections are {list(DEFAULT_LORA_TARGETS)}"
                ) from err
        self._lora_trainable()

    def _lora_trainable(self) -> None:
        """Only the adapter trains, in float32 (diffusers' `cast_training_params`: Adam's small steps vanish in bf16)."""
        for name, p in self.transformer.named_parameters():
            p.requires_grad_(".lora_" in name)
        for p in self.lora_parameters():
            p.data = p.data.float()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.transformer.named_parameters() if ".lora_" in name]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base transformer (the Flow-DPO reference) without a second copy in memory."""
        if not self.has_lora:
            raise ValueError("policy.disable_adapter: there is no LoRA adapter; call add_lora or load_lora first")
        trainable = {id(p): p.requires_grad for p in self.lora_parameters()}
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()
            for p in self.lora_parameters():
                p.requires_grad_(trainable[id(p)])

    def _lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per adapted module: (A, s·B), so that its weight update is `s·B·A` (s = α/r)."""
        from peft.tuners.lora import LoraLayer

        factors = {}
        for name, module in self.transformer.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                a = module.lora_A[ADAPTER].weight.detach()
                b = module.lora_B[ADAPTER].weight.detach() * module.scaling[ADAPTER]
                factors[name] = (a.clone(), b.clone())
        return factors

    def fold_lora(self) -> None:
        """Fold the adapter into the transformer's weights and remove it: the policy is unchanged,
        but a fresh `add_lora` now starts from it and `disable_adapter` gives it back (the IPO
        reference that moves to the previous round's policy). `save_lora` still writes one LoRA
        over the weights as loaded: the folded ones stacked with the new one (ranks add up)."""
        if not self.has_lora:
            raise ValueError("policy.fold_lora: there is no LoRA adapter to fold; call load_lora first")
        factors = self._lora_factors()
        self.transformer.delete_adapters(ADAPTER)
        modules = dict(self.transformer.named_modules())
        with torch.no_grad():
            for name, (a, b) in factors.items():
                weight = modules[name].weight
                weight.add_((b.float() @ a.float()).to(weight.dtype))
                self._folded.setdefault(name, []).append((a, b))

    def merge_lora(self) -> None:
        """Merge the adapter into the weights and remove the LoRA layers (diffusers' `fuse_lora` then
        `unload_lora`): the same policy as a plain transformer, whose `save_pretrained` writes full
        weights a later `from_pretrained` loads without the LoRA. `fold_lora` instead keeps the
        adapter's factors so `save_lora` can stack them; a policy whose weights are trained in full
        (finetune's real-clip phase) is merged."""
        if not self.has_lora:
            raise ValueError("policy.merge_lora: there is no LoRA adapter to merge; call load_lora first")
        if self._folded:
            raise ValueError("policy.merge_lora: this policy has folded LoRAs that save_lora would stack; merge before folding")
        self.transformer.fuse_lora()
        self.transformer.unload_lora()

    def save_lora(self, out_dir: str | Path) -> Path:
        """Write the adapter as `pytorch_lora_weights.safetensors` in diffusers' pipeline layout.

        After `fold_lora`, the file holds the folded adapters and the current one stacked into one
        LoRA (A's rows and s·B's columns concatenated, α = r so s = 1): `ΣsᵢBᵢAᵢ` exactly, over
        the weights the policy was loaded with."""
        if not self.has_lora:
            raise ValueError("policy.save_lora: there is no LoRA adapter to save; call add_lora or load_lora first")
        state = get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER)
        config = self.transformer.peft_config[ADAPTER].to_dict()
        if self._folded:
            state = {}
            for name, (a, b) in self._lora_factors().items():
                earlier = self._folded.get(name, [])
                state[f"{name}.lora_A.weight"] = torch.cat([f[0] for f in earlier] + [a], dim=0)
                state[f"{name}.lora_B.weight"] = torch.cat([f[1] for f in earlier] + [b], dim=1)
            ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
            if len(ranks) != 1:
                raise ValueError(f"policy.save_lora: folded adapters cover different modules (ranks {sorted(ranks)})")
            rank = ranks.pop()
            config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
        tensors = {f"{LORA_PREFIX}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}
        config = {f"{LORA_PREFIX}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        metadata = {"format": "pt", LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True, default=str)}
        path = Path(out_dir) / LORA_WEIGHT_NAME
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))
        return path

    def load_lora(self, lora_dir: str | Path) -> None:
        """Load a LoRA saved by `save_lora` (or any diffusers pipeline-layout LoRA for this family), trainable."""
        path = Path(lora_dir) / LORA_WEIGHT_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"policy.load_lora: no `{LORA_WEIGHT_NAME}` in `{lora_dir}`; give the folder `save_lora` wrote"
            )
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        if not any(k.startswith(f"{LORA_PREFIX}.") for k in keys):
            raise ValueError(
                f"policy.load_lora: `{path}` has no `{LORA_PREFIX}.`-prefixed LoRA keys (first: {keys[:2]}); "
                "it is not a diffusers pipeline LoRA for the transformer"
            )
        if self.has_lora:
            self.transformer.delete_adapters(ADAPTER)
        self.transformer.load_lora_adapter(
            str(lora_dir), prefix=LORA_PREFIX, adapter_name=ADAPTER, weight_name=LORA_WEIGHT_NAME, use_safetensors=True
        )
        self.transformer.set_adapter(ADAPTER)
        self._lora_trainable()


# ---------------------------------------------------------------------------------------------
# 4. The Wan VAE (latent-space policies)


def vae_scale_factors(vae: AutoencoderKLWan) -> tuple[int, int]:
    """(temporal, spatial) compression of a Wan VAE, read as WanPipeline reads it."""
    c = vae.config
    temporal = getattr(c, "scale_factor_temporal", None) or 2 ** sum(c.temperal_downsample)
    spatial = getattr(c, "scale_factor_spatial", None) or 2 ** len(c.temperal_downsample)
    return int(temporal), int(spatial)


def load_wan_vae(name_or_path: str, subfolder: str | None = None) -> AutoencoderKLWan:
    try:
        return AutoencoderKLWan.from_pretrained(
            name_or_path, subfolder=subfolder, torch_dtype=torch.float32, use_safetensors=True
        )
    except (OSError, ValueError) as err:
        raise OSError(
            f"policy: cannot load an AutoencoderKLWan from `{name_or_path}` (subfolder {subfolder!r}): {err}. "
            "Give the `vae` folder of a Wan diffusers pipeline (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers with "
            "vae_subfolder=vae) or a folder written by `AutoencoderKLWan.save_pretrained`"
        ) from err

