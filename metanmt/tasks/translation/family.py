"""The translation task family: one task per source language, episodes sized in target tokens,
the token-mean loss, and validation by fine-tuning on each dev language (see the package docstring)."""

from __future__ import annotations

import copy
import logging
import math
import zlib
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ...data.corpus import Corpus, Pair
from ...data.vocab import BOS_ID, PAD_ID, cached_vocab, load_tokenizer, save_tokenizer
from ...errors import ConfigError, DataError
from .. import language_embeddings as lang_emb
from ..base import Episode, TaskFamily, freeze_parameters, temperature_weights
from . import adapters, batching, decoding, model as marian
from .pretrained import LanguageScheme, source_language
from .config import SPLITS, TranslationModelConfig, TranslationTaskConfig
from .corpora import read_pattern
from .scoring import score
from .training import train_updates

logger = logging.getLogger(__name__)


#: below this many nats between the dev NLL with mismatched and with true sources, validation warns
SOURCE_GAP_WARNING = 0.01


def source_gap(family: "TranslationFamily", model: nn.Module, pairs: list[Pair], loss: float) -> float:
    """The corpus NLL with each target paired with the next segment's source, minus ``loss`` (the NLL
    with the true sources): how much the model's predictions depend on its input (0 for one pair)."""
    if len(pairs) < 2:
        return 0.0
    mismatched = [Pair(pairs[(i + 1) % len(pairs)].src, p.en) for i, p in enumerate(pairs)]
    return family.corpus_loss(model, mismatched) - loss


