"""MAML (Finn et al. 2017) and first-order MAML: adapt on the support set, differentiate the query loss.

    # configs/*.yaml
    algorithm: {name: maml, inner_steps: 1, inner_lr: 0.01, adapt: ["*"], meta_sgd: false}
    algorithm: {name: fomaml, inner_steps: 3, inner_lr: 0.1, support_in_outer: true}

One implementation, one flag: ``second_order``. ``maml`` (exact) keeps the inner gradients in the
graph, so the meta-gradient equals plain autograd through an explicitly unrolled inner loop
(tests/test_algorithms.py checks it against finite differences in float64). ``fomaml`` treats them
as constants, so the gradient reaching the initialization is the query gradient at the adapted
weights, while learned inner rates (Meta-SGD) still receive their first-order gradient.

Options: ``support_in_outer`` adds the support loss at the initialization to the outer loss, so every
example of the episode feeds the outer step (a lever for MetaNMT, where data is the bottleneck);
``multi_step_loss`` (MAML++) averages the query loss over every inner step. With a task-batched
``inner`` (``InnerLoop(tasks=T)``) the episode holds stacked batches and every loss is a sum over
tasks, so the same code returns the sum of the tasks' contributions.

Logged per task (``TaskResult.metrics``, on logging steps): ``support_loss`` (before the first inner
step), ``query_loss_before`` (at the initialization: one extra forward pass without a graph, only
when ``inner.log_metrics``), ``query_loss_after`` (after the last inner step; free, it is the outer
loss or, with ``multi_step_loss``, its last term).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ...tasks.base import Episode
from ..inner import InnerLoop, Params
from .base import Algorithm, TaskResult, grads_of, inner_loop_metrics


class MAML(Algorithm):
    name = "maml"
    #: differentiate through the inner gradients (exact MAML); False = first-order MAML
    second_order: ClassVar[bool] = True
    supports_meta_sgd = True
    supports_task_batching = True

    @property
    def double_backward(self) -> bool:  # type: ignore[override]
        # differentiating through the inner gradients needs a double backward; first-order MAML does not
        return self.second_order

    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        cfg = self.cfg
        step_losses: list[torch.Tensor] = []

        def collect(_: int, adapted_k: Params) -> None:
            step_losses.append(inner.loss(adapted_k, episode.query))

        result = inner.adapt(
            params,
            episode.support,
            create_graph=self.second_order,
            want_initial_grads=cfg.support_in_outer,
            after_step=collect if cfg.multi_step_loss else None,
        )
        if cfg.multi_step_loss and step_losses:
            query_loss = torch.stack(step_losses).mean()  # MAML++: every step's query loss counts
            after = step_losses[-1]
        else:
            query_loss = after = inner.loss(result.params, episode.query)
        grads = grads_of(query_loss, {**params, **{f"inner_lr:{n}": t for n, t in learned_lrs.items()}})
        if cfg.support_in_outer and result.initial_grads is not None:
            for name, g in result.initial_grads.items():
                grads[name] = grads[name] + g
        loss = query_loss.detach()
        metrics = {"query_loss": loss}
        if inner.log_metrics:  # after every gradient: the extra forward pass cannot change them
            metrics.update(inner_loop_metrics(inner, params, episode.query, result.support_losses, after))
        return TaskResult(grads=grads, loss=loss, metrics=metrics)


class FOMAML(MAML):
    """First-order MAML: the query-loss gradient at the adapted weights, applied to the initialization."""

    name = "fomaml"
    second_order = False
