"""One shared SentencePiece vocabulary for every language, saved as a ``transformers`` tokenizer.

The vocabulary is a unigram SentencePiece model trained on both sides of the training languages,
with byte fallback (a script never seen in training still encodes, as UTF-8 bytes, instead of
``<unk>``) and the placeholders ``{0}``..``{9}`` as atomic pieces. It is converted to a
``tokenizers`` fast tokenizer that encodes exactly like ``SentencePieceProcessor`` and saved with
``save_pretrained``, so ``AutoTokenizer.from_pretrained(run_dir)`` loads it offline without this
package::

    tok = train_vocab(["Hallo {0}", "Hello {0}"], vocab_size=300)
    tok.save_pretrained("runs/x")
    tok = AutoTokenizer.from_pretrained("runs/x")
    tok("Hello {0}").input_ids          # [..., EOS_ID]: the tokenizer appends </s>
    tok.decode(ids, skip_special_tokens=True)

Fixed special ids, which the model config uses (:data:`PAD_ID` etc.): ``<pad>`` 0, ``<unk>`` 1,
``<s>`` 2 (the decoder start token: it must not be the pad token, docs/design.md, "The decoder start token"),
``</s>`` 3, then ``{0}``..``{9}``, then the 256 byte pieces.

Training is deterministic (one thread, input in a fixed order) and cached on disk by a hash of the
training text and settings (:func:`cached_vocab`), so a resumed run or a second run on the same
data reuses the same vocabulary instead of training again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PLACEHOLDERS = [f"{{{i}}}" for i in range(10)]
SPM_FILE = "spm.model"  # the SentencePiece model, kept beside tokenizer.json for other toolkits
MIN_VOCAB = 4 + len(PLACEHOLDERS) + 256 + 1  # specials + placeholders + bytes + at least one piece


def train_spm(texts: Iterable[str], vocab_size: int, max_sentences: Optional[int] = None, seed: int = 0) -> bytes:
    """Train the SentencePiece unigram model on ``texts`` and return its serialized proto.

    ``texts`` are deduplicated (the multi-parallel corpora repeat the English side in every
    language) and, beyond ``max_sentences``, subsampled with a fixed seed. The vocabulary size is
    an upper bound: a small corpus gets a smaller vocabulary instead of an error.
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"task.vocab_size: {vocab_size} is too small; at least {MIN_VOCAB} (specials, placeholders, 256 bytes)")
    unique = [t for t in dict.fromkeys(t.strip() for t in texts) if t]
    if not unique:
        raise DataError("cannot train a vocabulary: the training languages have no text")
    if max_sentences and len(unique) > max_sentences:
        keep = np.sort(np.random.default_rng(seed).choice(len(unique), size=max_sentences, replace=False))
        unique = [unique[i] for i in keep]
    buffer = io.BytesIO()
    try:
        _train_into(spm, buffer, unique, vocab_size)
    except RuntimeError as exc:
        if "smaller than required_chars" in str(exc):
            raise ConfigError(f"task.vocab_size: {vocab_size} is too small for the characters of the training text "
                              f"({str(exc).split('. ')[-2]}); raise it") from None
        raise
    return buffer.getvalue()


def _train_into(spm: Any, buffer: io.BytesIO, unique: list[str], vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(unique),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.9995,
        user_defined_symbols=PLACEHOLDERS,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece=PAD,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        # identity: no NFKC, so detokenized output keeps the exact characters of the references
        normalization_rule_name="identity",
        max_sentence_length=1 << 14,
        num_threads=1,  # determinism: the same data gives the same vocabulary
        minloglevel=2,
    )


def tokenizer_from_spm(model_proto: bytes, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` that encodes like the SentencePiece model and appends ``</s>``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_proto)
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A $B {EOS}", special_tokens=[(EOS, EOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
    )
    check_special_ids(tokenizer)
    tokenizer._metanmt_spm = model_proto  # saved beside tokenizer.json by save_tokenizer
    return tokenizer


def check_special_ids(tokenizer) -> None:
    """The fixed special ids every metanmt vocabulary and fresh Marian model rely on."""
    got = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise DataError(f"tokenizer special ids are {got}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (pad, unk, bos, eos)")


def train_vocab(
    texts: Iterable[str], vocab_size: int, max_sentences: Optional[int] = None, model_max_length: int = 512
):
    """Train the shared vocabulary and return it as a fast tokenizer (see the module docstring)."""
    tokenizer = tokenizer_from_spm(train_spm(texts, vocab_size, max_sentences), model_max_length)
    logger.info("trained a SentencePiece vocabulary of %d pieces", len(tokenizer))
    return tokenizer


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)`` plus the raw SentencePiece model when there is one."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    proto = getattr(tokenizer, "_metanmt_spm", None)
    if proto:
        (directory / SPM_FILE).write_bytes(proto)


def load_tokenizer(directory: str | Path):
    """``AutoTokenizer.from_pretrained(directory)`` (offline), checking the special ids."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
        raise DataError(f"{directory}: no tokenizer here (expected tokenizer.json from a metanmt run or save_pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if (directory / SPM_FILE).is_file():
        tokenizer._metanmt_spm = (directory / SPM_FILE).read_bytes()
    return tokenizer


def cache_root() -> Path:
    """``$METANMT_CACHE`` or ``~/.cache/metanmt``."""
    return Path(os.environ.get("METANMT_CACHE") or Path.home() / ".cache" / "metanmt")


def vocab_key(texts: list[str], vocab_size: int, max_sentences: Optional[int]) -> str:
    """A hash of everything that determines the trained vocabulary."""
    digest = hashlib.sha256(f"spm-unigram-v1|{vocab_size}|{max_sentences}|".encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def cached_vocab(texts: list[str], vocab_size: int, max_sentences: Optional[int] = None, use_cache: bool = True):
    """Load the vocabulary for this text and these settings from the cache, or train and store it.

        tok = cached_vocab(all_training_sentences, vocab_size=8000)
    """
    if not use_cache:
        return train_vocab(texts, vocab_size, max_sentences)
    directory = cache_root() / "vocab" / vocab_key(texts, vocab_size, max_sentences)
    if (directory / "tokenizer.json").is_file():
        logger.info("reusing the cached vocabulary in %s", directory)
        return load_tokenizer(directory)
    tokenizer = train_vocab(texts, vocab_size, max_sentences)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # write to a temporary folder and rename, so a concurrent or killed run never sees half a vocabulary
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-"))
        save_tokenizer(tokenizer, tmp)
        try:
            tmp.rename(directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process stored the same vocabulary first
    except OSError as exc:
        logger.warning("could not cache the vocabulary in %s (%s); it will be trained again next time", directory, exc)
    return tokenizer
