"""Few-shot evaluation: adapt to held-out episodes and score the query set after each step count.

    curve = adaptation_curve(run.inner_loop(steps=10), run.model, episodes, record=[0, 1, 5, 10])
    curve[10]["mse"]   # list of per-episode values
    summarize(curve)   # {steps: {metric: (mean, ci95)}}
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..engine.inner import InnerLoop, Params, full_state
from ..tasks.base import Episode


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    if arr.size == 1:
        return float(arr[0]), math.nan
    return float(arr.mean()), float(1.96 * arr.std(ddof=1) / math.sqrt(arr.size))


def adaptation_curve(
    inner: InnerLoop, model: nn.Module, episodes: Iterable[Episode], record: list[int]
) -> dict[int, dict[str, list[float]]]:
    """Per-episode query metrics after each number of inner steps in ``record`` (0 = no adaptation)."""
    family = inner.family
    wanted = sorted(set(record))
    curve: dict[int, dict[str, list[float]]] = {k: {} for k in wanted}
    device = next(model.parameters()).device

    def score(k: int, params: Params, query: Any) -> None:
        if k in curve:
            for name, value in family.metrics(model, full_state(model, params), query).items():
                curve[k].setdefault(name, []).append(value)

    for episode in episodes:
        support = family.to_device(episode.support, device)
        query = family.to_device(episode.query, device)
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
        score(0, params, query)
        with torch.enable_grad():
            inner.adapt(
                params, support, create_graph=False, steps=max(wanted), after_step=lambda k, p: score(k + 1, p, query)
            )
    return curve


def summarize(curve: dict[int, dict[str, list[float]]]) -> dict[int, dict[str, tuple[float, float]]]:
    return {k: {name: mean_ci95(values) for name, values in metrics.items()} for k, metrics in curve.items()}


def evaluate_command(run: Any, args: Any) -> tuple[dict, str]:
    """``metanmt evaluate`` for any family (the default :attr:`TaskFamily.evaluator`): adapt on
    held-out test episodes, report the family's metrics after each step count (mean ± 95% CI)."""
    from ..engine.sampler import episode_rng

    steps = args.steps or [run.cfg.algorithm.steps_at_eval]
    n = args.episodes or 100
    episodes = (run.family.sample_episode(episode_rng(args.seed, 0, i, "test"), split="test") for i in range(n))
    summary = summarize(adaptation_curve(run.inner_loop(steps=max(steps), lr=args.lr), run.model, episodes, [0, *steps]))
    result = {str(k): {m: {"mean": v[0], "ci95": v[1]} for m, v in metrics.items()} for k, metrics in summary.items()}
    lines = [f"after {k} steps: " + ", ".join(f"{m} {v['mean']:.4f} ± {v['ci95']:.4f}" for m, v in ms.items()) for k, ms in result.items()]
    return {"steps": result, "episodes": n}, "\n".join(lines)
