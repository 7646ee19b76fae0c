"""Sparse-causal self-attention for the Wan family (HuViDPO, arXiv 2502.01690; Tune-A-Video).

Frame i's queries attend to the keys and values of frame 0 and frame i−1 only (frame 0 attends to
itself), so a video is generated as a chain anchored on its first frame: what frame i sees of the
rest of the clip is frame 0 and its predecessor. Frame i still shapes its own output through its
queries (and the per-token feed-forward and cross-attention), so frame i's output of one
attention layer depends on frames 0, i−1 and i and on nothing else.

It is diffusers' own `WanAttnProcessor` (diffusers 0.42, `models/transformers/transformer_wan.py`)
with a boolean attention mask: `WanTransformerBlock` calls its self-attention `attn1` with
`attention_mask=None`, and the processor hands the mask to `dispatch_attention_fn`, whose native
backend passes it to `scaled_dot_product_attention` (True = may attend). Wan's patch embedding
flattens the (F', H', W') grid frame-major, so token n belongs to latent frame n // (H'·W').
Only `attn1` of each block is replaced; cross-attention to the text is untouched.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def sparse_causal_mask(frames: int, tokens_per_frame: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) boolean mask, L = frames·tokens_per_frame: query token of frame i may attend to key
    token of frame j iff j = 0 or j = max(i − 1, 0)."""
    frame = torch.arange(frames, device=device)
    allowed = (frame[None, :] == 0) | (frame[None, :] == (frame[:, None] - 1).clamp_min(0))
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class SparseCausalWanAttnProcessor(WanAttnProcessor):
    """`WanAttnProcessor` whose self-attention sees only frame 0 and the previous frame."""

    def __init__(self, tokens_per_frame: int) -> None:
        super().__init__()
        if tokens_per_frame < 1:
            raise ValueError(f"SparseCausalWanAttnProcessor: tokens_per_frame={tokens_per_frame} must be ≥ 1")
        self.tokens_per_frame = int(tokens_per_frame)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError(
                "SparseCausalWanAttnProcessor is a self-attention processor; set it on `attn1` of each block only"
            )
        length = hidden_states.shape[1]
        if length % self.tokens_per_frame:
            raise ValueError(
                f"SparseCausalWanAttnProcessor: {length} tokens are not whole frames of {self.tokens_per_frame} "
                "tokens; build the processor with the policy's (H/patch_h)·(W/patch_w)"
            )
        mask = sparse_causal_mask(length // self.tokens_per_frame, self.tokens_per_frame, hidden_states.device)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
        return super().__call__(attn, hidden_states, None, mask, rotary_emb)


def use_sparse_causal_attention(transformer: torch.nn.Module, tokens_per_frame: int) -> int:
    """Put `SparseCausalWanAttnProcessor` on every block's self-attention; returns how many layers."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise ValueError(
            f"sparse-causal attention is for WanTransformer3DModel (blocks with attn1); got {type(transformer).__name__}"
        )
    for block in blocks:
        block.attn1.set_processor(SparseCausalWanAttnProcessor(tokens_per_frame))
    return len(blocks)
