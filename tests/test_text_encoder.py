"""The embedded world's text encoder: built offline, saved, loaded back by the production call."""

from __future__ import annotations

import logging

import pytest
import torch

from models.text_encoder import EOS, UNK, build_text_encoder, load_text_encoder

CAPTIONS = [
    "a red ball is thrown to the left and bounces twice",
    "a red ball and a yellow ball roll toward each other and collide",
    "a green ball falls and bounces once",
    "a purple ball rolls to the right",
    "a blue ball is thrown to the right and bounces three times",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_encoder")
    return build_text_encoder(CAPTIONS, out, hidden=64, layers=2, seed=0), out


def test_round_trip_gives_identical_embeddings(built):
    memory, out = built
    loaded = load_text_encoder(out, "cpu", torch.float32)
    prompts = ["a red ball falls", CAPTIONS[1], ""]
    a, b = memory.encode(prompts), loaded.encode(prompts)
    assert type(loaded.model).__name__ == "T5EncoderModel"  # the encoder-only class the config names
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.mask, b.mask)
    assert a.embeddings.shape == (3, loaded.max_length, 64)


def test_padding_is_fixed_length_and_zeroed(built):
    enc, _ = built
    out = enc.encode(["a red ball falls", CAPTIONS[1]])
    # 4 words + </s>; the longest caption (13 words + </s>) plus 4, rounded up to 8, is 24.
    assert enc.max_length == 24
    assert out.mask.sum(1).tolist() == [5, 14]
    assert torch.all(out.embeddings[0, 5:] == 0) and torch.all(out.embeddings[0, :5].abs().sum(-1) > 0)


def test_unknown_words_map_to_unk(built):
    enc, _ = built
    tokens = enc.tokenizer.convert_ids_to_tokens(enc.tokenizer("A Zebra ball hovers!")["input_ids"])
    assert tokens == ["a", UNK, "ball", UNK, UNK, EOS]  # lower-cased; "!" is its own unknown word
    out = enc.encode(["zebra unicorn quux", "", "   "])
    assert torch.isfinite(out.embeddings).all() and out.mask.sum(1).tolist() == [4, 1, 1]


def test_long_prompts_are_truncated_with_a_warning(built, caplog):
    enc, _ = built
    with caplog.at_level(logging.WARNING):
        out = enc.encode([" ".join(["ball"] * 40)])
    assert out.mask.sum().item() == enc.max_length and "truncated" in caplog.text


def test_bad_inputs_say_what_to_do(built, tmp_path):
    enc, _ = built
    with pytest.raises(TypeError, match="list of prompts"):
        enc.encode("a red ball falls")
    with pytest.raises(OSError, match="build_text_encoder"):
        load_text_encoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no non-empty caption"):
        build_text_encoder(["", "  "], tmp_path / "empty")
