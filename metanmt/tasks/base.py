"""The contract between a task family and the engine.

The engine knows nothing about sines, images or sentences. A family turns a random generator into
an :class:`Episode` (a support batch to adapt on, a query batch to score on), builds its model, and
computes its loss *functionally* from a dict of named tensors, so that the engine can differentiate
through an inner loop::

    family = SinusoidFamily(task_cfg={"shots": 10}, model_cfg={}, data_root=None)
    model = family.build_model()
    episode = family.sample_episode(np.random.default_rng(0), split="train")
    params = dict(model.named_parameters())
    loss = family.loss(model, params, episode.support)
"""

from __future__ import annotations

import abc
import contextlib
import fnmatch
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from ..config import from_dict
from ..errors import ConfigError
from .roles import is_role, role_parameter_names


@dataclass
class Episode:
    """One task's data: ``task`` names it (a language, an alphabet, a sine's parameters)."""

    task: str
    support: Any
    query: Any


class TaskFamily(abc.ABC):
    """Base class of every task family; subclasses are registered under ``metanmt.task_families``."""

    name: ClassVar[str]
    TaskConfig: ClassVar[type]  # dataclass: the keys allowed in tasks/*.yaml and the config's `task:`
    ModelConfig: ClassVar[type]  # dataclass: the keys allowed in the config's `model:`
    default_adapt: ClassVar[list[str]] = ["*"]
    #: every episode's batches have the same shapes, so the tasks of a meta-batch can be stacked
    #: (:meth:`stack_batches`) and run under ``torch.vmap`` (``train.task_batching: vmap``)
    supports_vmap: ClassVar[bool] = False
    #: ``metanmt evaluate`` for this family's runs: ``"module:function"`` (imported when the command
    #: runs, so a family names code of a higher layer without importing it) or a function, called as
    #: ``evaluator(run, options) -> (result dict, text)`` with the command's parsed options. The
    #: default adapts on held-out episodes and reports the family's :meth:`metrics` after each step count.
    evaluator: ClassVar[Any] = "metanmt.evaluation.few_shot:evaluate_command"

    def __init__(self, task_cfg: dict[str, Any], model_cfg: dict[str, Any], data_root: str | Path | None = None):
        self.task_cfg = from_dict(self.TaskConfig, task_cfg, "task")
        self.model_cfg = from_dict(self.ModelConfig, model_cfg, "model")
        self.data_root = Path(data_root) if data_root else None

    # -- model ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialized model (seeded by the caller)."""

    @abc.abstractmethod
    def save_model(self, model: nn.Module, directory: Path) -> None:
        """Write a ``save_pretrained``-style folder (weights + config, and a tokenizer if any)."""

    @abc.abstractmethod
    def load_model(self, directory: Path) -> nn.Module:
        """Read back what :meth:`save_model` wrote."""

    # -- data ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def sample_episode(self, rng: np.random.Generator, split: str = "train") -> Episode:
        """Draw one task and its disjoint support and query sets; deterministic given ``rng``."""

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move a batch to ``device``; batches made of tensors, dicts and tuples work as they are."""
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        if isinstance(batch, dict):
            return {k: self.to_device(v, device) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v, device) for v in batch)
        return batch

    def merge_batches(self, first: Any, second: Any) -> Any:
        """One batch holding both (the multi-task baseline and Reptile train on support + query)."""
        if isinstance(first, torch.Tensor):
            return torch.cat([first, second])
        if isinstance(first, dict):
            return {k: self.merge_batches(first[k], second[k]) for k in first}
        if isinstance(first, (list, tuple)):
            return type(first)(self.merge_batches(a, b) for a, b in zip(first, second))
        raise TypeError(f"{type(self).__name__} must override merge_batches for {type(first).__name__}")

    def stack_batches(self, batches: list[Any]) -> Any:
        """Batches of equal shapes -> one batch with a leading task dimension."""
        first = batches[0]
        if isinstance(first, torch.Tensor):
            return torch.stack(batches)
        if isinstance(first, dict):
            return {k: self.stack_batches([b[k] for b in batches]) for k in first}
        if isinstance(first, (list, tuple)):
            return type(first)(self.stack_batches(list(parts)) for parts in zip(*batches))
        raise TypeError(f"{type(self).__name__} must override stack_batches for {type(first).__name__}")

    def token_count(self, batch: Any) -> int:
        """Tokens in a batch (translation: target tokens), counted in the run's history; 0 when the
        family has no such unit."""
        return 0

    def batch_size(self, batch: Any) -> int:
        """Number of examples (sentence pairs, images, points) in a batch, for accounting."""
        if isinstance(batch, torch.Tensor):
            return batch.shape[0]
        if isinstance(batch, dict):
            return self.batch_size(next(iter(batch.values())))
        if isinstance(batch, (list, tuple)):
            return self.batch_size(batch[0])
        raise TypeError(f"{type(self).__name__} must override batch_size")

    # -- loss ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: nn.Module, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """Mean loss of ``model`` with its tensors replaced by ``params`` (``torch.func.functional_call``)."""

    def metrics(self, model: nn.Module, params: dict[str, torch.Tensor], batch: Any) -> dict[str, float]:
        """Scores reported at evaluation; by default the loss."""
        with torch.no_grad():
            return {"loss": float(self.loss(model, params, batch))}

    def prepare(self) -> None:
        """Read (or check) the training data now, so that a missing file or a bad row is reported
        before a run directory is created; called once by the trainer. Default: nothing to do."""

    def prepare_validation(self) -> None:
        """Read (or check) the held-out data :meth:`validate` and :meth:`examples` use, so that a bad
        dev file is reported before the run directory is touched (called when ``train.eval_every``
        or ``train.show_examples`` is on). Default: nothing to do."""

    def use_double_backward(self, needed: bool) -> None:
        """Told before :meth:`build_model` / :meth:`load_model` whether the caller differentiates
        through gradients (second-order MAML), for a family whose fast kernels have no double
        backward (translation: sdpa attention). Default: nothing to choose."""

    def on_resume(self, directory: Path) -> None:
        """Adopt what a run directory holds besides the weights (a tokenizer) before ``build_model``."""

    # -- tensors reset every episode (translation's language embeddings) ------------------------
    def episode_only_names(self, model: nn.Module) -> set[str]:
        """Names of trainable tensors the inner loop adapts from the model's (reset) value every
        episode but the outer step never updates: left out of the meta-parameters. Default: none."""
        return set()

    def after_outer_step(self, model: nn.Module) -> None:
        """Called after every outer update (e.g. to zero tables reset every step). Default: nothing."""

    # -- validation during meta-training -------------------------------------------------------
    def validate(self, model: nn.Module, engine: Any) -> dict[str, float] | None:
        """Optional: metrics on held-out tasks every ``train.eval_every`` steps.

        Return a dict with a ``score`` key (higher is better) to keep the best checkpoint, or None.
        """
        return None

    def examples(self, model: nn.Module, n: int) -> list[dict[str, str]] | None:
        """Optional: ``n`` held-out examples a user can look at after training (``train.show_examples``),
        each a dict of labelled strings. Default: None (nothing to show)."""
        return None


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the meta-parameters: trainable tensors (tied weights counted once)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


#: what ``peft`` puts before the wrapped model's own parameter names
PEFT_PREFIX = "base_model.model."


def name_matches(name: str, patterns: list[str]) -> bool:
    """Whether a parameter name matches any fnmatch pattern; inside a ``peft`` model the name without
    peft's prefix counts too, so ``model.encoder.*`` means the same with and without adapters."""
    short = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p) for p in patterns)


