"""The keys of ``model.language_embeddings`` (translation), with no torch import: the config schema
is read where torch is not needed. The mechanism itself is :mod:`metanmt.tasks.language_embeddings`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import ConfigError

RESET_POLICIES = ("never", "every_episode", "every_step")


@dataclass
class ULRConfig:
    """``model.language_embeddings.ulr``: the universal lexical representation."""

    enabled: bool = False
    # where queries q and keys K come from: the model's shared subword embeddings at build time
    # (meaningful when model.pretrained is a trained model), PPMI-SVD vectors of the training corpus,
    # or user-supplied word vectors (word2vec text files)
    queries: Literal["shared", "corpus", "file"] = "corpus"
    num_keys: int = 2000  # universal tokens: the most frequent English pieces (or words of key_vectors)
    tau: float = 0.05
    learn_A: bool = True  # A starts at the identity; false keeps it fixed (the official "fixed_A")
    dim: int = 64  # corpus vectors: dimension
    max_pairs: int = 20000  # corpus vectors: sentence pairs counted (the first N of the training languages)
    query_vectors: Optional[str] = None  # file: one file per language, "{lang}" in the name (word2vec text)
    key_vectors: Optional[str] = None  # file: the keys' (English) vectors; the first num_keys words are the keys


@dataclass
class LanguageEmbeddingConfig:
    """``model.language_embeddings`` of a translation run config."""

    enabled: bool = False
    reset: Literal["never", "every_episode", "every_step"] = "every_episode"
    ulr: ULRConfig = field(default_factory=ULRConfig)

    def check(self) -> None:
        u = self.ulr
        if u.tau <= 0:
            raise ConfigError(f"model.language_embeddings.ulr.tau: must be positive, got {u.tau}")
        for key in ("num_keys", "dim", "max_pairs"):
            if getattr(u, key) < 1:
                raise ConfigError(f"model.language_embeddings.ulr.{key}: must be at least 1, got {getattr(u, key)}")
        if u.enabled and u.queries == "file":
            if not u.query_vectors or "{lang}" not in u.query_vectors:
                raise ConfigError("model.language_embeddings.ulr.query_vectors: queries 'file' needs a word-vector file "
                                  "pattern with {lang} (e.g. 'vectors/{lang}.vec')")
            if not u.key_vectors:
                raise ConfigError("model.language_embeddings.ulr.key_vectors: queries 'file' needs the keys' word vectors "
                                  "(e.g. 'vectors/en.vec')")
