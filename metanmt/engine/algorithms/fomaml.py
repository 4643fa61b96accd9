"""First-order MAML: the query-loss gradient at the adapted weights, applied to the initialization.

    algorithm: {name: fomaml, inner_steps: 3, inner_lr: 0.1, support_in_outer: true}

``support_in_outer`` adds the support loss at the initialization to the outer loss, so every
example of the episode feeds the outer step (a lever for MetaNMT, where data is the bottleneck).
"""

from __future__ import annotations

from ...tasks.base import Episode
from ..inner import InnerLoop, Params
from .base import Algorithm, TaskResult, query_gradient


class FOMAML(Algorithm):
    name = "fomaml"
    supports_meta_sgd = True
    supports_task_batching = True

    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        return query_gradient(self, inner, params, episode, learned_lrs, second_order=False)
