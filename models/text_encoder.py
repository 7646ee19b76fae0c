"""The policy's text encoder: a transformers tokenizer and encoder, loaded by path or hub id.

A real Wan2.1 run encodes prompts with umT5-XXL (`UMT5EncoderModel`, 512 tokens); the embedded
world cannot download it, so `build_text_encoder` makes the same kind of model offline: a
word-level tokenizer trained in memory with the `tokenizers` library on the world's captions,
wrapped as a `PreTrainedTokenizerFast`, and a randomly initialised two-layer `T5EncoderModel`
(the umT5 architecture at hidden size 64). Both are saved with `save_pretrained` into one folder,
and `load_text_encoder` reads them back with `AutoTokenizer.from_pretrained` and
`from_pretrained` of the class the config names — the call a real run makes with a hub id.

The encoder stays random: it never trains. The policy's cross-attention learns to read its
outputs, the way a video model learns to read a frozen T5. A random encoder still separates
the captions (every word has its own embedding and T5's relative positions keep the order).

`TextEncoder.encode` pads every prompt to one fixed length and zeroes the embeddings of padding
positions, as diffusers' `WanPipeline._get_t5_prompt_embeds` does: the Wan transformer takes no
text mask, so zeros are how it is told where a prompt ends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

logger = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Pad first: T5 configs assume pad_token_id 0 and eos_token_id 1.
SPECIAL_TOKENS = (PAD, EOS, UNK)
# Longer than this is a tokenizer's "no limit" sentinel (transformers uses int(1e30)), not a length.
_MAX_SANE_LENGTH = 1 << 16


@dataclass(frozen=True)
class TextEmbeddings:
    """Prompts encoded for a policy: `embeddings` (B, L, D) with zeros at padding, `mask` (B, L) in {0, 1}."""

    embeddings: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        return TextEmbeddings(self.embeddings.to(device=device, dtype=dtype), self.mask.to(device=device))

    def index(self, rows: torch.Tensor | Sequence[int] | slice) -> TextEmbeddings:
        return TextEmbeddings(self.embeddings[rows], self.mask[rows])

    @staticmethod
    def cat(parts: Sequence[TextEmbeddings]) -> TextEmbeddings:
        return TextEmbeddings(torch.cat([p.embeddings for p in parts]), torch.cat([p.mask for p in parts]))


# ---------------------------------------------------------------------------------------------
# The encoder


class TextEncoder:
    """A frozen tokenizer + encoder pair that turns prompts into fixed-length embeddings."""

    def __init__(self, tokenizer, model: torch.nn.Module, max_length: int, device: torch.device, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.max_length = max_length
        self.device = device
        self.dtype = dtype

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """(embeddings (B, L, D) with padding zeroed, attention mask (B, L)); L = `max_length` always.

        Longer prompts are cut to `max_length` tokens (with a warning), as diffusers' pipelines do.
        """
        if isinstance(prompts, str):
            raise TypeError("TextEncoder.encode: pass a list of prompts, not one string")
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        untruncated = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False)["input_ids"]]
        cut = [i for i, n in enumerate(untruncated) if n > self.max_length]
        if cut:
            logger.warning("TextEncoder.encode: prompts %s exceed %d tokens and were truncated", cut, self.max_length)
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return TextEmbeddings(hidden * mask.unsqueeze(-1).to(hidden.dtype), mask)


# ---------------------------------------------------------------------------------------------
# Building the embedded world's encoder


def train_word_tokenizer(captions: Sequence[str], max_length: int) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over the captions' words; unknown words become `<unk>`.

    Each encoding ends with `</s>`, as T5's does, so the empty prompt (classifier-free guidance's
    unconditional) is one `</s>` token rather than nothing.
    """
    texts = [c for c in captions if c and c.strip()]
    if not texts:
        raise ValueError("build_text_encoder: no non-empty caption to learn a vocabulary from; pass the world's captions")
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def build_text_encoder(
    captions: Sequence[str],
    out_dir: str | Path,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    max_length: int | None = None,
) -> TextEncoder:
    """Train the tokenizer on `captions`, initialise a tiny `T5EncoderModel`, save both to `out_dir`.

    Returns the pair in memory (CPU, float32); `load_text_encoder(out_dir)` reads back the same.

    `max_length` (tokens per prompt, `</s>` included) defaults to the longest caption plus 4,
    rounded up to a multiple of 8: room for a slightly longer prompt without wasting attention.
    """
    if hidden % 16:
        raise ValueError(f"build_text_encoder: hidden={hidden} must be a multiple of 16 (heads of 16 channels)")
    probe = train_word_tokenizer(captions, max_length=_MAX_SANE_LENGTH)
    longest = max(len(probe(c)["input_ids"]) for c in captions if c and c.strip())
    length = max_length if max_length is not None else -(-(longest + 4) // 8) * 8
    if length < longest:
        logger.warning("build_text_encoder: max_length=%d truncates the longest caption (%d tokens)", length, longest)
    tokenizer = train_word_tokenizer(captions, max_length=length)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=16,
        num_heads=hidden // 16,
        d_ff=hidden * 2,
        num_layers=layers,
        num_decoder_layers=0,
        feed_forward_proj="gated-gelu",  # umT5's and T5 v1.1's feed-forward
        dropout_rate=0.0,  # the encoder is frozen; dropout would only make encodings random
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    return TextEncoder(tokenizer, model, length, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------
# Loading


def _encoder_class(config) -> type:
    """The config's own encoder-only class (`T5EncoderModel`, `UMT5EncoderModel`…) if it names one.

    `AutoModel` maps a T5 config to the encoder-decoder `T5Model`, which would load a decoder a
    text-to-video model never uses (and leave it random for an encoder-only checkpoint).
    """
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if name.endswith("EncoderModel") and cls is not None:
            return cls
    return AutoModel


def load_text_encoder(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_length: int | None = None,
    tokenizer_subfolder: str | None = None,
    encoder_subfolder: str | None = None,
) -> TextEncoder:
    """Load tokenizer and encoder by local path or hub id (a diffusers pipeline repo: give the subfolders).

    `max_length` overrides the tokenizer's own `model_max_length` (required when that is the
    tokenizer's "unbounded" sentinel, as for umT5; Wan's pipeline uses 512).
    """
    source = str(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tokenizer_subfolder or "", trust_remote_code=False)
        config = AutoConfig.from_pretrained(source, subfolder=encoder_subfolder or "", trust_remote_code=False)
        model = _encoder_class(config).from_pretrained(
            source, subfolder=encoder_subfolder or "", dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError) as err:
        raise OSError(
            f"load_text_encoder: cannot load a tokenizer and text encoder from `{source}` "
            f"(subfolders {tokenizer_subfolder!r}/{encoder_subfolder!r}): {err}. Give a folder written by "
            "`build_text_encoder` or a transformers checkpoint (with `tokenizer_subfolder`/`encoder_subfolder` "
            "for a diffusers pipeline repo such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
        ) from err
    if model.config.is_encoder_decoder and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    length = max_length if max_length is not None else tokenizer.model_max_length
    if not length or length >= _MAX_SANE_LENGTH:
        raise ValueError(
            f"load_text_encoder: the tokenizer of `{source}` states no usable max length ({length}); "
            "pass max_length (Wan2.1's pipeline uses 512 tokens)"
        )
    if tokenizer.pad_token is None:
        raise ValueError(f"load_text_encoder: the tokenizer of `{source}` has no pad token; prompts cannot be padded")
    return TextEncoder(tokenizer, model, int(length), torch.device(device), dtype)