class TranslationFamily(TaskFamily):
    """X -> English translation, one task per source language (see the package docstring)."""

    name: ClassVar[str] = "translation"
    TaskConfig: ClassVar[type] = TranslationTaskConfig
    ModelConfig: ClassVar[type] = TranslationModelConfig
    default_adapt: ClassVar[list[str]] = ["*"]
    EMBEDDINGS_AND_ENCODER: ClassVar[list[str]] = ["@embeddings", "@encoder"]  # by module role (tasks/roles.py)
    evaluator: ClassVar[Any] = "metanmt.evaluation.translate:evaluate_command"  # translate --test, score, NLL

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
        if m.lora is not None and m.language_embeddings.enabled:
            raise ConfigError("model.lora: LoRA adapters and model.language_embeddings are not combined (the adapter "
                              "folder would not hold the language tables); enable one of them")
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
        self._length_orders: dict[tuple[str, str], tuple[np.ndarray, Optional[np.ndarray]]] = {}
        self._decoder_start: Optional[int] = None  # set from the model's config by build_model/load_model
        self._source_lang: Optional[str] = None  # the language encode() gives the model (source_language)
        self._scheme: Optional[tuple[Any, LanguageScheme]] = None  # (tokenizer, its scheme)
        # until told otherwise (use_double_backward) models are built ready for second-order MAML (eager attention)
        self.double_backward = True

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
                from ...data.cldr import cldr_corpus

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

    def _read(self, pattern: str, langs: list[str], split: str, **values: str) -> Corpus:
        """Read ``pattern`` for each language (or once, grouped by the lang column)."""
        return read_pattern(self.task_cfg, self._root, pattern, langs, split, **values)

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
        return temperature_weights([len(self.pairs(split, lang)) for lang in langs], self.task_cfg.temperature)

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

    @property
    def scheme(self) -> LanguageScheme:
        """How the tokenizer's checkpoint family is told the source language and forced into
        English (:mod:`~.pretrained`); the tokenizer's target language is set to English once."""
        tokenizer = self.tokenizer
        if self._scheme is None or self._scheme[0] is not tokenizer:
            scheme = LanguageScheme.for_tokenizer(tokenizer, self.model_cfg)
            scheme.prepare_target(tokenizer)
            self._scheme = (tokenizer, scheme)
        return self._scheme[1]

    def source_language(self, lang: Optional[str]):
        """Context manager: text encoded inside the block is in ``lang`` (a corpus language id), which
        a multilingual checkpoint needs (its code, or a T5 prefix); episodes and validation set it."""
        return source_language(self, lang)

    def set_source_language(self, lang: Optional[str]) -> None:
        """The source language of what is encoded from now on (see :meth:`source_language`)."""
        self._source_lang = lang

    def _make_tokenizer(self) -> Any:
        t = self.task_cfg
        if t.vocab:
            return load_tokenizer(Path(t.vocab).expanduser())
        if self.model_cfg.pretrained:
            return marian.load_pretrained_tokenizer(self.model_cfg.pretrained)
        texts = [text for lang in self.languages("train") for pair in self.pairs("train", lang) for text in pair]
        return cached_vocab(texts, t.vocab_size, t.vocab_max_sentences, use_cache=t.vocab_cache)

    def _ids(self) -> tuple[int, int]:
        """(pad id, decoder start id) of the current tokenizer/model setup."""
        pad = self.tokenizer.pad_token_id
        start = self._decoder_start
        return (PAD_ID if pad is None else pad), (BOS_ID if start is None else start)

    def encode(self, pairs: list[Pair]) -> batching.Encoded:
        """Token ids (source, target), both ending with the tokenizer's end token, truncated to the max lengths."""
        if not pairs:
            return []
        pairs = self.scheme.apply(self.tokenizer, pairs, self._source_lang)
        return batching.encode(self.tokenizer, pairs, self.task_cfg.max_source_length, self.task_cfg.max_target_length)

    def collate(self, encoded: batching.Encoded) -> dict[str, Tensor]:
        """A padded batch: ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (start token +
        target shifted right) and ``labels`` (target, -100 where padded)."""
        pad, start = self._ids()
        return batching.collate(encoded, pad, start)

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

    def length_order(self, split: str, lang: str) -> np.ndarray:
        """The language's pairs sorted by length (random ties), cached: by characters of both sides,
        or with ``task.episode_order: tokens`` by subword counts, target then source.

        Episodes take consecutive pairs of this order from a random start, so a token-sized batch
        holds sentences of similar length: padding is what makes a CPU step slow (a batch of 95
        pairs padded to one 110-token sentence cost ten times its real tokens).
        """
        return self._episode_index(split, lang)[0]

    def _episode_index(self, split: str, lang: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(the length order, the cumulative start probabilities along it or None for uniform), cached."""
        key = (split, lang)
        if key not in self._length_orders:
            t = self.task_cfg
            pairs = self.pairs(split, lang)
            ties = np.random.default_rng([zlib.crc32(lang.encode()), 5]).random(len(pairs))
            if t.episode_order == "tokens" or t.episode_start == "length":
                with self.source_language(lang):  # what encode() gives, counted once per machine (cached)
                    applied = self.scheme.apply(self.tokenizer, pairs, self._source_lang)
                    source, target = batching.token_lengths(self.tokenizer, applied, t.max_source_length,
                                                            t.max_target_length, use_cache=t.vocab_cache)
            if t.episode_order == "tokens":
                order = np.lexsort((ties, source, target))
            else:
                chars = np.array([len(p.src) + len(p.en) for p in pairs], dtype=np.int64)
                order = np.lexsort((ties, chars))
            # a start drawn in proportion to its pair's target tokens: a pair's chance to be in an
            # episode is then about equal for every pair (uniform starts give ~1/length)
            starts = np.cumsum(target[order], dtype=np.float64) if t.episode_start == "length" else None
            self._length_orders[key] = (order, None if starts is None else starts / starts[-1])
        return self._length_orders[key]

    def _fill_episode(self, pairs: list[Pair], order: np.ndarray, start: int) -> tuple[list, list]:
        """Support, then query, from ``start`` in ``order``. An episode that would run past the end is
        taken from the end backwards instead (the longest pairs): wrapping around to the shortest pairs
        put one-token pairs beside 128-token ones, and the merged batch of support and query, padded to
        the longest, grew to 259 x 128 positions (9 GB, a 40 s step)."""
        t = self.task_cfg
        support, pos = self._fill(pairs, order, start, t.support_tokens)
        query, pos = self._fill(pairs, order, pos, t.query_tokens)
        if pos < len(order):
            return support, query
        backwards = order[::-1]
        support, pos = self._fill(pairs, backwards, 0, t.support_tokens)
        query, _ = self._fill(pairs, backwards, pos, t.query_tokens)
        return support, query

    def sample_episode(self, rng: np.random.Generator, split: str = "train") -> Episode:
        """One language, then disjoint, adjacent support and query batches of about ``support_tokens``
        / ``query_tokens`` target tokens from a random start in its length-sorted pairs."""
        t = self.task_cfg
        langs = self.languages(split)
        probs = self.task_probabilities(split)
        lang = langs[int(rng.choice(len(langs), p=probs))]
        pairs = self.pairs(split, lang)
        # a random start in the length-sorted order: similar lengths, little padding
        order, starts = self._episode_index(split, lang)
        start = int(rng.integers(len(pairs))) if starts is None else min(int(np.searchsorted(starts, rng.random(), side="right")), len(pairs) - 1)
        with self.source_language(lang):
            if t.episode_order == "chars" and t.episode_start == "uniform":
                # as runs made before the two keys did: past the longest pairs, wrap around to the shortest
                order = np.roll(order, -start)
                support, pos = self._fill(pairs, order, 0, t.support_tokens)
                query, _ = self._fill(pairs, order, pos, t.query_tokens)
            else:
                support, query = self._fill_episode(pairs, order, start)
        if not query:
            raise DataError(f"language {lang} ({split}): {len(pairs)} pairs are too few for disjoint support and query batches")
        support, query = self.collate(support), self.collate(query)
        if self.model_cfg.language_embeddings.enabled:  # language-embeddings hook: the batches name their language
            index = lang_emb.family_languages(self).index(lang)
            support, query = lang_emb.tag_batch(support, index), lang_emb.tag_batch(query, index)
        return Episode(task=lang, support=support, query=query)

    def merge_batches(self, first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
        """Concatenate two padded batches, padding both to the longer length."""
        return batching.merge(first, second, self._ids()[0])

    def token_count(self, batch: dict[str, Tensor]) -> int:
        """Target tokens in a batch (the unit of ``support_tokens``; the loss averages over them)."""
        return batching.token_count(batch)

    # -- model -----------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """A fresh Marian model from the config (or the pretrained checkpoint), vocabulary sized to the tokenizer."""
        m, t = self.model_cfg, self.task_cfg
        if m.pretrained:
            model = marian.load_pretrained(m.pretrained, m, double_backward=self.double_backward)
            _ = self.tokenizer
        else:
            model = marian.build_marian(m, self.tokenizer, t.num_beams, t.max_new_tokens, self.double_backward)
        if m.lora is not None:  # adapters are the meta-parameters, the base is frozen (adapters.py)
            model = adapters.apply_lora(model, m.lora, base_reference=m.pretrained)
        model = self.prepare_model(model)
        lang_emb.build_for_family(self, model)  # language-embeddings hook (off unless configured)
        return model

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Ready a model built or loaded elsewhere for this family: :func:`~.model.prepare` (pad-row
        gradient, frozen positions, vocabulary size checked), the decoder start id it reads, and the
        ``model.freeze`` patterns (frozen: neither meta-learned, adapted nor fine-tuned)."""
        self._decoder_start = marian.prepare(model, self.tokenizer)
        # generate() starts every translation with the English code where the family has one; in
        # the generation config, so a saved model keeps translating into English (pretrained.py)
        forced = self.scheme.forced_bos_id(self.tokenizer)
        if forced is not None:
            model.generation_config.forced_bos_token_id = forced
        freeze_parameters(model, self.model_cfg.freeze)
        return model

    def use_double_backward(self, needed: bool) -> None:
        """Whether models built or loaded from now on must support a double backward (second-order
        MAML: eager attention) or may use the faster sdpa (``model.attn_implementation: auto``)."""
        self.double_backward = needed

    def save_model(self, model: nn.Module, directory: Path) -> None:
        """``model.save_pretrained`` + the tokenizer, so ``AutoModelForSeq2SeqLM`` and
        ``AutoTokenizer.from_pretrained(directory)`` load the folder offline. A LoRA model writes its
        adapter (peft's ``save_pretrained``) and where its base is (:func:`~.adapters.save_adapter`)."""
        if adapters.is_adapter_model(model):
            adapters.save_adapter(model, directory)
            save_tokenizer(self.tokenizer, directory)
        else:
            marian.save(model, self.tokenizer, directory)

    def load_model(self, directory: Path) -> nn.Module:
        """Read a folder written by :meth:`save_model` (or any seq2seq checkpoint with its tokenizer);
        the family then uses that folder's tokenizer."""
        directory = Path(directory)
        if adapters.is_adapter_folder(directory):  # a LoRA adapter: its base, then the adapter
            self._tokenizer = load_tokenizer(directory)
            model = adapters.load_adapter(lambda base: marian.load_pretrained(
                base, self.model_cfg, local_files_only=True, double_backward=self.double_backward), directory)
            return self.prepare_model(model)
        if not (directory / "config.json").is_file():
            raise DataError(f"{directory}: not a saved model (no config.json)")
        self._tokenizer = load_tokenizer(directory)
        model = self.prepare_model(marian.load_pretrained(directory, self.model_cfg, local_files_only=True,
                                                          double_backward=self.double_backward))
        lang_emb.load_for_family(self, model, directory)  # language-embeddings hook: the tables saved beside it
        return model

    # -- language embeddings (metanmt/tasks/language_embeddings.py): the engine's two hooks ------
    def episode_only_names(self, model: nn.Module) -> set[str]:
        return lang_emb.episode_only_names(model)

    def after_outer_step(self, model: nn.Module) -> None:
        lang_emb.after_outer_step(model)

    # -- loss ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """Token-mean cross-entropy of the labels, with the model's tensors replaced by ``params``."""
        return marian.token_cross_entropy(marian.forward(model, params, batch), batch["labels"])

    def metrics(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
        """Loss (nats per target token), perplexity, token accuracy and target token count."""
        with torch.no_grad():
            logits = marian.forward(model, params, batch)
            labels = batch["labels"]
            loss = marian.token_cross_entropy(logits, labels)
            mask = labels != batching.IGNORE
            correct = ((logits.argmax(-1) == labels) & mask).sum()
        tokens = int(mask.sum())
        return {
            "loss": float(loss),
            "ppl": math.exp(min(float(loss), 50.0)),
            "accuracy": float(correct) / max(tokens, 1),
            "tokens": float(tokens),
        }

    # -- translation and validation -----------------------------------------------------------
    def translate(self, model: nn.Module, sources: list[str], batch_size: int = 32,
                  num_beams: Optional[int] = None, max_new_tokens: Optional[int] = None) -> list[str]:
        """Detokenized translations of ``sources`` (greedy or beam search through ``generate``),
        batched by similar length for speed, returned in input order."""
        t = self.task_cfg
        encoded = self.encode([Pair(s, "x") for s in sources])
        pad, start = self._ids()
        return decoding.generate(model, self.tokenizer, [s for s, _ in encoded], pad, start, batch_size,
                                 num_beams or t.num_beams, max_new_tokens or t.max_new_tokens)

    @torch.no_grad()
    def sentence_losses(self, model: nn.Module, pairs: list[Pair], max_tokens: int = 500) -> tuple[list[float], list[int]]:
        """Teacher-forced NLL of each pair's target (nats summed over its tokens) and its token count,
        in input order; batches of similar lengths (:func:`~.batching.length_sorted_batches`). Small
        batches are the fast ones on a CPU: 500 target tokens scored 500 Finnish test segments in
        3.6 s, 2,000 in 9.6 s (docs/design.md, "Fine-tuning and scoring on a CPU")."""
        encoded = self.encode(pairs)
        nats, tokens = [0.0] * len(encoded), [len(t) for _, t in encoded]
        device = next(model.parameters()).device
        with marian.restored_train_mode(model, False):
            for rows in batching.length_sorted_batches(encoded, max_tokens):
                batch = self.to_device(self.collate([encoded[i] for i in rows]), device)
                loss = marian.token_cross_entropy(marian.forward(model, None, batch).float(), batch["labels"], reduction="none")
                for i, value in zip(rows, loss.view(len(rows), -1).sum(1).tolist()):
                    nats[i] = value
        return nats, tokens

    def corpus_loss(self, model: nn.Module, pairs: list[Pair], max_tokens: int = 500) -> float:
        """Token-mean loss over all ``pairs`` (nats per target token)."""
        nats, tokens = self.sentence_losses(model, pairs, max_tokens)
        return sum(nats) / max(sum(tokens), 1)

    def finetune(self, model: nn.Module, pairs: list[Pair], steps: int, lr: float, max_tokens: int,
                 adapt: list[str], seed: int = 0) -> nn.Module:
        """Adam on the parameters matching ``adapt`` for ``steps`` batches of ``pairs`` (in place).

        Batches come from seeded epochs over ``pairs``, so two checkpoints are fine-tuned on the same
        data. The loop is :class:`~.training.TrainingLoop`, the one ``metanmt finetune`` runs too.
        """
        return train_updates(self, model, pairs, steps, lr, max_tokens, adapt, seed, key="task.dev_adapt")

    def score(self, hypotheses: list[str], references: list[str]) -> dict[str, float]:
        """sacreBLEU corpus BLEU and chrF (:func:`~.scoring.score`, default settings)."""
        result = score(hypotheses, references)
        return {"bleu": result["bleu"], "chrf": result["chrf"]}

    def validate(self, model: nn.Module, engine: Any = None) -> dict[str, float]:
        """Fine-tune a copy briefly on each dev language's fine-tuning set, then translate and score
        its dev segments: ``dev_bleu``, ``dev_chrf`` (sacreBLEU), ``dev_loss`` (after fine-tuning),
        ``dev_loss_zero_shot`` (before), ``dev_source_gap`` (the fine-tuned dev NLL with every target
        paired with another segment's source, minus ``dev_loss``: ~0 when the model ignores its
        source, which is logged as a warning), per language and averaged; ``score`` is the average of
        ``dev_metric`` (negated for loss), higher is better. The caller's model and torch RNG state
        are left untouched, and the result depends only on the model (fixed data order and seed).
        ``engine`` (the trainer) is accepted for the TaskFamily contract and not needed.
        """
        t = self.task_cfg
        model = getattr(model, "module", model)
        results: dict[str, list[float]] = {"dev_bleu": [], "dev_chrf": [], "dev_loss": [], "dev_loss_zero_shot": [],
                                           "dev_source_gap": []}
        out: dict[str, float] = {}
        device = next(model.parameters()).device  # the copy stays where the caller keeps the model
        # validation must not move the training RNG streams (exact resume and determinism)
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), marian.restored_train_mode(model):
            for lang in self.languages("dev"):
                finetune_pairs, eval_pairs = self.dev_sets(lang)
                torch.manual_seed(t.dev_seed)
                tuned = copy.deepcopy(model)
                lang_emb.set_language(tuned, lang, self)  # language-embeddings hook: a fresh zero table
                with self.source_language(lang):
                    zero_shot = self.corpus_loss(tuned, eval_pairs)
                    self.finetune(tuned, finetune_pairs, t.dev_finetune_steps, t.dev_finetune_lr, t.dev_finetune_tokens,
                                  t.dev_adapt, seed=t.dev_seed)
                    loss = self.corpus_loss(tuned, eval_pairs)
                    gap = source_gap(self, tuned, eval_pairs, loss)
                    hypotheses = self.translate(tuned, [p.src for p in eval_pairs])
                scores = self.score(hypotheses, [p.en for p in eval_pairs])
                if len(eval_pairs) > 1 and gap < SOURCE_GAP_WARNING:
                    logger.warning("dev %s: the model ignores its source (dev NLL with mismatched sources is only %+.4f "
                                   "nats above the true ones): its encoder has collapsed, which a learning rate too "
                                   "high for this model does (docs/design.md, \"A model that ignores its source\")", lang, gap)
                for key, value in (("dev_bleu", scores["bleu"]), ("dev_chrf", scores["chrf"]),
                                   ("dev_loss", loss), ("dev_loss_zero_shot", zero_shot), ("dev_source_gap", gap)):
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
        with torch.random.fork_rng(devices=cuda), marian.restored_train_mode(model), self.source_language(lang):
            zero_shot = self.translate(model, sources)
            torch.manual_seed(t.dev_seed)
            tuned = self.finetune(copy.deepcopy(model), finetune_pairs, t.dev_finetune_steps, t.dev_finetune_lr,
                                  t.dev_finetune_tokens, t.dev_adapt, seed=t.dev_seed)
            adapted = self.translate(tuned, sources)
            del tuned
        return [{"language": lang, "source": p.src, "reference": p.en, "zero-shot": z,
                 f"after {t.dev_finetune_steps} steps": a} for p, z, a in zip(shown, zero_shot, adapted)]
