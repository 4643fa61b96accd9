"""Sentence pairs -> padded tensors: encoding, collation, and token-sized batches of an epoch.

    encoded = encode(tokenizer, pairs, max_source_length=128, max_target_length=128)
    batch = collate(encoded, pad_id=0, start_id=2)        # input_ids, attention_mask, decoder_input_ids, labels
    for rows in plan_batches([len(t) for _, t in encoded], max_tokens=1000, rng=epoch_rng(seed, 0)):
        ...

Batches are sized in target (English) tokens, ``</s>`` included, as in MetaNMT; labels are
``IGNORE`` where padded, so every loss averages over real target tokens only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...data.corpus import Pair
from ...data.vocab import cache_root

logger = logging.getLogger(__name__)

IGNORE = -100  # label value that cross-entropy ignores (padding)

Encoded = list[tuple[list[int], list[int]]]  # (source ids, target ids) per pair


def encode(tokenizer: Any, pairs: list[Pair], max_source_length: int, max_target_length: int) -> Encoded:
    """Token ids (source, target), both ending with the tokenizer's end token, truncated to the max lengths."""
    if not pairs:
        return []
    src = tokenizer([p.src for p in pairs], add_special_tokens=True)["input_ids"]
    tgt = tokenizer(text_target=[p.en for p in pairs], add_special_tokens=True)["input_ids"]

    def cut(ids: list[int], limit: int) -> list[int]:
        return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]  # keep the end token

    return [(cut(s, max_source_length), cut(g, max_target_length)) for s, g in zip(src, tgt)]


def token_lengths(tokenizer: Any, pairs: list[Pair], max_source_length: int, max_target_length: int,
                  use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Source and target token counts of ``pairs`` as :func:`encode` gives them, cached on disk.

    Episodes are cut along a language's length order, so every training process encodes the whole
    pool once: 30-45 s on a CPU for the l10n suite's 20 languages, paid again by each process of a
    study. The counts are stored under ``$METANMT_CACHE/lengths`` by a hash of the tokenizer, the
    length limits, the texts, and the ids of the first pairs (so a language code or prefix that a
    multilingual tokenizer adds is part of the key). A tokenizer without a serialized form is not cached.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    path = None
    if use_cache and backend is not None and pairs:
        digest = hashlib.sha256(f"lengths-v1|{max_source_length}|{max_target_length}|".encode())
        digest.update(backend.to_str().encode("utf-8"))
        digest.update(repr(encode(tokenizer, pairs[:4], max_source_length, max_target_length)).encode())
        for p in pairs:
            digest.update(p.src.encode("utf-8") + b"\0" + p.en.encode("utf-8") + b"\0")
        path = cache_root() / "lengths" / f"{digest.hexdigest()[:24]}.npz"
        if path.is_file():
            try:
                with np.load(path) as cached:
                    source, target = cached["source"], cached["target"]
                if len(source) == len(target) == len(pairs):
                    return source, target
            except (OSError, ValueError, KeyError):
                pass  # a damaged file: counted again and replaced
    encoded = encode(tokenizer, pairs, max_source_length, max_target_length)
    source = np.array([len(s) for s, _ in encoded], dtype=np.int64)
    target = np.array([len(g) for _, g in encoded], dtype=np.int64)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # a temporary name, then rename: a concurrent or killed process never reads half a file
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, source=source, target=target)
            Path(tmp).replace(path)
        except OSError as exc:
            logger.warning("could not cache token counts in %s (%s)", path.parent, exc)
    return source, target


