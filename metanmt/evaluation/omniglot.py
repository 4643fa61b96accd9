"""Omniglot evaluation: N-way K-shot accuracy on held-out episodes, and Lake et al.'s 20 official runs.

    run = load_run("runs/omni")
    evaluate_episodes(run, episodes=600)["accuracy"]            # {"mean": ..., "ci95": ...}
    evaluate_official_runs(run, "all_runs.zip")["official_runs_error_pct"]
    evaluate_official_runs(run, "all_runs.zip", bn_policy="running_reset")   # non-transductive
    select_eval_settings(run, steps=[1, 3, 5, 10], lrs=[0.1, 0.2, 0.4])["chosen"]

Batch-norm protocols (the model keeps no running buffers, so the same weights evaluate either way):

* ``batch`` -- transductive: every batch is normalized with its own statistics, so the 20 test
  images of a run are normalized together and one image's prediction depends on the others.
* ``running_reset`` -- non-transductive: statistics from the support set only (the run's 20
  training images, through the adapted weights), applied to each test image on its own.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine.inner import full_state
from ..engine.run import Run
from ..engine.sampler import episode_rng
from ..engine.trainer import build_family
from .few_shot import adaptation_curve, mean_ci95

BN_PROTOCOLS = {
    "batch": "transductive: batch-norm statistics of each batch (the 20 test images of a run are normalized together)",
    "running_reset": "non-transductive: batch-norm statistics from the support set only (the 20 training images of a "
    "run, through the adapted weights), applied to each test image alone",
}


def with_bn_policy(run: Run, policy: str | None) -> Run:
    """The same weights evaluated under another batch-norm policy (``None``: the run's own)."""
    if policy is None or policy == run.family.model_cfg.bn_policy:
        return run
    if policy not in BN_PROTOCOLS:
        raise ValueError(f"bn policy {policy!r}; allowed values: {', '.join(BN_PROTOCOLS)}")
    cfg = copy.deepcopy(run.cfg)
    cfg.model = {**cfg.model, "bn_policy": policy}
    family = build_family(cfg)
    model = family.build_model()
    model.load_state_dict(run.model.state_dict())  # no running buffers: the policy is not in the weights
    model.to(next(run.model.parameters()).device).eval()
    return Run(directory=run.directory, cfg=cfg, family=family, model=model, learned_lrs=run.learned_lrs)


def evaluate_episodes(
    run: Run, episodes: int = 600, steps: int | None = None, lr: float | None = None, seed: int = 1234, split: str = "test",
    bn_policy: str | None = None,
) -> dict[str, Any]:
    """Accuracy after the evaluation inner loop, mean ± 95% CI over ``episodes`` held-out tasks."""
    run = with_bn_policy(run, bn_policy)
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


def adapted_logits(
    run: Run, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int | None = None, lr: float | None = None
) -> Tensor:
    """Adapt on one support set with the evaluation inner loop; the query images' logits.

    The batch-norm protocol is the run's (``with_bn_policy`` picks another)."""
    family, model = run.family, run.model
    inner = run.inner_loop(steps=steps, lr=lr)
    episode = family.episode_from_arrays(support_x, support_y, query_x)
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        adapted = inner.adapt(params, episode.support, create_graph=False).params
    with torch.no_grad():
        return family.logits(model, full_state(model, adapted), episode.query)


def evaluate_official_runs(
    run: Run, runs_path: str | Path | None, steps: int | None = None, lr: float | None = None,
    bn_policy: str | None = None,
) -> dict[str, Any]:
    """Adapt on each run's 20 training images (one per class), classify its 20 test images.

    ``bn_policy`` evaluates the same weights under another batch-norm protocol (module docstring)."""
    run = with_bn_policy(run, bn_policy)

    def adapt_and_predict(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        return adapted_logits(run, support_x, support_y, query_x, steps, lr).argmax(dim=-1)

    result = run.family.score_official_runs(runs_path, adapt_and_predict)
    policy = run.family.model_cfg.bn_policy
    return {**result, "inner_steps": run.inner_loop(steps=steps).steps, "bn_policy": policy,
            "transductive": policy == "batch", "protocol": BN_PROTOCOLS[policy]}


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


#: the ``metanmt evaluate`` options it reads: the command refuses the others (they would do nothing)
evaluate_command.options = ("steps", "episodes", "lr", "seed", "omniglot_runs")  # type: ignore[attr-defined]


def select_eval_settings(
    run: Run, steps: list[int], lrs: list[float], episodes: int = 200, seed: int = 4321, split: str = "test",
    bn_policy: str | None = None,
) -> dict[str, Any]:
    """Score a grid of evaluation inner steps x rates on ``split`` episodes; the fixed rule picks the
    lowest error, ties -> fewer steps, then the smaller rate.

    Every grid cell sees the same episodes (drawn from ``seed``). Meant for background data only
    (never the runs it will then be scored on)."""
    run = with_bn_policy(run, bn_policy)
    grid: list[dict[str, float]] = []
    for lr in sorted(set(lrs)):
        inner = run.inner_loop(steps=max(steps), lr=lr)
        tasks = (run.family.sample_episode(episode_rng(seed, 0, i, split), split=split) for i in range(episodes))
        curve = adaptation_curve(inner, run.model, tasks, record=sorted(set(steps)))
        for k in sorted(set(steps)):
            acc = np.asarray(curve[k]["accuracy"], dtype=np.float64)
            grid.append({"inner_steps": k, "inner_lr": lr, "error_pct": float(100.0 * (1.0 - acc.mean()))})
    best = min(grid, key=lambda g: (g["error_pct"], g["inner_steps"], g["inner_lr"]))
    t = run.family.task_cfg
    return {
        "chosen": dict(best),
        "grid": grid,
        "rule": "lowest mean error; ties -> fewer steps, then the smaller rate",
        "split": split,
        "episodes": episodes,
        "seed": seed,
        "ways": t.ways,
        "shots": t.shots,
        "bn_policy": run.family.model_cfg.bn_policy,
    }
