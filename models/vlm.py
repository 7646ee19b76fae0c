"""A vision-language model as critic and scorer: Qwen2-VL / Qwen2.5-VL through transformers.

Two stages ask a VLM about videos:

- `label` asks it to compare two generations of one prompt on VideoAlign's three dimensions —
  VQ (visual quality), MQ (motion quality), TA (text alignment) — answering `A`, `B` or `tie`
  per dimension (`VLMCritic.compare`), or to rate one video 1–5 per dimension (`rate`);
- `select` asks it whether real footage is physically plausible (`physics`), the scorer that
  stands in for the embedded world's physics judge on real data.

The rubrics follow VideoAlign's annotation guidelines (arXiv 2501.13918, §3.1 and appendix):
VQ judges each frame's clarity, detail and artefacts without looking at motion or the prompt;
MQ judges motion alone (natural, smooth, physically plausible, no distortion, teleporting or
floating); TA judges whether the video shows the prompt's objects, attributes and motion.

A VLM's answer is text, and text can say anything. Each answer format has a strict parser: a
dimension it cannot read becomes `invalid` (or `None` for scores), the raw text is kept, and
nothing is guessed — `invalid` labels are masked by the reward model's loss (ALGORITHMS.md §5).

Frames are sampled at a fixed rate (2 fps, VideoReward's) from the caller's uint8 RGB arrays,
at most `max_frames` of them, and the sampled clip's rate reaches the processor as metadata
(Qwen2.5-VL turns it into temporal positions). Decoding is greedy, so a call is deterministic.

No weights can be downloaded here, so `build_tiny_vlm` writes a tiny random-weight Qwen2-VL —
config, byte-level BPE tokenizer trained in memory, processor, chat template — with
`save_pretrained`; `VLMCritic` loads it with the same `AutoProcessor` /
`AutoModelForImageTextToText.from_pretrained` calls a real run makes with
`Qwen/Qwen2-VL-2B-Instruct`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.frames import check_clip

DIMENSIONS = ("VQ", "MQ", "TA")
PAIR_LABELS = ("A", "B", "tie")
INVALID = "invalid"
SCORE_RANGE = (1, 5)
REASON_KEY = "Reason"
PHYSICS_KEY = "plausible"
PHYSICS_ANSWERS = {"yes": 1.0, "no": 0.0}

# ---------------------------------------------------------------------------------------------
# 1. Config


class VLMConfig(BaseModel):
    """Which VLM judges, where it runs and how it sees a video; shared by `label` and `select`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        ...,
        min_length=1,
        description="hub id (e.g. Qwen/Qwen2-VL-2B-Instruct, already in the local HF cache) or a "
        "folder written by save_pretrained; no default: a critic is a deliberate choice",
    )
    device: str = Field("auto", description="`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, …")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto`: bfloat16 on CUDA (Qwen2-VL's training dtype), float32 on CPU (fast, exact there)"
    )
    trust_remote_code: bool = Field(
        False, description="run Python shipped with the checkpoint; Qwen2-VL/2.5-VL are native to transformers"
    )
    local_files_only: bool = Field(
        True, description="nothing reaches for the network at run time; prefetch hub models into the HF cache"
    )
    sample_fps: float = Field(
        2.0, gt=0, description="frames per second shown to the VLM (VideoReward samples at 2 fps)"
    )
    max_frames: int = Field(
        32, ge=1, le=768, description="most frames per video: 16 s at 2 fps; longer clips are spread evenly"
    )
    max_frame_pixels: int | None = Field(
        None,
        ge=784,
        description="cap on pixels per frame after resizing (e.g. 448*448 to bound memory); None keeps the "
        "checkpoint's processor setting",
    )
    max_new_tokens: int = Field(
        64, ge=1, description="answer length: three label lines and a one-line reason fit in ~40 tokens"
    )
    batch_size: int = Field(4, ge=1, description="questions per batched generate call (left-padded)")


def resolve_device_dtype(cfg: VLMConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `cfg` asks for, with `auto` resolved against this machine."""
    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.device == "auto"
        else torch.device(cfg.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"VLMConfig.device={cfg.device!r} but CUDA is not available here; set device=auto or cpu")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


# ---------------------------------------------------------------------------------------------
# 2. Rubrics and prompts

SYSTEM_PROMPT = "You are a careful rater of videos. You follow the answer format exactly."

RUBRIC = {
    "VQ": "VQ (visual quality): judge each frame as a still image, ignoring motion and the prompt. "
    "Is it clear and sharp, rich in detail, well lit and coloured, and free of artefacts "
    "such as blur, noise, blocky patches, smeared textures or malformed objects?",
    "MQ": "MQ (motion quality): judge the motion alone, ignoring the prompt. Is it natural, smooth "
    "and physically plausible: objects fall, bounce, roll and collide as real objects do, keep "
    "their shape and size, and do not distort, flicker, jitter, teleport, float, hang in the air "
    "or pass through each other?",
    "TA": "TA (text alignment): does the video show what the prompt says: its objects, their "
    "attributes (colour, number, size), their motion and direction, and their positions?",
}

PHYSICS_RUBRIC = (
    "Judge physics only, not image quality. Real objects fall under gravity, bounce lower each "
    "time, roll at a steady or slowing speed and push each other when they collide. Implausible: "
    "an object that floats up, hangs in the air, jumps or teleports between frames, passes "
    "through another object or the floor, or changes shape or size without cause."
)


def pair_question(prompt: str) -> str:
    """The pairwise rubric for two generations of `prompt` (videos A and B precede this text)."""
    dims = "\n".join(f"- {RUBRIC[d]}" for d in DIMENSIONS)
    lines = "\n".join(f"{d}: <A|B|tie>" for d in DIMENSIONS)
    return (
        f'Video A and video B were generated from the same prompt: "{prompt}"\n'
        f"Compare them on three dimensions, each on its own:\n{dims}\n"
        "For each dimension answer A if video A is better, B if video B is better, or tie if "
        "neither is clearly better.\n"
        f"Answer in exactly this format, nothing else:\n{lines}\n{REASON_KEY}: <one sentence>"
    )


def point_question(prompt: str) -> str:
    """The pointwise rubric for one generation of `prompt` (the video precedes this text)."""
    dims = "\n".join(f"- {RUBRIC[d]}" for d in DIMENSIONS)
    low, high = SCORE_RANGE
    lines = "\n".join(f"{d}: <{low}-{high}>" for d in DIMENSIONS)
    return (
        f'The video was generated from the prompt: "{prompt}"\n'
        f"Rate it on three dimensions, each on its own:\n{dims}\n"
        f"Give each dimension a whole number from {low} (very poor) to {high} (excellent).\n"
        f"Answer in exactly this format, nothing else:\n{lines}\n{REASON_KEY}: <one sentence>"
    )


def physics_question(caption: str) -> str:
    """The plausibility question for real footage; the caption says what should happen."""
    context = f'The video\'s caption: "{caption}"\n' if caption.strip() else ""
    return (
        f"{context}Is the motion in this video physically plausible?\n{PHYSICS_RUBRIC}\n"
        f"Answer in exactly this format, nothing else:\n{PHYSICS_KEY}: <yes|no>\n{REASON_KEY}: <one sentence>"
    )


def _messages(question: str, video_names: Sequence[str | None]) -> list[dict]:
    """Chat messages in the transformers multimodal layout: video slots (named when there are
    several), then the question."""
    content: list[dict] = []
    for name in video_names:
        if name:
            content.append({"type": "text", "text": f"{name}:"})
        content.append({"type": "video"})
    content.append({"type": "text", "text": question})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


# ---------------------------------------------------------------------------------------------
# 3. Strict parsers

_LINE = re.compile(r"^(?P<key>[A-Za-z]+):[ \t]*(?P<value>.*?)[ \t]*$")


@dataclass(frozen=True)
class PairJudgement:
    """One pairwise verdict: a label per dimension (`invalid` when unreadable) and the raw answer."""

    labels: dict[str, str]
    rationale: str | None
    raw: str

    @property
    def valid(self) -> bool:
        return all(label != INVALID for label in self.labels.values())


@dataclass(frozen=True)
class PointJudgement:
    """One pointwise verdict: a 1–5 score per dimension (`None` when unreadable) and the raw answer."""

    scores: dict[str, int | None]
    rationale: str | None
    raw: str

    @property
    def valid(self) -> bool:
        return all(score is not None for score in self.scores.values())


def _fields(raw: str, keys: Sequence[str]) -> dict[str, str | None] | None:
    """The `Key: value` lines of an answer, or None when the answer is not in the format at all.

    Blank lines and whitespace around the answer are forgiven (generation ends where it likes);
    any other line that is not `<known key>: value` makes the whole answer unreadable, because
    a model that adds prose did not follow the format and its labels cannot be trusted. A key
    given twice is unreadable (None): which of the two is meant would be a guess.
    """
    allowed = (*keys, REASON_KEY)
    seen: dict[str, list[str]] = {}
    lines = [line for line in raw.strip().splitlines() if line.strip()]
    if not lines:
        return None
    for line in lines:
        match = _LINE.match(line.strip())
        if match is None or match["key"] not in allowed:
            return None
        seen.setdefault(match["key"], []).append(match["value"])
    return {key: values[0] if len(values) == 1 else None for key, values in seen.items()}


def _rationale(fields: dict[str, str | None]) -> str | None:
    return fields.get(REASON_KEY) or None


def parse_pair_answer(raw: str) -> PairJudgement:
    """Read `VQ: A|B|tie`, `MQ: …`, `TA: …`, `Reason: …`; anything else per dimension is `invalid`.

    Labels are case-sensitive (`A`, `B`, `tie`): `a` or `Tie` are not what was asked for.
    """
    fields = _fields(raw, DIMENSIONS)
    if fields is None:
        return PairJudgement({d: INVALID for d in DIMENSIONS}, None, raw)
    labels = {d: fields[d] if fields.get(d) in PAIR_LABELS else INVALID for d in DIMENSIONS}
    return PairJudgement(labels, _rationale(fields), raw)


def _score(value: str | None) -> int | None:
    low, high = SCORE_RANGE
    if value is None or not re.fullmatch(r"[0-9]", value):
        return None
    score = int(value)
    return score if low <= score <= high else None


def parse_point_answer(raw: str) -> PointJudgement:
    """Read `VQ: 1..5`, `MQ: …`, `TA: …`, `Reason: …`; a dimension not a whole number in range is None."""
    fields = _fields(raw, DIMENSIONS)
    if fields is None:
        return PointJudgement({d: None for d in DIMENSIONS}, None, raw)
    return PointJudgement({d: _score(fields.get(d)) for d in DIMENSIONS}, _rationale(fields), raw)


def parse_physics_answer(raw: str) -> float | None:
    """Read `plausible: yes|no` (and an optional `Reason:` line): 1.0, 0.0, or None when unreadable."""
    fields = _fields(raw, (PHYSICS_KEY,))
    if fields is None:
        return None
    return PHYSICS_ANSWERS.get(fields.get(PHYSICS_KEY) or "")


# ---------------------------------------------------------------------------------------------
# 4. Frames


def sample_frames(frames: np.ndarray, fps: float, cfg: VLMConfig) -> tuple[np.ndarray, float]:
    """The frames the VLM sees — one every 1/`sample_fps` s, at most `max_frames` spread evenly —
    and the rate of the sampled clip (for the processor's temporal positions).

    A clip slower than `sample_fps` is shown whole at its own rate.
    """
    total = len(frames)
    step = max(1.0, fps / cfg.sample_fps)
    idx = np.arange(0.0, total, step).astype(int)
    if len(idx) > cfg.max_frames:
        idx = np.rint(np.linspace(0, total - 1, cfg.max_frames)).astype(int)
    duration = total / fps
    return frames[idx], len(idx) / duration


def _check_videos(videos: Sequence[np.ndarray], fps: float | Sequence[float], where: str) -> list[float]:
    """Raise on anything that is not a list of uint8 RGB (F,H,W,3) clips; return one fps per clip."""
    if isinstance(videos, np.ndarray):
        raise ValueError(f"{where}: expected a list of videos, got one array {videos.shape}; wrap it in a list")
    for i, frames in enumerate(videos):
        check_clip(frames, f"{where}[{i}]")
    rates = [float(fps)] * len(videos) if isinstance(fps, int | float) else [float(r) for r in fps]
    if len(rates) != len(videos):
        raise ValueError(
            f"{where}: {len(videos)} videos but {len(rates)} fps values; give one fps per video or one for all"
        )
    for i, rate in enumerate(rates):
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"{where}[{i}]: fps must be a positive number, got {rate}; pass the video's frame rate")
    return rates


def _check_texts(texts: Sequence[str], count: int, where: str, special: Sequence[str], allow_empty: bool) -> None:
    if isinstance(texts, str) or len(texts) != count:
        raise ValueError(f"{where}: expected a list of {count} strings (one per video or pair), got {texts!r:.80}")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or (not allow_empty and not text.strip()):
            raise ValueError(f"{where}[{i}]: expected a non-empty string, got {text!r}; give every video its prompt")
        token = next((t for t in special if t in text), None)
        if token is not None:
            raise ValueError(
                f"{where}[{i}]: contains the model's control token {token!r}, which would break the "
                "video slots of the chat; remove it from the text"
            )


# ---------------------------------------------------------------------------------------------
# 5. The critic


class VLMCritic:
    """A VLM loaded once (processor + model) that compares, rates and checks physics in batches."""

    def __init__(self, cfg: VLMConfig) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

        # 1. load, offline unless the config says otherwise
        self.cfg = cfg
        self.device, self.dtype = resolve_device_dtype(cfg)
        path = Path(cfg.model)
        if (len(path.parts) > 2 or path.is_absolute() or cfg.model.startswith(".")) and not path.is_dir():
            raise FileNotFoundError(
                f"VLMConfig.model={cfg.model!r} is neither a folder nor a hub id; pass a folder written "
                "by save_pretrained (e.g. build_tiny_vlm) or a hub id such as Qwen/Qwen2-VL-2B-Instruct"
            )
        common = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": cfg.local_files_only}
        try:
            self.processor = AutoProcessor.from_pretrained(cfg.model, **common)
            # safetensors only: a checkpoint that has only pickled weights is refused, never unpickled
            self.model = AutoModelForImageTextToText.from_pretrained(
                cfg.model, dtype=self.dtype, use_safetensors=True, **common
            )
        except OSError as err:
            raise OSError(
                f"VLMConfig.model={cfg.model!r}: cannot load it with local_files_only={cfg.local_files_only} "
                f"({err}); download it into the HF cache beforehand (huggingface-cli download {cfg.model}) "
                "or pass a local folder"
            ) from err
        self.model.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        if (
            getattr(self.processor, "video_processor", None) is None
            or getattr(self.processor, "chat_template", None) is None
        ):
            raise ValueError(
                f"{cfg.model}: its processor has no video processor or no chat template; use a video "
                "VLM checkpoint (Qwen2-VL / Qwen2.5-VL) saved with its processor"
            )
        # 2. batched generation pads on the left, so every answer starts right after its prompt
        tokenizer.padding_side = "left"
        self.special_tokens = [t for t in tokenizer.all_special_tokens if t]
        eos = self.model.generation_config.eos_token_id
        self.generation = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )

    def compare(
        self,
        videos_a: Sequence[np.ndarray],
        videos_b: Sequence[np.ndarray],
        prompts: Sequence[str],
        fps_a: float | Sequence[float],
        fps_b: float | Sequence[float] | None = None,
    ) -> list[PairJudgement]:
        """Pairwise VQ/MQ/TA verdicts for pairs (videos_a[i], videos_b[i]) of prompts[i].

        `fps_b` defaults to `fps_a` (two samples of one policy share a frame rate).
        """
        rates_a = _check_videos(videos_a, fps_a, "compare: videos_a")
        rates_b = _check_videos(videos_b, fps_a if fps_b is None else fps_b, "compare: videos_b")
        if len(videos_a) != len(videos_b):
            raise ValueError(f"compare: {len(videos_a)} videos_a but {len(videos_b)} videos_b; pass one B per A")
        _check_texts(prompts, len(videos_a), "compare: prompts", self.special_tokens, allow_empty=False)
        questions = [
            (_messages(pair_question(p), ("Video A", "Video B")), [(a, ra), (b, rb)])
            for p, a, ra, b, rb in zip(prompts, videos_a, rates_a, videos_b, rates_b, strict=True)
        ]
        return [parse_pair_answer(raw) for raw in self.answer(questions)]

    def rate(
        self, videos: Sequence[np.ndarray], prompts: Sequence[str], fps: float | Sequence[float]
    ) -> list[PointJudgement]:
        """Pointwise 1–5 VQ/MQ/TA scores for each video of its prompt."""
        rates = _check_videos(videos, fps, "rate: videos")
        _check_texts(prompts, len(videos), "rate: prompts", self.special_tokens, allow_empty=False)
        questions = [
            (_messages(point_question(p), (None,)), [(v, r)]) for p, v, r in zip(prompts, videos, rates, strict=True)
        ]
        return [parse_point_answer(raw) for raw in self.answer(questions)]

    def physics(
        self, videos: Sequence[np.ndarray], captions: Sequence[str], fps: float | Sequence[float]
    ) -> list[tuple[float | None, str]]:
        """Physical plausibility of each video: (1.0 yes / 0.0 no / None unreadable, raw answer).

        Captions may be empty (real footage without one); the question then omits it.
        """
        rates = _check_videos(videos, fps, "physics: videos")
        _check_texts(captions, len(videos), "physics: captions", self.special_tokens, allow_empty=True)
        questions = [
            (_messages(physics_question(c), (None,)), [(v, r)]) for c, v, r in zip(captions, videos, rates, strict=True)
        ]
        return [(parse_physics_answer(raw), raw) for raw in self.answer(questions)]

    @torch.inference_mode()
    def answer(self, questions: Sequence[tuple[list[dict], list[tuple[np.ndarray, float]]]]) -> list[str]:
        """Raw answers to chat questions, each with its (frames, fps) videos, `batch_size` at a time."""
        answers: list[str] = []
        for start in range(0, len(questions), self.cfg.batch_size):
            batch = questions[start : start + self.cfg.batch_size]
            # 1. render each chat and sample its videos at the configured rate
            texts = [
                self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
                for msgs, _ in batch
            ]
            clips, metadata = [], []
            for _, videos in batch:
                for frames, fps in videos:
                    sampled, rate = sample_frames(frames, fps, self.cfg)
                    clips.append(sampled)
                    metadata.append({"total_num_frames": len(sampled), "fps": rate})
            # 2. tokenize with the videos' placeholder tokens expanded; pad on the left
            inputs = self.processor(
                text=texts,
                videos=clips,
                video_metadata=metadata,
                padding=True,
                return_tensors="pt",
                **self._video_kwargs(),
            ).to(self.device)
            if "pixel_values_videos" in inputs:
                inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
            # 3. greedy decoding; keep only the new tokens
            output = self.model.generate(**inputs, generation_config=self.generation)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(self.processor.batch_decode(new_tokens, skip_special_tokens=True))
        return answers

    def _video_kwargs(self) -> dict:
        """Frames are sampled here, never again by the processor; the total pixel cap of
        qwen-vl-utils (the reference preprocessing) bounds long clips."""
        kwargs: dict = {"do_sample_frames": False, "cap_pixels_per_frame": True}
        if self.cfg.max_frame_pixels is not None:
            shortest = self.processor.video_processor.size["shortest_edge"]
            kwargs["size"] = {
                "shortest_edge": min(shortest, self.cfg.max_frame_pixels),
                "longest_edge": self.cfg.max_frame_pixels,
            }
        return kwargs


# ---------------------------------------------------------------------------------------------
# 6. A tiny Qwen2-VL, built offline

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's ChatML layout: a role header per message, vision slots as start/pad/end tokens that the
# processor expands to one pad per visual token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class TinyVLMConfig(BaseModel):
    """Sizes of the tiny random-weight Qwen2-VL the tests and the CPU default load."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(64, ge=8, description="text width: 2 CPU cores answer a batch in well under a second")
    layers: int = Field(2, ge=1, description="text decoder layers: the fewest that still stack attention")
    heads: int = Field(4, ge=1, description="attention heads; head_dim = hidden_size / heads must be a multiple of 4")
    kv_heads: int = Field(2, ge=1, description="grouped-query KV heads, as in Qwen2-VL")
    vision_dim: int = Field(32, ge=8, description="vision tower width")
    vision_layers: int = Field(2, ge=1, description="vision tower depth")
    vocab_size: int = Field(600, ge=300, description="BPE target size: bytes (256) + specials + merges of the rubric")
    max_pixels: int = Field(56 * 56, ge=784, description="per-frame pixel cap: a 64 px frame becomes 2x2 merged tokens")


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary frequencies; it must sum to head_dim / 2."""
    half = head_dim // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE learns merges from: the rubrics and well-formed answers in every format."""
    prompt = "a red ball falls and bounces twice"
    answers = [
        "\n".join(f"{d}: {label}" for d in DIMENSIONS) + f"\n{REASON_KEY}: video A moves more naturally."
        for label in PAIR_LABELS
    ]
    answers += [
        "\n".join(f"{d}: {score}" for d in DIMENSIONS) + f"\n{REASON_KEY}: clear frames." for score in range(1, 6)
    ]
    answers += [f"{PHYSICS_KEY}: {word}\n{REASON_KEY}: the ball floats." for word in PHYSICS_ANSWERS]
    texts = [SYSTEM_PROMPT, pair_question(prompt), point_question(prompt), physics_question(prompt), *answers]
    return texts * 4


def build_tiny_vlm(out_dir: str | Path, seed: int = 0, tiny: TinyVLMConfig | None = None) -> Path:
    """Write a tiny random-weight Qwen2-VL (model, tokenizer, processor, chat template) to `out_dir`.

    `AutoProcessor.from_pretrained(out_dir)` and `AutoModelForImageTextToText.from_pretrained(out_dir)`
    load it back offline, as they load `Qwen/Qwen2-VL-2B-Instruct`.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # 1. check sizes
    tiny = tiny or TinyVLMConfig()
    if tiny.hidden_size % tiny.heads or (tiny.hidden_size // tiny.heads) % 4 or tiny.heads % tiny.kv_heads:
        raise ValueError(
            f"TinyVLMConfig: hidden_size={tiny.hidden_size}, heads={tiny.heads}, kv_heads={tiny.kv_heads}: "
            "hidden_size / heads must be a multiple of 4 and heads a multiple of kv_heads"
        )
    # 2. a byte-level BPE trained in memory, with Qwen's pre-tokenizer; special tokens take ids 0..7
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=tiny.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        padding_side="left",
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    # 3. the model config, with the tokenizer's ids; Qwen2 has no BOS token
    head_dim = tiny.hidden_size // tiny.heads
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": tiny.hidden_size,
            "intermediate_size": 2 * tiny.hidden_size,
            "num_hidden_layers": tiny.layers,
            "num_attention_heads": tiny.heads,
            "num_key_value_heads": tiny.kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": _mrope_section(head_dim),
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": tiny.vision_layers,
            "embed_dim": tiny.vision_dim,
            "hidden_size": tiny.hidden_size,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    # 4. processors from arguments: Qwen2-VL's 14 px patches, 2x2 merge, 2-frame tubelets
    vision = {
        "min_pixels": 28 * 28,
        "max_pixels": tiny.max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        video_processor=Qwen2VLVideoProcessor(**vision),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    # 5. save in the hub layout
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
