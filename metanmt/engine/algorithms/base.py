"""What an algorithm is: a function from (initialization, one episode) to a gradient-like update."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from ...config import AlgorithmConfig
from ...errors import ConfigError
from ...tasks.base import Episode
from ..inner import InnerLoop, Params, metric_forward

#: the per-task metrics the trainer averages over a meta-batch and logs (history.jsonl, trackers);
#: ``inner_gain`` = ``query_loss_before - query_loss_after`` is derived from two of them
LOGGED_METRICS = ("support_loss", "query_loss_before", "query_loss_after")


@dataclass
class TaskResult:
    """One task's contribution: ``grads`` has an entry per meta-tensor (parameters, learned rates).

    ``loss`` is the loss the algorithm optimizes for this task (the query loss after adaptation for
    MAML), a detached tensor or a float; ``None`` where computing it would cost an extra forward pass
    and ``inner.log_metrics`` is off (Reptile). ``metrics`` values are detached tensors or floats; the
    trainer logs the keys in ``LOGGED_METRICS``. With a task-batched inner loop (``InnerLoop(tasks=T)``)
    grads, loss and metrics are sums over the T tasks.
    """

    grads: dict[str, Tensor]
    loss: Optional[Union[Tensor, float]]
    metrics: dict[str, Union[Tensor, float]] = field(default_factory=dict)


class Algorithm(abc.ABC):
    """Base class; subclasses register under the ``metanmt.algorithms`` entry-point group."""

    name: ClassVar[str]
    uses_inner_loop: ClassVar[bool] = True
    #: differentiates through inner-loop gradients (the family then builds a model with a double backward)
    double_backward: ClassVar[bool] = False
    supports_meta_sgd: ClassVar[bool] = False
    #: ``task_gradient`` also accepts stacked episodes with ``InnerLoop(tasks=T)`` and returns sums
    supports_task_batching: ClassVar[bool] = False

    def __init__(self, cfg: AlgorithmConfig):
        if cfg.meta_sgd and not self.supports_meta_sgd:
            raise ConfigError(f"algorithm.meta_sgd: not supported by {self.name}; use maml or fomaml")
        if cfg.meta_sgd_lr is not None and not cfg.meta_sgd:
            raise ConfigError(f"algorithm.meta_sgd_lr: set to {cfg.meta_sgd_lr} but algorithm.meta_sgd is false (no rates to learn)")
        self.cfg = cfg

    @abc.abstractmethod
    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        """``params``: the meta-parameters (leaves that require grad); ``learned_lrs``: Meta-SGD rates or {}.

        ``inner.log_metrics`` says whether this is a logging step: metrics that cost extra forward
        passes are computed only then (with :func:`metric_forward`, which leaves gradients unchanged).
        """


def grads_of(loss: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """d loss / d tensor for each entry; zeros where the loss does not depend on a tensor."""
    names = [n for n, t in tensors.items() if t.requires_grad]
    values = torch.autograd.grad(loss, [tensors[n] for n in names], allow_unused=True)
    found = {n: g for n, g in zip(names, values) if g is not None}
    # zeros only for the tensors the loss does not reach (usually none): no zero-filled dict per task
    return {n: found[n] if n in found else torch.zeros_like(t) for n, t in tensors.items()}


def inner_loop_metrics(inner: InnerLoop, params: Params, query: object, support_losses: list[Tensor],
                       query_loss_after: Tensor) -> dict[str, Tensor]:
    """The inner loop's gain on one task: support loss at the initialization, query loss before and
    after adaptation (``LOGGED_METRICS``). The query loss before adaptation is the one extra forward
    pass (no graph); call this only when ``inner.log_metrics`` is on."""
    metrics = {"query_loss_before": metric_forward(inner, params, query), "query_loss_after": query_loss_after.detach()}
    if support_losses:
        metrics["support_loss"] = support_losses[0]
    return metrics
