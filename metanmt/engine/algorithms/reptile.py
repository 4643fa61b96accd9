"""Reptile (Nichol et al. 2018): adapt on all of the task's data, then move toward the adapted weights.

    algorithm: {name: reptile, inner_steps: 5, inner_lr: 0.001, inner_optimizer: adam}
    optim: {name: sgd, lr: 0.1}            # the outer step size epsilon

The contribution of a task is ``init - adapted``; averaged over the meta-batch and applied by
outer SGD with learning rate epsilon it gives ``init + epsilon * (mean(adapted) - init)``, the
Reptile update. With Adam as the outer optimizer it is the Adam variant of the Reptile paper.

Nothing beyond the inner steps is computed on a non-logging step: the contribution needs no loss
after adaptation, so ``TaskResult.loss`` is ``None`` there. On logging steps (``inner.log_metrics``)
three forward passes without a graph give ``loss`` (the adapted loss on all of the task's data, as
before), ``query_loss_before`` and ``query_loss_after`` (on the episode's query set, which is part of
Reptile's inner-loop data, so the gain is a training gain); ``support_loss`` is the loss before the
first inner step, on all of the task's data.
"""

from __future__ import annotations

import torch

from ...tasks.base import Episode
from ..inner import InnerLoop, Params, metric_forward
from .base import Algorithm, TaskResult, inner_loop_metrics


class Reptile(Algorithm):
    name = "reptile"

    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        batch = inner.family.merge_batches(episode.support, episode.query)
        with torch.enable_grad():
            result = inner.adapt(params, batch, create_graph=False)
        adapted = result.params
        grads = {name: (p - adapted[name]).detach() for name, p in params.items()}
        if not inner.log_metrics:
            return TaskResult(grads=grads, loss=None)
        final_loss = metric_forward(inner, adapted, batch)
        metrics = {"adapted_loss": final_loss,
                   **inner_loop_metrics(inner, params, episode.query, result.support_losses,
                                        metric_forward(inner, adapted, episode.query))}
        return TaskResult(grads=grads, loss=final_loss, metrics=metrics)
