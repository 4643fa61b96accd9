"""Translation tasks (MetaNMT, Gu et al. 2018): each source language X -> English is one task.

One shared ``transformers`` seq2seq model (Marian-style from the config, or any
``AutoModelForSeq2SeqLM`` checkpoint) and one shared SentencePiece vocabulary serve every language.
An episode is one language: a support batch and a disjoint query batch drawn from its pairs, both
sized in target tokens as in MetaNMT::

    family = TranslationFamily(
        task_cfg={"source": "cldr", "train_languages": ["de", "fr"], "dev_languages": ["ro"], "vocab_size": 2000},
        model_cfg={"d_model": 64, "encoder_layers": 1, "decoder_layers": 1},
    )
    model = family.build_model()            # trains (or reuses from the cache) the shared vocabulary
    episode = family.sample_episode(np.random.default_rng([0, 0, 0]), split="train")
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loss = family.loss(model, params, episode.support)       # token-mean cross-entropy
    family.save_model(model, Path("runs/x"))                 # AutoModelForSeq2SeqLM / AutoTokenizer load it

Where the vocabulary comes from, in order: ``task.vocab`` (a folder holding a saved tokenizer, e.g.
an earlier run), the ``pretrained`` checkpoint's own tokenizer, a tokenizer adopted with
:meth:`TranslationFamily.use_tokenizer` or :meth:`TranslationFamily.load_model` (a run folder),
else one trained on the training languages (both sides) the first time it is needed and cached
on disk by a hash of that text (``$METANMT_CACHE``, default ``~/.cache/metanmt``), so resuming a
run or starting another on the same data gets the identical vocabulary without training again.

Adaptation patterns (fnmatch over ``model.named_parameters()`` names of a Marian model):
``["*"]`` adapts everything (the default); MetaNMT's embeddings + encoder is
``["model.shared.*", "model.encoder.*"]``. With tied embeddings (the default) ``model.shared.weight``
is also the decoder's input embedding and the output projection, and it appears once, under that
name. The sinusoidal position tables (``model.*.embed_positions.weight``) are frozen
(``requires_grad=False``) and never adapted.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.corpus import Columns, Corpus, Pair, read_corpus, read_hf_dataset, read_moses
from ..data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, cached_vocab, load_tokenizer, save_tokenizer
from ..errors import ConfigError, DataError
from .base import Episode, TaskFamily

logger = logging.getLogger(__name__)

IGNORE = -100  # label value that cross-entropy ignores (padding)
SPLITS = ("train", "dev", "test")


@dataclass
class ColumnsConfig:
    """Column names (TSV header fields, JSON keys, dataset columns); ``lang: null`` when absent."""

    lang: Optional[str] = "lang"
    src: str = "src"
    en: str = "en"


@dataclass
class TranslationTaskConfig:
    """The keys of a translation task suite (``tasks/*.yaml``) and of a run config's ``task:``.

    File patterns are relative to ``data.root`` and may use ``{lang}`` (the task language),
    ``{side}`` (Moses: the language of one side, ``{lang}`` or ``target_language``), ``{budget}``
    (fine-tuning sets) and globs (``locale/{lang}/LC_MESSAGES/*.po``). A pattern without
    ``{lang}`` names one file holding several languages, grouped by the ``columns.lang`` column.
    """

    # -- where the data is
    source: Literal["files", "cldr", "datasets"] = "files"
    format: Literal["auto", "tsv", "jsonl", "moses", "gettext"] = "auto"
    train_languages: list[str] = field(default_factory=list)
    dev_languages: list[str] = field(default_factory=list)
    test_languages: list[str] = field(default_factory=list)
    train_path: str = "meta_train/{lang}.tsv.gz"
    dev_path: str = "dev/{lang}.tsv.gz"
    test_path: str = "test/{lang}.tsv.gz"
    finetune_path: str = "finetune/{lang}.{budget}.tsv.gz"  # "" : split the dev set instead
    target_language: str = "en"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    bad_rows: Literal["raise", "skip"] = "raise"  # skip: count bad rows in the log instead of stopping
    dataset: Optional[str] = None  # source=datasets: "json" / "csv" / "parquet" (local files) or a hub name
    dataset_config: Optional[str] = None  # hub config name, may use {lang} (e.g. "{lang}-en")
    dataset_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"})
    # -- episodes
    support_tokens: int = 1000  # target (English) tokens per support batch, </s> included
    query_tokens: int = 1000
    task_sampling: Literal["uniform", "temperature"] = "uniform"
    temperature: float = 5.0  # p(language) ~ pairs ** (1 / temperature); 1 = proportional to data size
    max_source_length: int = 128
    max_target_length: int = 128
    # -- vocabulary
    vocab_size: int = 8000
    vocab_max_sentences: int = 300000
    vocab: Optional[str] = None  # a folder with a saved tokenizer to reuse instead of training one
    vocab_cache: bool = True
    # -- validation during meta-training: fine-tune a copy on the dev language, then score its dev set
    dev_budget: str = "4k"  # fills {budget} in finetune_path
    dev_finetune_steps: int = 20
    dev_finetune_lr: float = 3e-4
    dev_finetune_tokens: int = 1000
    dev_adapt: list[str] = field(default_factory=lambda: ["*"])
    dev_max_segments: int = 200  # first N dev segments are translated and scored
    dev_metric: Literal["bleu", "chrf", "loss"] = "bleu"  # the `score` that picks the best checkpoint
    dev_seed: int = 0
    num_beams: int = 1
    max_new_tokens: int = 128


@dataclass
class TranslationModelConfig:
    """The keys of a run config's ``model:`` for translation: a Marian Transformer from these sizes,
    or ``pretrained: path`` to any ``AutoModelForSeq2SeqLM`` checkpoint (then the sizes are ignored)."""

    pretrained: Optional[str] = None
    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 3
    attention_heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "swish"
    tie_embeddings: bool = True
    scale_embedding: bool = True
    max_positions: int = 512
    init_std: float = 0.02
    # eager: second-order MAML needs it (sdpa on CPU has no double backward, design.md pitfall 2)
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    dtype: Literal["float32", "float64"] = "float32"


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
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order.tolist():
        if current and tokens + lengths[i] > max_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += int(lengths[i])
    if current:
        batches.append(current)
    if rng is not None:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def pad_stack(rows: list[list[int]], value: int) -> Tensor:
    """Right-pad integer rows to one length."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


_PAD_VALUES = {"labels": IGNORE}  # every other key pads with the pad id / 0


class TranslationFamily(TaskFamily):
    """X -> English translation, one task per source language (see the module docstring)."""

    name: ClassVar[str] = "translation"
    TaskConfig: ClassVar[type] = TranslationTaskConfig
    ModelConfig: ClassVar[type] = TranslationModelConfig
    default_adapt: ClassVar[list[str]] = ["*"]
    EMBEDDINGS_AND_ENCODER: ClassVar[list[str]] = ["model.shared.*", "model.encoder.*"]

    def __init__(self, task_cfg: dict[str, Any], model_cfg: dict[str, Any], data_root: str | Path | None = None):
        super().__init__(task_cfg, model_cfg, data_root)
        t, m = self.task_cfg, self.model_cfg
        if not t.train_languages and not t.dev_languages and not t.test_languages:
            raise ConfigError("task.train_languages: no languages given (set train_languages / dev_languages / test_languages)")
        for key in ("support_tokens", "query_tokens", "max_source_length", "max_target_length", "vocab_size",
                    "dev_finetune_tokens", "dev_max_segments", "max_new_tokens", "num_beams"):
            if getattr(t, key) < 1:
                raise ConfigError(f"task.{key}: must be at least 1, got {getattr(t, key)}")
        if t.temperature <= 0:
            raise ConfigError(f"task.temperature: must be positive, got {t.temperature}")
        for key, low in (("dev_finetune_steps", 0), ("vocab_max_sentences", 1), ("dev_seed", 0)):
            if getattr(t, key) < low:
                raise ConfigError(f"task.{key}: expected a value >= {low}, got {getattr(t, key)}")
        if not t.dev_finetune_lr > 0:
            raise ConfigError(f"task.dev_finetune_lr: expected a value > 0, got {t.dev_finetune_lr}")
        for key in ("d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim", "max_positions"):
            if getattr(m, key) < 1:
                raise ConfigError(f"model.{key}: expected a value >= 1, got {getattr(m, key)}")
        for key in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0 <= getattr(m, key) < 1:
                raise ConfigError(f"model.{key}: expected a value in [0, 1), got {getattr(m, key)}")
        if not m.init_std > 0:
            raise ConfigError(f"model.init_std: expected a value > 0, got {m.init_std}")
        if m.pretrained is None:
            if m.d_model % m.attention_heads:
                raise ConfigError(f"model.d_model: {m.d_model} is not divisible by model.attention_heads={m.attention_heads}")
            if m.max_positions < max(t.max_source_length, t.max_target_length, t.max_new_tokens + 1):
                raise ConfigError(
                    f"model.max_positions: {m.max_positions} is shorter than task.max_source_length / "
                    f"max_target_length / max_new_tokens ({t.max_source_length}, {t.max_target_length}, {t.max_new_tokens})"
                )
        if t.source == "files" and t.format == "moses":
            for split in SPLITS:
                key = f"{split}_path"
                if getattr(t, f"{split}_languages") and "{side}" not in getattr(t, key):
                    raise ConfigError(f"task.{key}: a Moses pattern needs {{side}} (e.g. 'wmt/{{lang}}-en/train.{{side}}')")
        if t.source == "datasets" and not t.dataset:
            raise ConfigError("task.dataset: source 'datasets' needs a dataset (a hub name, or json/csv/parquet with paths)")
        self._tokenizer: Any = None
        self._data: dict[str, Corpus] = {}
        self._dev_sets: dict[str, tuple[list[Pair], list[Pair]]] = {}
        self._length_orders: dict[tuple[str, str], np.ndarray] = {}
        self._decoder_start: Optional[int] = None  # set from the model's config by build_model/load_model

    # -- data ----------------------------------------------------------------------------------
    def languages(self, split: str) -> list[str]:
        """The task languages of a split (``train``, ``dev`` or ``test``)."""
        if split not in SPLITS:
            raise ConfigError(f"split {split!r}: allowed splits are {', '.join(SPLITS)}")
        langs = getattr(self.task_cfg, f"{split}_languages")
        if not langs:
            raise ConfigError(f"task.{split}_languages: no languages for the {split} split")
        return list(langs)

    def pairs(self, split: str, lang: str) -> list[Pair]:
        """All sentence pairs of ``lang`` in ``split`` (read once, then kept in memory)."""
        corpus = self.corpus(split)
        if lang not in corpus:
            raise ConfigError(f"language {lang!r} is not in task.{split}_languages ({', '.join(corpus.languages())})")
        return corpus[lang]

    def corpus(self, split: str) -> Corpus:
        """Every pair of every language of ``split``; raises DataError for a language without data."""
        if split not in self._data:
            langs = self.languages(split)
            t = self.task_cfg
            if t.source == "cldr":
                from ..data.cldr import cldr_corpus

                corpus = cldr_corpus(langs)
            else:
                corpus = self._read(getattr(t, f"{split}_path"), langs, split)
            corpus.require(langs, f"task.{split}_languages")
            corpus.pairs = {lang: corpus.pairs[lang] for lang in langs}  # drop languages not asked for
            logger.info("%s split: %s", split, ", ".join(f"{lang} {len(corpus[lang])}" for lang in langs))
            if corpus.skipped:
                logger.warning("%s split: skipped %s", split, dict(corpus.skipped))
            self._data[split] = corpus
        return self._data[split]

    def _root(self) -> Path:
        if self.data_root is None:
            raise ConfigError("data.root: not set; the translation suite reads its files under it (--set data.root=PATH)")
        if not self.data_root.is_dir():
            raise DataError(f"data.root: {self.data_root} is not a directory")
        return self.data_root

    def _expand(self, pattern: str, **values: str) -> list[Path]:
        """Files a pattern names: placeholders filled, globs expanded (sorted), relative to data.root."""
        text = pattern
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        path = Path(text)
        if not path.is_absolute():
            path = self._root() / path
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
            if not matches:
                raise DataError(f"{path}: no file matches this pattern")
            return matches
        return [path]

    def _read(self, pattern: str, langs: list[str], split: str, **values: str) -> Corpus:
        """Read ``pattern`` for each language (or once, grouped by the lang column)."""
        t = self.task_cfg
        if not pattern:
            raise ConfigError(f"task.{split}_path: empty; give a file pattern such as '{split}/{{lang}}.tsv.gz'")
        columns = Columns(lang=t.columns.lang, src=t.columns.src, en=t.columns.en)
        corpus = Corpus()
        # one read per language when the pattern names one (Moses: {side} does); else one file, grouped by its lang column
        per_language = (
            "{lang}" in pattern
            or (t.source == "files" and t.format == "moses")
            or bool(t.source == "datasets" and t.dataset_config and "{lang}" in t.dataset_config)
        )
        for lang in langs if per_language else [None]:
            names = {"lang": lang} if lang else {}
            if t.source == "datasets":
                data_files = [str(p) for p in self._expand(pattern, **names, **values)] if t.dataset in ("json", "csv", "parquet") else None
                config = t.dataset_config.replace("{lang}", lang or "") if t.dataset_config else None
                hf_split = "train" if data_files else t.dataset_splits.get(split, split)
                corpus.update(read_hf_dataset(t.dataset, data_files=data_files, config=config, split=hf_split, lang=lang,
                                              columns=columns, on_error=t.bad_rows))
            elif t.format == "moses":
                src_file = self._expand(pattern, side=lang, **names, **values)[0]
                en_file = self._expand(pattern, side=t.target_language, **names, **values)[0]
                corpus.update(read_moses(src_file, en_file, lang=lang, on_error=t.bad_rows))
            else:
                for path in self._expand(pattern, **names, **values):
                    corpus.update(read_corpus(path, lang=lang, format=t.format, columns=columns, on_error=t.bad_rows))
        return corpus

    def dev_sets(self, lang: str) -> tuple[list[Pair], list[Pair]]:
        """(fine-tuning pairs, evaluation pairs) of a dev language for :meth:`validate`.

        With ``finetune_path`` the fine-tuning set is that file at ``dev_budget`` and the
        evaluation set is the first ``dev_max_segments`` of the dev file; without it (or with the
        embedded CLDR corpus) the dev pairs are split by a fixed permutation.
        """
        if lang not in self._dev_sets:
            t = self.task_cfg
            dev = self.pairs("dev", lang)
            if t.source == "files" and t.finetune_path:
                finetune = self._read(t.finetune_path, [lang], "dev", budget=t.dev_budget)
                finetune.require([lang], f"task.finetune_path ({t.finetune_path})")
                self._dev_sets[lang] = (finetune[lang], dev[: t.dev_max_segments])
            else:
                if len(dev) < 2:
                    raise DataError(f"dev language {lang}: {len(dev)} pairs; need at least 2 to fine-tune and score")
                order = np.random.default_rng([t.dev_seed, 1]).permutation(len(dev))
                n_eval = min(t.dev_max_segments, len(dev) // 2)
                self._dev_sets[lang] = ([dev[i] for i in order[n_eval:]], [dev[i] for i in order[:n_eval]])
        return self._dev_sets[lang]

    def task_probabilities(self, split: str) -> np.ndarray:
        """p(language): uniform, or proportional to pairs ** (1 / temperature)."""
        langs = self.languages(split)
        if self.task_cfg.task_sampling == "uniform" or split != "train":
            return np.full(len(langs), 1.0 / len(langs))
        sizes = np.array([len(self.pairs(split, lang)) for lang in langs], dtype=np.float64)
        weights = sizes ** (1.0 / self.task_cfg.temperature)
        return weights / weights.sum()

    # -- tokenization ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The shared tokenizer, created on first use (see the module docstring for where from)."""
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def prepare(self) -> None:
        """Read every training language (errors name the file and line) before the run starts."""
        self.corpus("train")

    def prepare_validation(self) -> None:
        """Read every dev language's sets now (a malformed dev file is an error before the run starts)."""
        for lang in self.languages("dev"):
            self.dev_sets(lang)

    def on_resume(self, directory: Path) -> None:
        """A resumed run keeps the vocabulary it started with, even if the vocab cache is gone."""
        if (Path(directory) / "tokenizer_config.json").is_file():
            self.use_tokenizer(directory)

    def use_tokenizer(self, directory: str | Path) -> None:
        """Adopt the tokenizer saved in ``directory`` (a run folder) instead of training one."""
        self._tokenizer = load_tokenizer(directory)

    def _make_tokenizer(self) -> Any:
        t = self.task_cfg
        if t.vocab:
            return load_tokenizer(Path(t.vocab).expanduser())
        if self.model_cfg.pretrained:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.model_cfg.pretrained)
        texts = [text for lang in self.languages("train") for pair in self.pairs("train", lang) for text in pair]
        return cached_vocab(texts, t.vocab_size, t.vocab_max_sentences, use_cache=t.vocab_cache)

    def _ids(self) -> tuple[int, int]:
        """(pad id, decoder start id) of the current tokenizer/model setup."""
        pad = self.tokenizer.pad_token_id
        start = self._decoder_start
        return (PAD_ID if pad is None else pad), (BOS_ID if start is None else start)

    def encode(self, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
        """Token ids (source, target), both ending with the tokenizer's end token, truncated to the max lengths."""
        if not pairs:
            return []
        t = self.task_cfg
        tok = self.tokenizer
        src = tok([p.src for p in pairs], add_special_tokens=True)["input_ids"]
        tgt = tok(text_target=[p.en for p in pairs], add_special_tokens=True)["input_ids"]

        def cut(ids: list[int], limit: int) -> list[int]:
            return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]  # keep the end token

        return [(cut(s, t.max_source_length), cut(g, t.max_target_length)) for s, g in zip(src, tgt)]

    def collate(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        """A padded batch: ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (start token +
        target shifted right) and ``labels`` (target, -100 where padded)."""
        pad, start = self._ids()
        sources = [s for s, _ in encoded]
        targets = [g for _, g in encoded]
        input_ids = pad_stack(sources, pad)
        return {
            "input_ids": input_ids,
            "attention_mask": pad_stack([[1] * len(s) for s in sources], 0),
            "decoder_input_ids": pad_stack([[start] + g[:-1] for g in targets], pad),
            "labels": pad_stack(targets, IGNORE),
        }

    def _fill(self, pairs: list[Pair], order: np.ndarray, pos: int, budget: int) -> tuple[list, int]:
        """Take pairs in ``order`` from ``pos`` while their target tokens fit ``budget`` (at least one)."""
        taken: list[tuple[list[int], list[int]]] = []
        tokens = 0
        while pos < len(order):
            chunk = self.encode([pairs[i] for i in order[pos : pos + 32]])
            for item in chunk:
                if taken and tokens + len(item[1]) > budget:
                    return taken, pos
                taken.append(item)
                tokens += len(item[1])
                pos += 1
        return taken, pos

    def token_batches(
        self, pairs: list[Pair], max_tokens: int, rng: Optional[np.random.Generator] = None
    ) -> Iterator[dict[str, Tensor]]:
        """Batches of at most ``max_tokens`` target tokens over all ``pairs`` (an epoch): in order, or
        with ``rng`` length-bucketed and shuffled (:func:`plan_batches`); for fine-tuning and evaluation."""
        encoded = self.encode(pairs)
        for rows in plan_batches([len(t) for _, t in encoded], max_tokens, rng):
            yield self.collate([encoded[i] for i in rows])

    def length_order(self, split: str, lang: str) -> np.ndarray:
        """The language's pairs sorted by length (characters of both sides, random ties), cached.

        Episodes take consecutive pairs of this order from a random start, so a token-sized batch
        holds sentences of similar length: padding is what makes a CPU step slow (a batch of 95
        pairs padded to one 110-token sentence cost ten times its real tokens).
        """
        key = (split, lang)
        if key not in self._length_orders:
            pairs = self.pairs(split, lang)
            chars = np.array([len(p.src) + len(p.en) for p in pairs], dtype=np.int64)
            ties = np.random.default_rng([zlib.crc32(lang.encode()), 5]).random(len(pairs))
            self._length_orders[key] = np.lexsort((ties, chars))
        return self._length_orders[key]

    def sample_episode(self, rng: np.random.Generator, split: str = "train") -> Episode:
        """One language, then disjoint, adjacent support and query batches of about ``support_tokens``
        / ``query_tokens`` target tokens from a random start in its length-sorted pairs."""
        t = self.task_cfg
        langs = self.languages(split)
        probs = self.task_probabilities(split)
        lang = langs[int(rng.choice(len(langs), p=probs))]
        pairs = self.pairs(split, lang)
        # a random start in the length-sorted order: similar lengths, little padding
        order = np.roll(self.length_order(split, lang), -int(rng.integers(len(pairs))))
        support, pos = self._fill(pairs, order, 0, t.support_tokens)
        query, _ = self._fill(pairs, order, pos, t.query_tokens)
        if not query:
            raise DataError(f"language {lang} ({split}): {len(pairs)} pairs are too few for disjoint support and query batches")
        return Episode(task=lang, support=self.collate(support), query=self.collate(query))

    def merge_batches(self, first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
        """Concatenate two padded batches, padding both to the longer length."""
        pad, _ = self._ids()
        out = {}
        for key in first:
            a, b = first[key], second[key]
            width = max(a.shape[1], b.shape[1])
            value = _PAD_VALUES.get(key, 0 if key == "attention_mask" else pad)
            a = F.pad(a, (0, width - a.shape[1]), value=value)
            b = F.pad(b, (0, width - b.shape[1]), value=value)
            out[key] = torch.cat([a, b])
        return out

    def token_count(self, batch: dict[str, Tensor]) -> int:
        """Target tokens in a batch (the unit of ``support_tokens``; the loss averages over them)."""
        return int((batch["labels"] != IGNORE).sum())

    # -- model -----------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh Marian model from the config (or the pretrained checkpoint), vocabulary sized to the tokenizer."""
        m = self.model_cfg
        dtype = torch.float64 if m.dtype == "float64" else torch.float32
        if m.pretrained:
            from transformers import AutoModelForSeq2SeqLM

            model = AutoModelForSeq2SeqLM.from_pretrained(m.pretrained, attn_implementation=m.attn_implementation, dtype=dtype)
            _ = self.tokenizer
        else:
            from transformers import GenerationConfig, MarianConfig, MarianMTModel

            tok = self.tokenizer
            ids = (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id)
            if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
                raise DataError(f"tokenizer special ids (pad, unk, bos, eos) are {ids}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")
            config = MarianConfig(
                vocab_size=len(tok),
                decoder_vocab_size=len(tok),
                d_model=m.d_model,
                encoder_layers=m.encoder_layers,
                decoder_layers=m.decoder_layers,
                encoder_attention_heads=m.attention_heads,
                decoder_attention_heads=m.attention_heads,
                encoder_ffn_dim=m.ffn_dim,
                decoder_ffn_dim=m.ffn_dim,
                dropout=m.dropout,
                attention_dropout=m.attention_dropout,
                activation_dropout=m.activation_dropout,
                activation_function=m.activation_function,
                max_position_embeddings=m.max_positions,
                init_std=m.init_std,
                scale_embedding=m.scale_embedding,
                tie_word_embeddings=m.tie_embeddings,
                share_encoder_decoder_embeddings=True,
                pad_token_id=PAD_ID,
                eos_token_id=EOS_ID,
                bos_token_id=BOS_ID,
                # not the pad id: the pad row of the embedding gets no gradient (design.md pitfall 3)
                decoder_start_token_id=BOS_ID,
                forced_eos_token_id=None,
                attn_implementation=m.attn_implementation,
            )
            model = MarianMTModel(config).to(dtype)
            model.generation_config = GenerationConfig(
                decoder_start_token_id=BOS_ID,
                bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
                num_beams=self.task_cfg.num_beams,
                max_new_tokens=self.task_cfg.max_new_tokens,
            )
        return self._prepare(model)

    def _prepare(self, model: nn.Module) -> nn.Module:
        """Settings every model needs here, fresh or loaded.

        ``padding_idx`` only masks the gradient of the pad row; a checkpoint whose decoder starts
        from the pad token (Marian's convention) needs that row's gradient for correct
        meta-gradients (design.md pitfall 3), so the mask is removed. Forward results are unchanged.
        Sinusoidal position tables are frozen, loaded or fresh.
        """
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.padding_idx = None
            # sinusoidal tables are frozen at construction, but from_pretrained (transformers 5)
            # re-creates them with requires_grad=True: freeze them again (design.md pitfall 4)
            if type(module).__name__.endswith("SinusoidalPositionalEmbedding"):
                module.weight.requires_grad_(False)
        start = model.config.decoder_start_token_id
        self._decoder_start = BOS_ID if start is None else int(start)
        if len(self.tokenizer) > model.config.vocab_size:
            raise DataError(f"the tokenizer has {len(self.tokenizer)} pieces but the model only {model.config.vocab_size} embeddings")
        return model

    def save_model(self, model: nn.Module, directory: Path) -> None:
        """``model.save_pretrained`` + the tokenizer, so ``AutoModelForSeq2SeqLM`` and
        ``AutoTokenizer.from_pretrained(directory)`` load the folder offline."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = getattr(model, "module", model)  # unwrap DDP if the caller did not
        model.save_pretrained(str(directory))
        save_tokenizer(self.tokenizer, directory)

    def load_model(self, directory: Path) -> nn.Module:
        """Read a folder written by :meth:`save_model` (or any seq2seq checkpoint with its tokenizer);
        the family then uses that folder's tokenizer."""
        from transformers import AutoModelForSeq2SeqLM

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise DataError(f"{directory}: not a saved model (no config.json)")
        self._tokenizer = load_tokenizer(directory)
        dtype = torch.float64 if self.model_cfg.dtype == "float64" else torch.float32
        model = AutoModelForSeq2SeqLM.from_pretrained(
            str(directory), attn_implementation=self.model_cfg.attn_implementation, dtype=dtype, local_files_only=True
        )
        return self._prepare(model)

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """Token-mean cross-entropy of the labels, with the model's tensors replaced by ``params``."""
        logits = self._logits(model, params, batch)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def _logits(self, model: nn.Module, params: Optional[dict[str, Tensor]], batch: dict[str, Tensor]) -> Tensor:
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "decoder_input_ids": batch["decoder_input_ids"],
            "use_cache": False,
            "return_dict": True,
        }
        if params is None:
            return model(**inputs).logits
        # tie_weights: one entry for model.shared.weight also replaces the tied decoder/output weights
        return torch.func.functional_call(model, params, args=(), kwargs=inputs, tie_weights=True, strict=False).logits

    def metrics(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
        """Loss (nats per target token), perplexity, token accuracy and target token count."""
        with torch.no_grad():
            logits = self._logits(model, params, batch)
            labels = batch["labels"]
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            mask = labels != IGNORE
            correct = ((logits.argmax(-1) == labels) & mask).sum()
        tokens = int(mask.sum())
        return {
            "loss": float(loss),
            "ppl": math.exp(min(float(loss), 50.0)),
            "accuracy": float(correct) / max(tokens, 1),
            "tokens": float(tokens),
        }

    # -- translation and validation -----------------------------------------------------------
    @torch.no_grad()
    def translate(self, model: nn.Module, sources: list[str], batch_size: int = 32,
                  num_beams: Optional[int] = None, max_new_tokens: Optional[int] = None) -> list[str]:
        """Detokenized translations of ``sources`` (greedy or beam search through ``generate``),
        batched by similar length for speed, returned in input order."""
        t = self.task_cfg
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        encoded = self.encode([Pair(s, "x") for s in sources])
        order = sorted(range(len(sources)), key=lambda i: len(encoded[i][0]))
        out: list[str] = [""] * len(sources)
        pad, start = self._ids()
        try:
            for begin in range(0, len(order), batch_size):
                idx = order[begin : begin + batch_size]
                rows = [encoded[i][0] for i in idx]
                generated = model.generate(
                    input_ids=pad_stack(rows, pad).to(device),
                    attention_mask=pad_stack([[1] * len(r) for r in rows], 0).to(device),
                    num_beams=num_beams or t.num_beams,
                    max_new_tokens=max_new_tokens or t.max_new_tokens,
                    decoder_start_token_id=start,
                    pad_token_id=pad,
                    eos_token_id=self.tokenizer.eos_token_id,
                    do_sample=False,
                )
                texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    out[i] = text.strip()
        finally:
            model.train(was_training)
        return out

    @torch.no_grad()
    def corpus_loss(self, model: nn.Module, pairs: list[Pair], max_tokens: int = 2000) -> float:
        """Token-mean loss over all ``pairs`` (nats per target token)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        try:
            for batch in self.token_batches(pairs, max_tokens):
                batch = self.to_device(batch, device)
                logits = self._logits(model, None, batch)
                total += float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum"))
                tokens += self.token_count(batch)
        finally:
            model.train(was_training)
        return total / max(tokens, 1)

    def finetune(self, model: nn.Module, pairs: list[Pair], steps: int, lr: float, max_tokens: int,
                 adapt: list[str], seed: int = 0) -> nn.Module:
        """Adam on the parameters matching ``adapt`` for ``steps`` batches of ``pairs`` (in place).

        Batches come from seeded epochs over ``pairs``, so two checkpoints are fine-tuned on the same
        data. The loop is :func:`metanmt.adaptation.finetune.train_updates`, the core of the full
        fine-tuning command (budgets, early stopping, resumable checkpoints).
        """
        from ..adaptation.finetune import train_updates

        try:
            return train_updates(self, model, pairs, steps, lr, max_tokens, adapt, seed)
        except ConfigError as exc:
            raise ConfigError(f"task.dev_adapt: {exc}") from None

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        """sacreBLEU corpus BLEU and chrF (:func:`metanmt.evaluation.scoring.score`, default settings)."""
        from ..evaluation.scoring import score

        result = score(hypotheses, references)
        return {"bleu": result["bleu"], "chrf": result["chrf"]}

    def validate(self, model: nn.Module, engine: Any = None) -> dict[str, float]:
        """Fine-tune a copy briefly on each dev language's fine-tuning set, then translate and score
        its dev segments: ``dev_bleu``, ``dev_chrf`` (sacreBLEU), ``dev_loss`` (after fine-tuning),
        ``dev_loss_zero_shot`` (before), per language and averaged; ``score`` is the average of
        ``dev_metric`` (negated for loss), higher is better. The caller's model and torch RNG state
        are left untouched, and the result depends only on the model (fixed data order and seed).
        ``engine`` (the trainer) is accepted for the TaskFamily contract and not needed.
        """
        t = self.task_cfg
        model = getattr(model, "module", model)
        results: dict[str, list[float]] = {"dev_bleu": [], "dev_chrf": [], "dev_loss": [], "dev_loss_zero_shot": []}
        out: dict[str, float] = {}
        device = next(model.parameters()).device  # the copy stays where the caller keeps the model
        # validation must not move the training RNG streams (exact resume and determinism)
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), _train_mode_restored(model):
            for lang in self.languages("dev"):
                finetune_pairs, eval_pairs = self.dev_sets(lang)
                torch.manual_seed(t.dev_seed)
                tuned = copy.deepcopy(model)
                zero_shot = self.corpus_loss(tuned, eval_pairs)
                self.finetune(tuned, finetune_pairs, t.dev_finetune_steps, t.dev_finetune_lr, t.dev_finetune_tokens,
                              t.dev_adapt, seed=t.dev_seed)
                loss = self.corpus_loss(tuned, eval_pairs)
                hypotheses = self.translate(tuned, [p.src for p in eval_pairs])
                scores = self.score(hypotheses, [p.en for p in eval_pairs])
                for key, value in (("dev_bleu", scores["bleu"]), ("dev_chrf", scores["chrf"]),
                                   ("dev_loss", loss), ("dev_loss_zero_shot", zero_shot)):
                    results[key].append(value)
                    out[f"{key}/{lang}"] = value
                del tuned
        for key, values in results.items():
            out[key] = float(np.mean(values))
        metric = {"bleu": "dev_bleu", "chrf": "dev_chrf", "loss": "dev_loss"}[t.dev_metric]
        out["score"] = -out[metric] if t.dev_metric == "loss" else out[metric]
        return out


    def examples(self, model: nn.Module, n: int) -> list[dict[str, str]]:
        """The first ``n`` scored dev segments of the first dev language: source, reference, the
        zero-shot translation and the translation after the short dev fine-tune of :meth:`validate`
        (same data, steps and seed). The caller's model and RNG state are left untouched."""
        t = self.task_cfg
        langs = self.languages("dev") if t.dev_languages else []
        if not langs or n < 1:
            return []
        lang = langs[0]
        model = getattr(model, "module", model)
        finetune_pairs, eval_pairs = self.dev_sets(lang)
        shown = eval_pairs[:n]
        sources = [p.src for p in shown]
        device = next(model.parameters()).device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), _train_mode_restored(model):
            zero_shot = self.translate(model, sources)
            torch.manual_seed(t.dev_seed)
            tuned = self.finetune(copy.deepcopy(model), finetune_pairs, t.dev_finetune_steps, t.dev_finetune_lr,
                                  t.dev_finetune_tokens, t.dev_adapt, seed=t.dev_seed)
            adapted = self.translate(tuned, sources)
            del tuned
        return [{"language": lang, "source": p.src, "reference": p.en, "zero-shot": z,
                 f"after {t.dev_finetune_steps} steps": a} for p, z, a in zip(shown, zero_shot, adapted)]


@contextlib.contextmanager
def _train_mode_restored(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    try:
        yield
    finally:
        model.train(was_training)
