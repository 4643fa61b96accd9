"""What an algorithm is: a function from (initialization, one episode) to a gradient-like update."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ...config import AlgorithmConfig
from ...errors import ConfigError
from ...tasks.base import Episode
from ..inner import InnerLoop, Params


@dataclass
class TaskResult:
    """One task's contribution: ``grads`` has an entry per meta-tensor (parameters, learned rates)."""

    grads: dict[str, Tensor]
    loss: float  # the loss the algorithm optimizes for this task (query loss after adaptation for MAML)
    metrics: dict[str, float] = field(default_factory=dict)
    # With a task-batched inner loop (``InnerLoop(tasks=T)``) grads, loss and metrics are sums over T tasks.


class Algorithm(abc.ABC):
    """Base class; subclasses register under the ``metanmt.algorithms`` entry-point group."""

    name: ClassVar[str]
    uses_inner_loop: ClassVar[bool] = True
    supports_meta_sgd: ClassVar[bool] = False
    #: ``task_gradient`` also accepts stacked episodes with ``InnerLoop(tasks=T)`` and returns sums
    supports_task_batching: ClassVar[bool] = False

    def __init__(self, cfg: AlgorithmConfig):
        if cfg.meta_sgd and not self.supports_meta_sgd:
            raise ConfigError(f"algorithm.meta_sgd: not supported by {self.name}; use maml or fomaml")
        self.cfg = cfg

    @abc.abstractmethod
    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        """``params``: the meta-parameters (leaves that require grad); ``learned_lrs``: Meta-SGD rates or {}."""


def grads_of(loss: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """d loss / d tensor for each entry; zeros where the loss does not depend on a tensor."""
    names = [n for n, t in tensors.items() if t.requires_grad]
    values = torch.autograd.grad(loss, [tensors[n] for n in names], allow_unused=True)
    out = {n: torch.zeros_like(t) for n, t in tensors.items()}
    out.update({n: g.detach() for n, g in zip(names, values) if g is not None})
    return out


def query_gradient(
    algorithm: Algorithm, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params, second_order: bool
) -> TaskResult:
    """MAML and first-order MAML: adapt on the support set, differentiate the query loss.

    With ``second_order`` the inner gradients are part of the graph (exact MAML). Without it they
    are constants, so the gradient reaching the initialization is the query gradient at the adapted
    weights (first-order MAML) while learned inner rates still receive their (first-order) gradient.
    With a task-batched ``inner`` the episode holds stacked batches and every loss is a sum over
    tasks, so the same code returns the sum of the tasks' contributions.
    """
    cfg = algorithm.cfg
    step_losses: list[Tensor] = []

    def collect(_: int, adapted_k: Params) -> None:
        step_losses.append(inner.loss(adapted_k, episode.query))

    result = inner.adapt(
        params,
        episode.support,
        create_graph=second_order,
        want_initial_grads=cfg.support_in_outer,
        after_step=collect if cfg.multi_step_loss else None,
    )
    if cfg.multi_step_loss and step_losses:
        query_loss = torch.stack(step_losses).mean()  # MAML++: every step's query loss counts
    else:
        query_loss = inner.loss(result.params, episode.query)
    grads = grads_of(query_loss, {**params, **{f"inner_lr:{n}": t for n, t in learned_lrs.items()}})
    if cfg.support_in_outer and result.initial_grads is not None:
        for name, g in result.initial_grads.items():
            grads[name] = grads[name] + g
    metrics = {"query_loss": float(query_loss.detach())}
    if result.support_losses:
        metrics["support_loss"] = result.support_losses[0]
    return TaskResult(grads=grads, loss=float(query_loss.detach()), metrics=metrics)
