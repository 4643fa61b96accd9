"""The shared SentencePiece vocabulary and its transformers tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from metanmt.data import vocab as V
from metanmt.data.cldr import cldr_corpus
from metanmt.errors import ConfigError


@pytest.fixture(scope="module")
def texts() -> list[str]:
    corpus = cldr_corpus(["de", "fr"])
    return [text for lang in corpus.languages() for pair in corpus[lang] for text in pair]


@pytest.fixture(scope="module")
def proto(texts: list[str]) -> bytes:
    return V.train_spm(texts, vocab_size=600)


def test_special_ids_and_atomic_placeholders(proto: bytes) -> None:
    tok = V.tokenizer_from_spm(proto)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(V.PLACEHOLDERS) == list(range(4, 14))
    ids = tok("{0} Kilometer pro {9}").input_ids
    assert ids[-1] == V.EOS_ID
    pieces = tok.convert_ids_to_tokens(ids)
    assert "{0}" in pieces and "{9}" in pieces  # one piece each, never split into "{", "0", "}"


def test_fast_tokenizer_encodes_exactly_like_sentencepiece(proto: bytes, texts: list[str]) -> None:
    tok = V.tokenizer_from_spm(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    samples = texts[:300] + ["Hello {0}, you have {1} messages", "日本語 ✓ 𝔸 Ωμέγα", "  two  spaces ", "x{10}y"]
    for text in samples:
        assert tok(text).input_ids == sp.encode(text) + [V.EOS_ID], text


def test_byte_fallback_round_trip(proto: bytes) -> None:
    tok = V.tokenizer_from_spm(proto)
    for text in ["Größe {0} ✓", "日本語のテキスト", "𝔸𝔹 emoji 🙂", "Ａ…ﬁ"]:  # unseen scripts and compatibility characters
        ids = tok(text).input_ids
        assert V.UNK_ID not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_save_and_autotokenizer_offline(proto: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = V.tokenizer_from_spm(proto)
    V.save_tokenizer(tok, tmp_path)
    assert (tmp_path / V.SPM_FILE).read_bytes() == proto
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Montag, {0} Tage"
    assert loaded(text).input_ids == tok(text).input_ids
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 3, 2)
    assert len(V.load_tokenizer(tmp_path)) == len(tok)


def test_training_is_deterministic_and_cached(texts: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert V.train_spm(texts[:2000], 400) == V.train_spm(texts[:2000], 400)
    monkeypatch.setenv("METANMT_CACHE", str(tmp_path))
    first = V.cached_vocab(texts[:2000], 400)
    assert len(list((tmp_path / "vocab").iterdir())) == 1

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached vocabulary should have been reused")

    monkeypatch.setattr(V, "train_vocab", fail)
    again = V.cached_vocab(texts[:2000], 400)
    assert again.get_vocab() == first.get_vocab()


def test_small_vocab_and_empty_text_are_errors() -> None:
    with pytest.raises(ConfigError, match="too small"):
        V.train_spm(["a b c"], vocab_size=100)
    with pytest.raises(Exception, match="no text"):
        V.train_spm(["", "  "], vocab_size=400)
