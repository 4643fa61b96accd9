"""Reptile (Nichol et al. 2018): adapt on all of the task's data, then move toward the adapted weights.

    algorithm: {name: reptile, inner_steps: 5, inner_lr: 0.001, inner_optimizer: adam}
    optim: {name: sgd, lr: 0.1}            # the outer step size epsilon

The contribution of a task is ``init - adapted``; averaged over the meta-batch and applied by
outer SGD with learning rate epsilon it gives ``init + epsilon * (mean(adapted) - init)``, the
Reptile update. With Adam as the outer optimizer it is the Adam variant of the Reptile paper.
"""

from __future__ import annotations

import torch

from ...tasks.base import Episode
from ..inner import InnerLoop, Params
from .base import Algorithm, TaskResult


class Reptile(Algorithm):
    name = "reptile"

    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        batch = inner.family.merge_batches(episode.support, episode.query)
        with torch.enable_grad():
            adapted = inner.adapt(params, batch, create_graph=False).params
        grads = {name: (p - adapted[name]).detach() for name, p in params.items()}
        with torch.no_grad():
            final_loss = float(inner.loss(adapted, batch))
        return TaskResult(grads=grads, loss=final_loss, metrics={"adapted_loss": final_loss})
