"""Sinusoid evaluation: MSE after 1/5/10 steps at K = 5/10/20, and the MAML paper's toy figure.

    table = evaluate_sinusoid(load_run("runs/sine-maml"), shots=[5, 10, 20], steps=[1, 5, 10])
    table["mse"]["5"]["10"]    # mean MSE of 5-shot adaptation after 10 steps (["median"]: its median)
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.inner import full_state
from ..engine.run import Run
from ..engine.sampler import episode_rng
from .few_shot import adaptation_curve, mean_ci95


def evaluate_sinusoid(
    run: Run, shots: list[int], steps: list[int], episodes: int = 600, lr: float | None = None, seed: int = 1234
) -> dict[str, Any]:
    """The same held-out sines (drawn from ``seed``) for every run, so runs compare pairwise."""
    family = run.family
    inner = run.inner_loop(steps=max(steps), lr=lr)
    mse: dict[str, dict[str, float]] = {}
    ci95: dict[str, dict[str, float]] = {}
    # the median beside the mean: a few sines on which repeated SGD steps diverge can carry the mean
    median: dict[str, dict[str, float]] = {}
    for k in shots:
        tasks = (family.sample_episode(episode_rng(seed, 0, i, "test"), split="test", shots=k) for i in range(episodes))
        curve = adaptation_curve(inner, run.model, tasks, record=[0, *steps])
        mse[str(k)], ci95[str(k)], median[str(k)] = {}, {}, {}
        for s in [0, *steps]:
            mean, half = mean_ci95(curve[s]["mse"])
            mse[str(k)][str(s)], ci95[str(k)][str(s)] = mean, half
            median[str(k)][str(s)] = float(statistics.median(curve[s]["mse"]))
    lr_used = inner.lr if isinstance(inner.lr, float) else "learned"
    return {"mse": mse, "ci95": ci95, "median": median, "episodes": episodes, "inner_lr": lr_used}


def format_sinusoid(result: dict[str, Any]) -> str:
    steps = list(next(iter(result["mse"].values())))
    lines = ["| K-shot | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for k, row in result["mse"].items():
        cells = [f"{row[s]:.3f} ± {result['ci95'][k][s]:.3f}" for s in steps]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sinusoid(runs: list[Run], out: Path, shots: int = 10, steps: tuple[int, ...] = (0, 1, 10), seed: int = 7) -> Path:
    """One held-out sine; each run's fit after 0/1/10 gradient steps on its K points (one panel per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False, sharey=True)
    grid = torch.linspace(-5, 5, 200).unsqueeze(1)
    for ax, run in zip(axes[0], runs):
        family = run.family
        episode = family.sample_episode(np.random.default_rng(seed), split="test", shots=shots)
        amplitude, phase = (float(v.split("=")[1]) for v in episode.task.split(","))
        fits: dict[int, np.ndarray] = {}
        params = {n: p.detach().requires_grad_() for n, p in run.model.named_parameters()}

        def record(k: int, p: dict) -> None:
            if k in steps:
                with torch.no_grad():
                    fits[k] = torch.func.functional_call(run.model, full_state(run.model, p), (grid,)).squeeze(1).numpy()

        record(0, params)
        with torch.enable_grad():
            run.inner_loop(steps=max(steps)).adapt(params, episode.support, create_graph=False, after_step=lambda k, p: record(k + 1, p))
        ax.plot(grid.squeeze(1), amplitude * np.sin(grid.squeeze(1).numpy() - phase), "r", label="ground truth")
        for k in steps:
            ax.plot(grid.squeeze(1), fits[k], "--" if k == 0 else "-", label=f"after {k} step{'s' if k != 1 else ''}")
        x, y = episode.support
        ax.scatter(x.squeeze(1), y.squeeze(1), marker="^", color="k", zorder=5, label=f"{shots} points used")
        algorithm = run.cfg.algorithm.name + (" + Meta-SGD" if run.cfg.algorithm.meta_sgd else "")
        ax.set_title(f"{algorithm} ({run.directory.name}), K={shots}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def evaluate_command(run: Run, args: Any) -> tuple[dict, str]:
    """``metanmt evaluate`` of a sinusoid run: the MSE table (``--shots``, ``--steps``, ``--episodes``, ``--lr``,
    ``--seed`` of the held-out sines)."""
    result = evaluate_sinusoid(
        run, shots=args.shots or [5, 10, 20], steps=args.steps or [1, 5, 10], episodes=args.episodes or 600, lr=args.lr,
        seed=args.seed,
    )
    return result, format_sinusoid(result) + f"\nmean ± 95% Student t interval over n={result['episodes']} held-out sines"


#: the ``metanmt evaluate`` options it reads: the command refuses the others (they would do nothing)
evaluate_command.options = ("shots", "steps", "episodes", "lr", "seed")  # type: ignore[attr-defined]