def freeze_parameters(model: nn.Module, patterns: list[str], key: str = "model.freeze") -> list[str]:
    """``requires_grad=False`` for every parameter matching a pattern (see :func:`name_matches`):
    the engine meta-learns and adapts only trainable tensors and a fine-tune selects among them, so a
    frozen tensor keeps its value everywhere. Returns the frozen names; a pattern that matches no
    parameter is an error (a typo would otherwise freeze nothing)."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(name_matches(n, [pattern]) for n in names):
            preview = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"{key}: pattern {pattern!r} matches no parameter; names look like: {preview}")
    frozen = [n for n, p in model.named_parameters() if name_matches(n, patterns)]
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if patterns and not trainable_names(model):
        raise ConfigError(f"{key}: {patterns} freezes every parameter; nothing would be trained")
    return frozen


def select_names(model: nn.Module, patterns: list[str], key: str = "algorithm.adapt") -> list[str]:
    """Trainable parameter names matching any fnmatch pattern (:func:`name_matches`) or ``@role``
    (:mod:`.roles`), in model order: what an inner loop or a fine-tune adapts (frozen tensors such as
    sinusoidal positions, a ``model.freeze`` pattern's or a LoRA base's never match). ``key`` names
    the setting the patterns came from in the error."""
    names = trainable_names(model)
    roles = [p for p in patterns if is_role(p)]  # "@encoder" etc.: by module role (tasks/roles.py)
    by_role = role_parameter_names(model, roles, key) if roles else set()
    chosen = [n for n in names if n in by_role or name_matches(n, [p for p in patterns if not is_role(p)])]
    if not chosen:
        preview = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(f"{key}: patterns {patterns} match no trainable parameter; names look like: {preview}")
    return chosen


def temperature_weights(sizes: Sequence[float], temperature: float) -> np.ndarray:
    """Task probabilities proportional to ``size ** (1 / temperature)``.

    ``temperature=1`` samples in proportion to data size, larger values flatten toward uniform,
    ``float('inf')`` is uniform.
    """
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if np.any(sizes_arr <= 0):
        raise ValueError("task sizes must be positive")
    weights = np.ones_like(sizes_arr) if np.isinf(temperature) else sizes_arr ** (1.0 / temperature)
    return weights / weights.sum()


def load_hub_mixin_model(cls: Any, directory: str | Path) -> nn.Module:
    """``cls.from_pretrained(directory)`` for a ``PyTorchModelHubMixin`` model, without the line it
    prints to stdout (huggingface_hub prints "Loading weights from local directory", which would
    corrupt ``--json`` output)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return cls.from_pretrained(str(directory))
