"""The fine-tuning recipe and the ``--adapt`` presets (no torch import: the CLI parser reads the defaults).

    recipe = FinetuneRecipe(adapt="emb+enc", lr=3e-4, epochs=20, max_steps=2000)
    recipe.updates_for(batches_per_epoch=25)      # 500: ceil(20 x 25), within [min_steps, max_steps]
    adapt_patterns("emb+enc")                     # ['@embeddings', '@encoder']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

from ..errors import ConfigError

#: ``--adapt`` presets, by module role (``@role``, :mod:`metanmt.tasks.roles`), so that they select
#: the same modules in every architecture (Marian's ``model.shared``/``model.encoder``, T5's
#: ``shared``/``encoder``). ``emb`` with tied embeddings is one tensor (the shared embedding, also
#: the output projection); ``@lm_head`` catches untied checkpoints. ``lang`` and ``fast`` name the
#: language-embeddings module, which only metanmt's own Marian models have.
ADAPT_PRESETS: dict[str, list[str]] = {
    "all": ["*"],
    # = TranslationFamily.EMBEDDINGS_AND_ENCODER (MetaNMT): source-side only, also on untied models
    "emb+enc": ["@embeddings", "@encoder"],
    "emb": ["@embeddings", "@lm_head", "model.encoder.language_embeddings.*"],
    # language embeddings (docs/language_embeddings.md): the language table only; and the official
    # MetaNMT inner loop ("fast"): encoder layers, language table, ULR's A, decoder (not the ULR values)
    "lang": ["model.encoder.language_embeddings.tables.*"],
    "fast": ["model.encoder.layers.*", "model.encoder.language_embeddings.tables.*",
             "model.encoder.language_embeddings.ulr.A", "model.decoder.*", "model.shared.*", "lm_head.*"],
}


def adapt_patterns(spec: str | list[str]) -> list[str]:
    """``all`` / ``emb+enc`` / ``emb`` or comma-separated fnmatch patterns -> a pattern list.

        adapt_patterns("emb+enc")                      # MetaNMT's embeddings + encoder
        adapt_patterns("model.encoder.layers.0.*,model.shared.*")
    """
    if isinstance(spec, list):
        return list(spec)
    if spec in ADAPT_PRESETS:
        return list(ADAPT_PRESETS[spec])
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if not patterns:
        raise ConfigError(f"--adapt {spec!r}: give all, emb+enc, emb, or fnmatch patterns over parameter names and @roles (@embeddings, @encoder, @decoder, @lm_head)")
    return patterns


@dataclass
class FinetuneRecipe:
    """Every setting that decides what a fine-tune computes (identical for every init in ``compare``).

    Defaults (docs/design.md, "Fine-tuning defaults"): Adam 3e-4 on batches of ~1,000 target
    tokens, gradient clipping at 1.0, dev BLEU of greedy decoding picks the checkpoint.
    """

    adapt: str = "all"  # all | emb+enc | emb | comma-separated fnmatch patterns
    lr: float = 3e-4
    max_tokens: int = 1000  # target (English) tokens per batch, </s> included
    epochs: float = 20.0  # updates = ceil(epochs * batches per epoch), then clamped:
    min_steps: int = 0
    max_steps: int = 2000
    grad_clip: Optional[float] = 1.0
    eval_every: int = 0  # updates between dev evaluations; 0 = ceil(updates / 10)
    patience: int = 3  # evaluations without improvement before stopping; 0 = never stop early
    dev_metric: Literal["bleu", "chrf", "loss"] = "bleu"
    dev_segments: int = 200  # first N dev pairs are scored
    dev_beam: int = 1  # greedy decoding on dev: cheap, and it orders checkpoints like beam search
    max_new_tokens: Optional[int] = None  # None: the run's task.max_new_tokens
    seed: int = 0  # batch order and dropout

    def __post_init__(self) -> None:
        adapt_patterns(self.adapt)
        for key in ("max_tokens", "max_steps", "dev_segments", "dev_beam", "max_new_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("min_steps", "eval_every", "patience"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must not be negative, got {getattr(self, key)}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip: expected a value >= 0 (0 or None = no clipping), got {self.grad_clip}")
        if not (self.lr > 0 and self.epochs > 0):
            raise ConfigError(f"lr and epochs must be positive, got lr={self.lr}, epochs={self.epochs}")
        if self.dev_metric not in ("bleu", "chrf", "loss"):
            raise ConfigError(f"dev_metric: {self.dev_metric!r} is not one of bleu, chrf, loss")

    def updates_for(self, batches_per_epoch: int) -> int:
        """The update-scaling rule (see the module docstring)."""
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * batches_per_epoch))))

    def eval_interval(self, updates: int) -> int:
        return self.eval_every or max(1, math.ceil(updates / 10))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
