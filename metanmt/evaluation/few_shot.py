"""Few-shot evaluation: adapt to held-out episodes and score the query set after each step count.

    curve = adaptation_curve(run.inner_loop(steps=10), run.model, episodes, record=[0, 1, 5, 10])
    curve[10]["mse"]   # list of per-episode values
    summarize(curve)   # {steps: {metric: (mean, 95% t-interval half-width)}}
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..engine.inner import InnerLoop, Params, full_state
from ..tasks.base import Episode
from .statistics import t_interval


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student t interval (t(0.975, n-1) x s / sqrt(n); NaN for
    one value). :func:`~metanmt.evaluation.statistics.t_interval` also returns n."""
    mean, half, _ = t_interval(values)
    return mean, half


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
    held-out test episodes, report the family's metrics after each step count (mean ± 95% Student t interval, n)."""
    from ..engine.sampler import episode_rng

    steps = args.steps or [run.cfg.algorithm.steps_at_eval]
    n = args.episodes or 100
    episodes = (run.family.sample_episode(episode_rng(args.seed, 0, i, "test"), split="test") for i in range(n))
    summary = summarize(adaptation_curve(run.inner_loop(steps=max(steps), lr=args.lr), run.model, episodes, [0, *steps]))
    result = {str(k): {m: {"mean": v[0], "ci95": v[1]} for m, v in metrics.items()} for k, metrics in summary.items()}
    lines = [f"after {k} steps: " + ", ".join(f"{m} {v['mean']:.4f} ± {v['ci95']:.4f}" for m, v in ms.items()) for k, ms in result.items()]
    lines.append(f"mean ± 95% Student t interval over n={n} held-out episodes")
    return {"steps": result, "episodes": n}, "\n".join(lines)


#: the ``metanmt evaluate`` options it reads: the command refuses the others (they would do nothing)
evaluate_command.options = ("steps", "episodes", "lr", "seed")  # type: ignore[attr-defined]
