"""The multi-task baseline (MultiNMT): no inner loop, plain training on every example of the episode.

    algorithm: {name: multitask}

Run on the same engine, sampler and budget as the meta-learners, so a comparison differs only in
the algorithm: the same tasks and examples are seen per step, the same optimizer updates the model.
"""

from __future__ import annotations

from ...tasks.base import Episode
from ..inner import InnerLoop, Params
from .base import Algorithm, TaskResult, grads_of


class MultiTask(Algorithm):
    name = "multitask"
    uses_inner_loop = False

    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        batch = inner.family.merge_batches(episode.support, episode.query)
        loss = inner.loss(params, batch)
        return TaskResult(grads=grads_of(loss, params), loss=loss.detach())
