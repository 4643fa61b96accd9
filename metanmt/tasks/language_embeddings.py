"""MetaNMT's source-side mechanism: per-language additive embeddings and a universal lexical representation.

Gu et al. (2018) give every source language its own embedding table, initialized to zero and added
to a universal part shared by all languages; after every meta-update the language table is zeroed,
so that every episode imitates a new language whose embeddings must be learned from the support
set. The universal part (ULR) is an attention over a shared table of universal embeddings::

    e(x) = table_lang[x] + softmax(q(x) · A · K^T / tau) · U         (tau = 0.05, A starts at I)

Here the encoder's input embedding of a Marian model becomes::

    embed(ids, lang) = shared[ids] + table[slot(lang)][ids] + mask[ids] * softmax(q[ids] A K^T / tau) U

``shared`` is the model's own (tied) subword embedding, which the decoder and the output layer keep
using; ``mask`` is 0 for special tokens and for pieces without a query vector. Configured under
``model.language_embeddings`` of a translation run::

    model:
      language_embeddings:
        enabled: true
        reset: every_episode          # never | every_episode (MetaNMT) | every_step
        ulr: {enabled: true, queries: corpus, num_keys: 2000, tau: 0.05}

The tables live in a submodule of the encoder (``model.encoder.language_embeddings``), so adapt
patterns name them: ``model.encoder.language_embeddings.tables.*`` (the tables),
``model.encoder.language_embeddings.ulr.A`` and ``...ulr.values`` (the ULR's learned parts);
``model.encoder.*`` (embeddings + encoder) includes all of them. A forward pre-hook on the encoder
turns ``input_ids`` into ``inputs_embeds`` with the expression above (times Marian's embedding
scale), so the model's own ``forward`` and ``generate`` are used unchanged.

Reset policies (see docs/language_embeddings.md):

* ``never``: one table per language, ordinary parameters (meta-learned, adapted where named).
* ``every_episode`` (MetaNMT): one table, the *episode table*, shared by every language because
  every episode starts it at zero; it is not a meta-parameter (the outer optimizer never sees it,
  the meta-gradient reaches the shared parts only), the inner loop adapts it from zero.
* ``every_step``: the episode table is a meta-parameter like any other during a step (its gradient
  counts in clipping and in the outer optimizer's state), then it is zeroed after every outer step
  -- the literal order of the official code (meta-update, then zero).

Storage: :func:`save_pretrained` writes the shared model with ``save_pretrained`` (the tables are
left out, so ``AutoModelForSeq2SeqLM.from_pretrained`` loads a plain Marian model) and the tables
+ ULR tensors to ``language_embeddings.safetensors`` with ``language_embeddings.json`` (policy,
languages, ULR settings, the active language); :func:`load_into` restores them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .language_embedding_config import LanguageEmbeddingConfig, ULRConfig  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MODULE_NAME = "language_embeddings"  # the attribute on the encoder; parameter names contain it
TENSORS_FILE = "language_embeddings.safetensors"
META_FILE = "language_embeddings.json"
EPISODE_SLOT = "episode"  # the table of every language under a reset policy
ANY_LANGUAGE = "*"  # the ULR query group of language-independent queries (shared / corpus vectors)
NUM_SPECIAL = 4  # pad, unk, bos, eos (metanmt.data.vocab): no universal part, as in the official code
FORMAT = 1


# -- the modules ---------------------------------------------------------------------------------


class UniversalLexicalRepresentation(nn.Module):
    """``softmax(q[ids] · A · K^T / tau) · U``: ``q`` fixed queries per piece (one table per query
    group), ``K`` fixed keys, ``A`` learned (identity at the start), ``U`` learned universal values."""

    def __init__(self, queries: Tensor, query_mask: Tensor, groups: list[str], keys: Tensor, values: Tensor,
                 tau: float, learn_A: bool = True):
        super().__init__()
        if queries.dim() != 3 or queries.shape[-1] != keys.shape[-1]:
            raise ValueError(f"queries [groups, vocab, dim] and keys [keys, dim] disagree: {tuple(queries.shape)}, {tuple(keys.shape)}")
        self.groups = list(groups)
        self.tau = float(tau)
        self.register_buffer("queries", queries)
        self.register_buffer("query_mask", query_mask)
        self.register_buffer("keys", keys)
        self.A = nn.Parameter(torch.eye(keys.shape[-1], dtype=keys.dtype), requires_grad=learn_A)
        self.values = nn.Parameter(values)

    def group_index(self, lang: Optional[str]) -> Optional[int]:
        for name in (lang, ANY_LANGUAGE):
            if name is not None and name in self.groups:
                return self.groups.index(name)
        return None

    def add_group(self, name: str, queries: Tensor, mask: Tensor) -> None:
        """Queries of one more language (user-supplied vectors of a language met at fine-tuning)."""
        self.groups.append(name)
        self.queries = torch.cat([self.queries, queries.to(self.queries)[None]])
        self.query_mask = torch.cat([self.query_mask, mask.to(self.query_mask)[None]])

    def attention(self, ids: Tensor, group: int) -> Tensor:
        """The attention weights over the keys, ``[..., num_keys]``."""
        q = F.embedding(ids, self.queries[group])
        return torch.softmax(q @ self.A @ self.keys.T / self.tau, dim=-1)

    def forward(self, ids: Tensor, group: int) -> Tensor:
        mask = F.embedding(ids, self.query_mask[group][:, None])
        return (self.attention(ids, group) @ self.values) * mask


class LanguageEmbeddings(nn.Module):
    """The language tables (and the ULR) of a model; see the module docstring."""

    def __init__(self, cfg: LanguageEmbeddingConfig, languages: list[str], vocab_size: int, d_model: int,
                 dtype: torch.dtype = torch.float32, ulr: Optional[UniversalLexicalRepresentation] = None):
        super().__init__()
        self.cfg = cfg
        self.languages = list(dict.fromkeys(languages))
        slots = [EPISODE_SLOT] if cfg.reset != "never" else self.languages
        for slot in slots:
            _check_slot_name(slot)
        self.tables = nn.ParameterDict({s: nn.Parameter(torch.zeros(vocab_size, d_model, dtype=dtype)) for s in slots})
        self.ulr = ulr
        self.active: Optional[str] = None  # the language of batches that do not carry lang_ids
        self._batch_langs: Optional[Tensor] = None  # set for one forward by batch_language()

    # -- which table ------------------------------------------------------------------------------
    def slot(self, lang: Optional[str]) -> Optional[str]:
        if self.cfg.reset != "never":
            return EPISODE_SLOT
        return lang if lang is not None and lang in self.tables else None

    def language_index(self, lang: str) -> int:
        if lang not in self.languages:
            self.languages.append(lang)
        return self.languages.index(lang)

    def table_names(self, prefix: str = "") -> list[str]:
        return [f"{prefix}tables.{s}" for s in self.tables]

    def reset(self) -> None:
        """Zero every table (a reset policy's episode table; all tables under ``never`` too)."""
        with torch.no_grad():
            for table in self.tables.values():
                table.zero_()

    def add_language(self, lang: str) -> None:
        """Make ``lang`` known: under ``never`` a new zero table for it."""
        self.language_index(lang)
        if self.cfg.reset == "never" and lang not in self.tables:
            _check_slot_name(lang)
            like = next(iter(self.tables.values()))
            self.tables[lang] = nn.Parameter(torch.zeros_like(like))

    # -- the embedding ------------------------------------------------------------------------------
    def _extra(self, ids: Tensor, lang: Optional[str]) -> Optional[Tensor]:
        out: Optional[Tensor] = None
        slot = self.slot(lang)
        if slot is not None:
            out = F.embedding(ids, self.tables[slot])
        if self.ulr is not None:
            group = self.ulr.group_index(lang)
            if group is not None:
                universal = self.ulr(ids, group)
                out = universal if out is None else out + universal
        return out

    def forward(self, ids: Tensor, base: nn.Module) -> Tensor:
        """``base(ids)`` plus the language part and the universal part (unscaled)."""
        x = base(ids)
        if self._batch_langs is None:
            extra = self._extra(ids, self.active)
            return x if extra is None else x + extra
        codes = self._batch_langs.reshape(ids.shape[0], -1)[:, 0]
        for code in sorted(set(codes.tolist())):
            extra = self._extra(ids, self.languages[code])
            if extra is None:
                continue
            if bool((codes == code).all()):
                x = x + extra
            else:  # a batch mixing languages: each row gets its own language's part
                x = x + extra * (codes == code).to(extra.dtype)[:, None, None]
        return x


def _check_slot_name(name: str) -> None:
    if not name or "." in name:
        raise ConfigError(f"language {name!r}: a language code for a language table must be non-empty and have no '.'")


def _encoder_pre_hook(encoder: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    """input_ids -> inputs_embeds through the language embeddings (a module-level function, so that
    ``copy.deepcopy`` of the model keeps a working hook)."""
    module = getattr(encoder, MODULE_NAME, None)
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids, args = args[0], args[1:]
    if module is None or ids is None or kwargs.get("inputs_embeds") is not None:
        return None
    scale = getattr(encoder, "embed_scale", 1.0)
    embeds = module(ids, encoder.embed_tokens) * scale
    return args, {**kwargs, "input_ids": None, "inputs_embeds": embeds}


# -- attaching, finding -------------------------------------------------------------------------------


def find(model: nn.Module) -> Optional[LanguageEmbeddings]:
    """The model's :class:`LanguageEmbeddings`, or None when the mechanism is off."""
    model = getattr(model, "module", model)
    encoder = _encoder(model)
    return getattr(encoder, MODULE_NAME, None) if encoder is not None else None


def _encoder(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_encoder", None)
    return get() if callable(get) else None


def attach(model: nn.Module, module: LanguageEmbeddings) -> LanguageEmbeddings:
    """Install ``module`` on the model's encoder (replacing one already there)."""
    encoder = _encoder(model)
    if encoder is None or not hasattr(encoder, "embed_tokens"):
        raise ConfigError("model.language_embeddings: needs an encoder-decoder model with input embeddings (Marian-style)")
    setattr(encoder, MODULE_NAME, module)
    if not getattr(encoder, "_metanmt_language_hook", False):
        encoder.register_forward_pre_hook(_encoder_pre_hook, with_kwargs=True)
        encoder._metanmt_language_hook = True
    return module


def prefix_of(model: nn.Module) -> str:
    """The parameter-name prefix of the module in ``model`` (``model.encoder.language_embeddings.``)."""
    model = getattr(model, "module", model)
    target = find(model)
    for name, sub in model.named_modules():
        if sub is target:
            return f"{name}."
    return ""


def episode_only_names(model: nn.Module) -> set[str]:
    """Names of tensors the inner loop adapts from a fresh start every episode but the outer step
    never updates: the episode table under ``every_episode``; empty otherwise."""
    module = find(model)
    if module is None or module.cfg.reset != "every_episode":
        return set()
    return set(module.table_names(prefix_of(model)))


def after_outer_step(model: nn.Module) -> None:
    """Zero the episode table after an outer update (both reset policies; ``never`` keeps its tables)."""
    module = find(model)
    if module is not None and module.cfg.reset != "never":
        module.reset()


def set_language(model: nn.Module, lang: str, family: Any = None) -> None:
    """Make ``lang`` the language of batches without ``lang_ids`` (fine-tuning, translation): a
    language the tables do not know gets a fresh zero table (a reset policy's episode table is zeroed:
    whatever it holds belongs to another language); under ``never`` the other languages' tables stop
    being trainable; user-supplied ULR queries are read for it when ``family`` can find its vectors file."""
    module = find(model)
    if module is None:
        return
    known = lang in module.languages
    if module.cfg.reset != "never" and module.active != lang:
        module.reset()
    module.add_language(lang)
    if module.cfg.reset == "never":
        if not known:
            with torch.no_grad():
                module.tables[lang].zero_()
        # adapting for one language changes its table only (the others would get zero gradients)
        for name, t in module.tables.items():
            t.requires_grad_(name == lang)
    u = module.cfg.ulr
    if module.ulr is not None and u.queries == "file" and module.ulr.group_index(lang) is None and family is not None:
        path = _resolve(u.query_vectors.replace("{lang}", lang), getattr(family, "data_root", None))
        if path.is_file():
            q, mask = _file_queries(path, family.tokenizer, module.ulr.queries.shape[1], module.ulr.keys.shape[-1])
            module.ulr.add_group(lang, q, mask)
        else:
            log.warning("ULR: no word vectors for %s (%s): its pieces get no universal part", lang, path)
    module.active = lang


@contextlib.contextmanager
def batch_language(model: nn.Module, batch: Any) -> Iterator[None]:
    """Within the block, forward passes use the batch's ``lang_ids`` (if it has them)."""
    module = find(model)
    ids = batch.get("lang_ids") if isinstance(batch, dict) else None
    if module is None or ids is None:
        yield
        return
    previous, module._batch_langs = module._batch_langs, ids
    try:
        yield
    finally:
        module._batch_langs = previous


def tag_batch(batch: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Add ``lang_ids`` (``[batch, 1]``: every row's language index) to a collated batch."""
    batch["lang_ids"] = torch.full((batch["input_ids"].shape[0], 1), index, dtype=torch.long)
    return batch


# -- building ------------------------------------------------------------------------------------------


def build(model: nn.Module, cfg: LanguageEmbeddingConfig, languages: list[str], tokenizer: Any = None,
          pairs: Optional[list[Any]] = None, data_root: Optional[Path] = None) -> Optional[LanguageEmbeddings]:
    """Attach fresh (zero) tables and, if configured, a ULR to ``model``; None when disabled.

    ``pairs`` (objects with ``.src`` and ``.en``) are the training pairs the corpus vectors and the
    key frequencies come from; ``tokenizer`` maps them (and word-vector files) to the subword vocabulary.
    """
    if not cfg.enabled:
        return None
    cfg.check()
    weight = model.get_input_embeddings().weight
    vocab, d_model = weight.shape
    ulr = None
    if cfg.ulr.enabled:
        started = time.perf_counter()
        ulr = _build_ulr(cfg.ulr, weight.detach(), tokenizer, pairs or [], languages, data_root)
        log.info("ULR: %d universal tokens, %s queries of dimension %d (%s), built in %.1fs", ulr.keys.shape[0],
                 cfg.ulr.queries, ulr.keys.shape[1], ", ".join(ulr.groups), time.perf_counter() - started)
    module = LanguageEmbeddings(cfg, languages, vocab, d_model, weight.dtype, ulr).to(weight.device)
    return attach(model, module)


def _normalize(x: Tensor) -> Tensor:
    # unit vectors: with tau = 0.05 the attention is then as sharp as cosine similarities make it
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _piece_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _english_counts(tokenizer: Any, pairs: list[Any], vocab: int) -> np.ndarray:
    counts = np.zeros(vocab, dtype=np.int64)
    for ids in _piece_ids(tokenizer, [p.en for p in pairs]):
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    counts[:NUM_SPECIAL] = 0
    return counts


def corpus_vectors(tokenizer: Any, pairs: list[Any], vocab: int, dim: int) -> Tensor:
    """Vectors of every piece from the corpus itself: truncated SVD of the positive PMI of
    (piece of either side, English piece) co-occurrence within sentence pairs.

    Co-occurring with the same English pieces puts a source piece near its translations and the
    English pieces themselves, so queries (any language) and keys (English) share one space, as the
    paper's monolingual vectors aligned to English do. Written here because no installed library
    computes cross-lingual vectors offline (scipy does the sparse SVD).
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    rows_all, cols_all = [], []
    src_ids = _piece_ids(tokenizer, [p.src for p in pairs])
    en_ids = _piece_ids(tokenizer, [p.en for p in pairs])
    for s, e in zip(src_ids, en_ids):
        cols = np.unique(np.asarray(e, dtype=np.int64))
        rows = np.unique(np.asarray(list(s) + list(e), dtype=np.int64))
        if not len(cols) or not len(rows):
            continue
        rows_all.append(np.repeat(rows, len(cols)))
        cols_all.append(np.tile(cols, len(rows)))
    if not rows_all:
        raise DataError("ULR corpus vectors: the training pairs give no co-occurrences")
    r, c = np.concatenate(rows_all), np.concatenate(cols_all)
    counts = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(vocab, vocab)).tocsr()
    counts.sum_duplicates()
    total = counts.sum()
    row_sum = np.asarray(counts.sum(axis=1)).ravel()
    col_sum = np.asarray(counts.sum(axis=0)).ravel()
    coo = counts.tocoo()
    pmi = np.log(coo.data * total / (row_sum[coo.row] * col_sum[coo.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(vocab, vocab))
    k = max(1, min(dim, min(ppmi.shape) - 1, ppmi.nnz - 1))
    # a fixed start vector: ARPACK's default is random, and every process must get the same vectors
    u, s, _ = svds(ppmi, k=k, v0=np.full(min(ppmi.shape), 1.0 / math.sqrt(min(ppmi.shape))))
    vectors = u * np.sqrt(s)[None, :]
    if k < dim:
        vectors = np.pad(vectors, ((0, 0), (0, dim - k)))
    return torch.from_numpy(vectors)


def read_word_vectors(path: Path, limit: Optional[int] = None) -> tuple[list[str], Tensor]:
    """Words and vectors of a word2vec/fastText text file (an optional ``count dim`` header line)."""
    words: list[str] = []
    rows: list[list[float]] = []
    dim = None
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read word vectors ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) < 2:
                continue
            try:
                vector = [float(x) for x in parts[1:] if x]
            except ValueError:
                raise DataError(f"{path}:{number}: expected a word and numbers") from None
            if dim is None:
                dim = len(vector)
            elif len(vector) != dim:
                raise DataError(f"{path}:{number}: {len(vector)} numbers, expected {dim} as on the first vector")
            words.append(parts[0])
            rows.append(vector)
            if limit is not None and len(words) >= limit:
                break
    if not words:
        raise DataError(f"{path}: no word vectors")
    return words, torch.tensor(rows, dtype=torch.float64)


def _piece_words(tokenizer: Any, vocab: int) -> list[Optional[str]]:
    """The word a piece stands for when it starts a word (SentencePiece's '▁'), else None."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(tokenizer)))))
    out: list[Optional[str]] = [None] * vocab
    for i, tok in enumerate(tokens):
        if i >= NUM_SPECIAL and tok and tok.startswith("▁") and len(tok) > 1:
            out[i] = tok[1:]
    return out


def _file_queries(path: Path, tokenizer: Any, vocab: int, dim: int) -> tuple[Tensor, Tensor]:
    words, vectors = read_word_vectors(path)
    if vectors.shape[1] != dim:
        raise DataError(f"{path}: vectors of dimension {vectors.shape[1]}, the keys have {dim}")
    index = {w: i for i, w in enumerate(words)}
    lower = {}
    for i, w in enumerate(words):
        lower.setdefault(w.lower(), i)
    queries = torch.zeros(vocab, dim, dtype=torch.float64)
    mask = torch.zeros(vocab, dtype=torch.float64)
    for piece, word in enumerate(_piece_words(tokenizer, vocab)):
        if word is None:
            continue
        row = index.get(word, lower.get(word.lower()))
        if row is not None:
            queries[piece], mask[piece] = vectors[row], 1.0
    return _normalize(queries), mask


def _resolve(path: str, data_root: Optional[Path]) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and data_root is not None and (Path(data_root) / p).exists():
        return Path(data_root) / p
    return p


def _build_ulr(u: ULRConfig, shared: Tensor, tokenizer: Any, pairs: list[Any], languages: list[str],
               data_root: Optional[Path]) -> UniversalLexicalRepresentation:
    vocab, d_model = shared.shape
    dtype = shared.dtype
    special = torch.arange(vocab) < NUM_SPECIAL
    if u.queries in ("shared", "corpus"):
        if tokenizer is None or not pairs:
            raise ConfigError(f"model.language_embeddings.ulr.queries: {u.queries!r} needs the training pairs to pick the keys")
        counts = _english_counts(tokenizer, pairs[: u.max_pairs], vocab)
        key_ids = torch.from_numpy(np.argsort(-counts, kind="stable")[: min(u.num_keys, int((counts > 0).sum()))])
        if not len(key_ids):
            raise DataError("ULR: the English side of the training pairs has no pieces to use as keys")
        if u.queries == "shared":
            vectors = shared.double()
        else:
            vectors = corpus_vectors(tokenizer, pairs[: u.max_pairs], vocab, u.dim)
        vectors = _normalize(vectors)
        mask = ((vectors.norm(dim=-1) > 0) & ~special).double()
        queries, keys = vectors[None], vectors[key_ids]
        values = shared[key_ids].clone()  # a universal token starts as its English piece's embedding
        groups = [ANY_LANGUAGE]
    else:
        key_path = _resolve(u.key_vectors, data_root)
        key_words, keys = read_word_vectors(key_path, limit=u.num_keys)
        keys = _normalize(keys)
        qs, masks, groups = [], [], []
        for lang in languages:
            path = _resolve(u.query_vectors.replace("{lang}", lang), data_root)
            if not path.is_file():
                log.warning("ULR: no word vectors for %s (%s): its pieces get no universal part", lang, path)
                continue
            q, m = _file_queries(path, tokenizer, vocab, keys.shape[1])
            qs.append(q), masks.append(m), groups.append(lang)
        if not groups:
            raise DataError(f"model.language_embeddings.ulr.query_vectors: no file {u.query_vectors!r} for any of "
                            f"{', '.join(languages)}")
        queries, mask = torch.stack(qs), torch.stack(masks)
        # a universal token starts as the embedding of the piece spelling its word, if there is one
        pieces = {w: i for i, w in enumerate(_piece_words(tokenizer, vocab)) if w is not None}
        std = float(shared.std())
        values = torch.randn(len(key_words), d_model, dtype=dtype) * std
        for k, word in enumerate(key_words):
            if word in pieces:
                values[k] = shared[pieces[word]]
    if mask.dim() == 1:
        mask = mask[None]
    return UniversalLexicalRepresentation(queries.to(dtype), mask.to(dtype), groups, keys.to(dtype), values.to(dtype),
                                          u.tau, u.learn_A)


# -- storage -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def detached(model: nn.Module) -> Iterator[None]:
    """Within the block the model is the plain shared model (what ``save_pretrained`` should see)."""
    model = getattr(model, "module", model)
    module = find(model)
    if module is None:
        yield
        return
    encoder = _encoder(model)
    delattr(encoder, MODULE_NAME)
    try:
        yield
    finally:
        setattr(encoder, MODULE_NAME, module)


def save_pretrained(model: nn.Module, directory: Path) -> None:
    """``model.save_pretrained(directory)`` of the shared model, plus the language tables and ULR
    (``language_embeddings.safetensors`` + ``language_embeddings.json``) when the mechanism is on."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    directory = Path(directory)
    with detached(model):
        model.save_pretrained(str(directory))
    module = find(model)
    for name in (TENSORS_FILE, META_FILE):
        (directory / name).unlink(missing_ok=True)  # a folder reused for a model without them
    if module is None:
        return
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(directory / TENSORS_FILE))
    meta = {
        "format": FORMAT,
        "config": asdict(module.cfg),
        "languages": module.languages,
        "slots": list(module.tables),
        "ulr_groups": module.ulr.groups if module.ulr is not None else [],
        "active": module.active,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def load_into(model: nn.Module, directory: Path) -> Optional[LanguageEmbeddings]:
    """Restore what :func:`save_pretrained` wrote next to the shared model; None if the folder has none."""
    from ..config import from_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(directory / TENSORS_FILE))
    except (OSError, ValueError) as exc:
        raise DataError(f"{directory}: unreadable language embeddings ({exc})") from None
    cfg = from_dict(LanguageEmbeddingConfig, meta["config"], "model.language_embeddings")
    weight = model.get_input_embeddings().weight
    ulr = None
    if meta.get("ulr_groups"):
        ulr = UniversalLexicalRepresentation(tensors["ulr.queries"], tensors["ulr.query_mask"], meta["ulr_groups"],
                                             tensors["ulr.keys"], tensors["ulr.values"], cfg.ulr.tau, cfg.ulr.learn_A)
    module = LanguageEmbeddings(cfg, meta["languages"], weight.shape[0], weight.shape[1], weight.dtype, ulr)
    for slot in meta["slots"]:
        if slot not in module.tables:
            module.tables[slot] = nn.Parameter(torch.zeros(weight.shape[0], weight.shape[1], dtype=weight.dtype))
    module.load_state_dict({k: v.to(weight.dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    module.active = meta.get("active")
    return attach(model, module.to(weight.device))


def family_languages(family: Any) -> list[str]:
    """Every language of a translation suite (train, dev, test), in that order: the index of ``lang_ids``."""
    t = family.task_cfg
    return list(dict.fromkeys([*t.train_languages, *t.dev_languages, *t.test_languages]))


def _align_languages(module: LanguageEmbeddings, languages: list[str]) -> LanguageEmbeddings:
    """The ``lang_ids`` index follows the family's language list (tables and ULR groups are keyed by
    name, so a folder saved with another suite's list still finds its tables); a language of the
    family without a table under ``never`` gets a zero one."""
    module.languages = list(dict.fromkeys([*languages, *module.languages]))
    for lang in languages:
        module.add_language(lang)
    return module


def load_for_family(family: Any, model: nn.Module, directory: Path) -> Optional[LanguageEmbeddings]:
    """:func:`load_into`, the language index aligned with the family's suite."""
    module = load_into(model, directory)
    return _align_languages(module, family_languages(family)) if module is not None else None


def build_for_family(family: Any, model: nn.Module) -> Optional[LanguageEmbeddings]:
    """:func:`build` with a translation family's config, languages, tokenizer and training pairs.

    A warm start (``model.pretrained``) from a folder that holds language embeddings continues
    from them (tables, ULR) instead of fresh ones; its policy and ULR switch must match the config.
    """
    cfg = family.model_cfg.language_embeddings
    if not cfg.enabled:
        return None
    pretrained = family.model_cfg.pretrained
    if pretrained and (Path(pretrained).expanduser() / META_FILE).is_file():
        module = load_for_family(family, model, Path(pretrained).expanduser())
        if module.cfg.reset != cfg.reset or (module.ulr is not None) != cfg.ulr.enabled:
            raise ConfigError(f"model.language_embeddings: the warm start {pretrained} has reset={module.cfg.reset}, ulr "
                              f"{'on' if module.ulr is not None else 'off'}; the config asks for reset={cfg.reset}, ulr "
                              f"{'on' if cfg.ulr.enabled else 'off'}")
        module.active = None
        if cfg.reset != "never":
            module.reset()  # the episode table may hold a fine-tuned language's embeddings
        return module
    pairs: list[Any] = []
    if cfg.ulr.enabled and cfg.ulr.queries != "file":
        train = family.languages("train")
        per_lang = max(1, cfg.ulr.max_pairs // len(train))  # every training language contributes
        pairs = [p for lang in train for p in family.pairs("train", lang)[:per_lang]]
    return build(model, cfg, family_languages(family), family.tokenizer, pairs, family.data_root)
