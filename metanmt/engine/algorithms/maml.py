"""MAML (Finn et al. 2017), exact second order: differentiate the query loss through every inner step.

    # configs/*.yaml
    algorithm: {name: maml, inner_steps: 1, inner_lr: 0.01, adapt: ["*"], meta_sgd: false}

The meta-gradient equals plain autograd through an explicitly unrolled inner loop
(tests/test_algorithms.py checks it against finite differences in float64).
"""

from __future__ import annotations

from ...tasks.base import Episode
from ..inner import InnerLoop, Params
from .base import Algorithm, TaskResult, query_gradient


class MAML(Algorithm):
    name = "maml"
    supports_meta_sgd = True
    supports_task_batching = True

    def task_gradient(self, inner: InnerLoop, params: Params, episode: Episode, learned_lrs: Params) -> TaskResult:
        return query_gradient(self, inner, params, episode, learned_lrs, second_order=True)
