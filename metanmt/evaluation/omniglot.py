"""Omniglot evaluation: N-way K-shot accuracy on held-out episodes, and Lake et al.'s 20 official runs.

    run = load_run("runs/omni")
    evaluate_episodes(run, episodes=600)["accuracy"]            # {"mean": ..., "ci95": ...}
    evaluate_official_runs(run, "all_runs.zip")["official_runs_error_pct"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..engine.inner import full_state
from ..engine.run import Run
from ..engine.sampler import episode_rng
from .few_shot import adaptation_curve, mean_ci95


def evaluate_episodes(
    run: Run, episodes: int = 600, steps: int | None = None, lr: float | None = None, seed: int = 1234, split: str = "test"
) -> dict[str, Any]:
    """Accuracy after the evaluation inner loop, mean ± 95% CI over ``episodes`` held-out tasks."""
    inner = run.inner_loop(steps=steps, lr=lr)
    tasks = (run.family.sample_episode(episode_rng(seed, 0, i, split), split=split) for i in range(episodes))
    curve = adaptation_curve(inner, run.model, tasks, record=[inner.steps])
    mean, half = mean_ci95(curve[inner.steps]["accuracy"])
    t = run.family.task_cfg
    return {
        "accuracy": {"mean": mean, "ci95": half},
        "ways": t.ways,
        "shots": t.shots,
        "episodes": episodes,
        "inner_steps": inner.steps,
        "split": split,
        "bn_policy": run.family.model_cfg.bn_policy,
    }


def evaluate_official_runs(run: Run, runs_path: str | Path | None, steps: int | None = None, lr: float | None = None) -> dict[str, Any]:
    """Adapt on each run's 20 training images (one per class), classify its 20 test images."""
    family, model = run.family, run.model
    inner = run.inner_loop(steps=steps, lr=lr)

    def adapt_and_predict(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        episode = family.episode_from_arrays(support_x, support_y, query_x)
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
        with torch.enable_grad():
            adapted = inner.adapt(params, episode.support, create_graph=False).params
        return family.predict(model, full_state(model, adapted), episode.query)

    result = family.score_official_runs(runs_path, adapt_and_predict)
    return {**result, "inner_steps": inner.steps, "bn_policy": family.model_cfg.bn_policy}


def evaluate_command(run: Run, args: Any) -> tuple[dict, str]:
    """``metanmt evaluate`` of an Omniglot run: N-way K-shot accuracy (``--episodes``) and/or Lake et
    al.'s official runs (``--omniglot-runs``)."""
    steps = max(args.steps) if args.steps else None
    result: dict[str, Any] = {}
    lines = []
    if args.omniglot_runs is not None:
        runs = evaluate_official_runs(run, args.omniglot_runs, steps=steps, lr=args.lr)
        result.update(runs)
        per_run = " ".join(f"{e:.0f}" for e in runs["per_run_error_pct"])
        lines.append(f"official 20-way 1-shot runs: error {runs['official_runs_error_pct']:.2f}% (per run: {per_run})")
    if args.episodes or args.omniglot_runs is None:
        acc = evaluate_episodes(run, episodes=args.episodes or 600, steps=steps, lr=args.lr, seed=args.seed)
        result.update(acc)
        lines.append(
            f"{acc['ways']}-way {acc['shots']}-shot accuracy: {100 * acc['accuracy']['mean']:.2f}% "
            f"± {100 * acc['accuracy']['ci95']:.2f} (95% Student t interval, n={acc['episodes']} episodes, {acc['inner_steps']} steps, "
            f"batch norm: {acc['bn_policy']})"
        )
    return result, "\n".join(lines)