def pad_stack(rows: list[list[int]], value: int) -> Tensor:
    """Right-pad integer rows to one length."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(encoded: Encoded, pad_id: int, start_id: int) -> dict[str, Tensor]:
    """A padded batch: ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (start token +
    target shifted right) and ``labels`` (target, ``IGNORE`` where padded)."""
    sources = [s for s, _ in encoded]
    targets = [g for _, g in encoded]
    return {
        "input_ids": pad_stack(sources, pad_id),
        "attention_mask": pad_stack([[1] * len(s) for s in sources], 0),
        "decoder_input_ids": pad_stack([[start_id] + g[:-1] for g in targets], pad_id),
        "labels": pad_stack(targets, IGNORE),
    }


def pad_value(key: str, pad_id: int) -> int:
    """What a batch key is padded with: ``IGNORE`` for labels, 0 for the mask, else the pad id."""
    return IGNORE if key == "labels" else 0 if key == "attention_mask" else pad_id


def merge(first: dict[str, Tensor], second: dict[str, Tensor], pad_id: int) -> dict[str, Tensor]:
    """Concatenate two padded batches, padding both to the longer length."""
    out = {}
    for key in first:
        a, b = first[key], second[key]
        width = max(a.shape[1], b.shape[1])
        value = pad_value(key, pad_id)
        out[key] = torch.cat([F.pad(a, (0, width - a.shape[1]), value=value), F.pad(b, (0, width - b.shape[1]), value=value)])
    return out


def token_count(batch: dict[str, Tensor]) -> int:
    """Target tokens in a batch (the unit of batch sizes; the loss averages over them)."""
    return int((batch["labels"] != IGNORE).sum())


def plan_batches(
    target_lengths: list[int], max_tokens: int, rng: Optional[np.random.Generator] = None, window: int = 50
) -> list[list[int]]:
    """Index lists of one epoch, each batch at most ``max_tokens`` target tokens (at least one pair).

    Without ``rng``: the given order, cut greedily (deterministic evaluation). With ``rng``: a random
    permutation, sorted by length inside windows of about ``window`` batches, then cut and the batches
    shuffled — pairs of similar length share a batch, so padding (which costs as much compute as real
    tokens) stays small while every epoch still mixes the data.
    """
    n = len(target_lengths)
    order = np.arange(n) if rng is None else rng.permutation(n)
    lengths = np.asarray(target_lengths, dtype=np.int64)
    if rng is not None and n:
        span = max(1, int(window * max_tokens / max(1.0, float(lengths.mean()))))
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in np.array_split(order, -(-n // span))])
    batches = cut_by_tokens(order.tolist(), target_lengths, max_tokens)
    if rng is not None:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def cut_by_tokens(order: list[int], target_lengths: list[int], max_tokens: int) -> list[list[int]]:
    """``order`` cut greedily into index lists of at most ``max_tokens`` target tokens (at least one each)."""
    batches: list[list[int]] = []
    tokens = 0
    for i in order:
        if not batches or tokens + target_lengths[i] > max_tokens:
            batches.append([])
            tokens = 0
        batches[-1].append(i)
        tokens += int(target_lengths[i])
    return batches


def micro_batches(rows: Encoded, micro_tokens: Optional[int]) -> list[Encoded]:
    """``rows`` (one batch) as parts of at most ``micro_tokens`` target tokens (at least one row each),
    sorted by source then target length so that each part pads little; ``None``, or a batch that
    fits, stays one part in its own order. The parts' summed token losses are the batch's."""
    if micro_tokens is None or sum(len(target) for _, target in rows) <= micro_tokens:
        return [rows]
    return [[rows[i] for i in part] for part in length_sorted_batches(rows, micro_tokens)]


def length_sorted_batches(encoded: Encoded, max_tokens: int) -> list[list[int]]:
    """Index lists covering every pair once, each at most ``max_tokens`` target tokens (at least one
    pair), the pairs sorted by source then target length: scoring's batches (teacher-forced NLL) and
    a fine-tuning batch's micro-batches.

    A batch costs its longest row times its rows, so file order padded every batch to its longest
    sentence; sorted, rows of a batch have about the same length. The scores do not depend on the
    order (each row is scored on its own, padding masked).
    """
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), len(encoded[i][1])))
    return cut_by_tokens(order, [len(t) for _, t in encoded], max_tokens)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch ``epoch``'s data order (a fresh one per epoch: resumable anywhere)."""
    return np.random.default_rng([seed, epoch])
