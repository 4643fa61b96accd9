"""Meta-train sinusoid recipes (MAML, pretraining, multi-step MAML, Meta-SGD); write the MSE table and figure.

    OMP_NUM_THREADS=1 python bench/sinusoid.py --recipe maml              # the paper: 70K meta-steps
    OMP_NUM_THREADS=1 python bench/sinusoid.py --recipe pretrain
    OMP_NUM_THREADS=1 python bench/sinusoid.py --recipe maml_multistep    # aimed at both 5-shot targets
    OMP_NUM_THREADS=1 python bench/sinusoid.py --recipe metasgd_multistep
    python bench/sinusoid.py                                              # every recipe, one after another

Recipes (each a shipped config; ``--steps`` / ``--set`` override all selected ones):

* ``maml`` -- ``configs/sinusoid_maml.yaml``: the paper's MAML (K=10, one inner step, alpha=0.01).
* ``pretrain`` -- ``configs/sinusoid_pretrain.yaml``: the paper's pretraining baseline.
* ``maml_multistep`` -- ``configs/sinusoid_maml_multistep.yaml``: 5 inner steps, multi-step loss, K=5.
* ``metasgd_multistep`` -- ``configs/sinusoid_metasgd_multistep.yaml``: Meta-SGD whose rates are
  learned over the 10 steps they are applied for (multi-step loss), K=5.

Every recipe trains in its own run directory ``RUNS/<recipe>`` (``--runs``, default
``~/runs/bench-sinusoid``, outside the checkout) and resumes from its latest checkpoint when
rerun; a finished run is only re-evaluated. Each recipe is evaluated on the same 600 held-out
sines: MSE after 1 / 5 / 10 SGD steps from K = 5 / 10 / 20 points (the run's evaluation rate, or
its learned rates), mean and the half-width of the 95% interval
(:func:`metanmt.evaluation.few_shot.mean_ci95`). The results file is updated per recipe, so
recipes can be run by separate commands (or ``--only``) into one file::

    {"maml": {"5": {"1": mse, "5": mse, "10": mse}, "10": {...}, "20": {...}},
     "maml_ci95": {...}, "maml_median": {...}, "pretrain": {...}, "pretrain_ci95": {...}, "maml_multistep": {...}, ...,
     "meta_steps": {"maml": 70000, ...}, "tables": {"maml": "| K-shot | ... markdown ..."},
     "config": {"maml": {"config": ..., "overrides": [...], "meta_steps": n, "train_seconds": t,
                         "interval": "...", ...}},
     "seconds": total train seconds of the recipes in the file}

``train_seconds`` is the trainer's own count, accumulated over resumes. When the ``maml`` and
``pretrain`` runs both exist, the paper's figure (fits after 0 / 1 / 10 steps on one held-out
sine, MAML vs pretraining) is redrawn with ``metanmt plot-sinusoid`` (``--figure``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from scipy import stats

from metanmt.cli import main as metanmt_main
from metanmt.config import load_config
from metanmt.engine.checkpoint import CONFIG_FILE, latest_checkpoint, latest_trainer_state, run_finished
from metanmt.engine.run import load_run
from metanmt.engine.trainer import MetaTrainer
from metanmt.errors import UserError
from metanmt.evaluation.few_shot import mean_ci95
from metanmt.evaluation.sinusoid import evaluate_sinusoid, format_sinusoid

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "maml": "configs/sinusoid_maml.yaml",
    "pretrain": "configs/sinusoid_pretrain.yaml",
    "maml_multistep": "configs/sinusoid_maml_multistep.yaml",
    "metasgd_multistep": "configs/sinusoid_metasgd_multistep.yaml",
}
SHOTS, STEPS = [5, 10, 20], [1, 5, 10]


def interval_name() -> str:
    """What :func:`metanmt.evaluation.few_shot.mean_ci95` (the project's one interval) computes,
    read off two values (s = 0.707, n = 2), so the results file names it correctly."""
    half = mean_ci95([0.0, 1.0])[1]
    t_half = float(stats.t.ppf(0.975, 1)) * math.sqrt(0.5) / math.sqrt(2)
    kind = "Student t" if math.isclose(half, t_half, rel_tol=1e-6) else "normal-approximation (1.96 s/sqrt(n))"
    return f"mean ± half-width of the 95% {kind} interval over the held-out sines"


def fail(message: str) -> None:
    """Bad input: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def train(cfg, run_dir: Path) -> None:
    has_ckpt = latest_checkpoint(run_dir) is not None
    # a run directory without a checkpoint (killed before the first save) holds nothing to resume
    overwrite = not has_ckpt and (run_dir / CONFIG_FILE).exists()
    trainer = MetaTrainer(cfg, run_dir, resume=has_ckpt, overwrite=overwrite)
    if has_ckpt:
        print(f"resuming {run_dir} at meta-step {trainer.state.step}", flush=True)
    trainer.train()


def read_results(path: Path) -> dict:
    """The results file so far (other recipes' entries are kept); empty if there is none."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        fail(f"{path}: line {exc.lineno}: not JSON ({exc.msg}); move it away or fix it")
    if not isinstance(data, dict):
        fail(f"{path}: expected a JSON object of sinusoid results")
    return data


def run_recipe(name: str, args: argparse.Namespace) -> dict:
    """Train (or resume) one recipe and evaluate it; its entries of the results file."""
    config = RECIPES[name]
    sets = [*([f"train.steps={args.steps}"] if args.steps is not None else []), "train.trackers=[]", *args.set]
    try:
        cfg = load_config(ROOT / config, sets)
    except UserError as exc:
        fail(f"recipe {name}: {exc}")
    run_dir = args.runs.expanduser() / name
    train(cfg, run_dir)
    state = latest_trainer_state(run_dir)
    t0 = time.perf_counter()
    table = evaluate_sinusoid(load_run(run_dir), shots=SHOTS, steps=STEPS, episodes=args.episodes)
    eval_seconds = time.perf_counter() - t0
    # the results file keeps the adapted columns (1/5/10 steps), not the initialization's (0)
    mse, ci95, median = ({k: {s: v for s, v in row.items() if s != "0"} for k, row in table[part].items()}
                         for part in ("mse", "ci95", "median"))
    print(f"{name}: {state['step']} meta-steps, {state['seconds']:.0f} s of training\n{format_sinusoid(table)}", flush=True)
    return {
        name: mse,
        f"{name}_ci95": ci95,
        f"{name}_median": median,
        "meta_steps": {name: int(state["step"])},
        "tables": {name: format_sinusoid({"mse": mse, "ci95": ci95})},
        "config": {
            name: {
                "config": config,
                "overrides": sets,
                "meta_steps": int(state["step"]),
                "train_seconds": round(float(state["seconds"]), 1),
                # tasks dropped from their meta-batch for a non-finite loss (train.on_nonfinite: skip)
                "skipped_tasks": int(state.get("skipped_tasks", 0)),
                "eval_seconds": round(eval_seconds, 1),
                "eval_inner_lr": table["inner_lr"],
                "eval_episodes": args.episodes,
                "interval": interval_name(),
                "train_shots": cfg.task.get("shots"),
                "inner_steps": cfg.algorithm.inner_steps,
                "multi_step_loss": cfg.algorithm.multi_step_loss,
                "meta_sgd": cfg.algorithm.meta_sgd,
                "meta_sgd_lr": cfg.algorithm.meta_sgd_lr,
                "inner_grad_clip": cfg.algorithm.inner_grad_clip,  # also applied by the evaluation's inner loop
                "outer_grad_clip": cfg.optim.grad_clip,  # the meta-gradient's largest norm
                "run_dir": str(args.runs / name),
            }
        },
    }


def write_results(path: Path, entries: dict) -> None:
    """Merge one recipe's entries into the file as it is NOW (another recipe may be running in a
    separate process and have written its own since this one started), atomically."""
    result = read_results(path)
    for key, value in entries.items():
        if key in ("meta_steps", "tables", "config"):
            result.setdefault(key, {}).update(value)
        else:
            result[key] = value
    result["seconds"] = round(sum(c.get("train_seconds", 0.0) for c in result.get("config", {}).values()), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # NaN (a diverged adaptation) is written as JSON's NaN literal, which json.loads reads back
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", choices=list(RECIPES),
                        help="recipe to train and evaluate (repeatable; default: all)")
    parser.add_argument("--only", choices=list(RECIPES), help="the same as one --recipe")
    parser.add_argument("--steps", type=int, help="meta-steps (default: the config's, the paper's 70K)")
    parser.add_argument("--episodes", type=int, default=600, help="held-out sines per K")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every selected recipe (repeatable)")
    parser.add_argument("--runs", type=Path, default=Path.home() / "runs" / "bench-sinusoid",
                        help="run directories: RUNS/<recipe> (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sinusoid.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "bench" / "results" / "sinusoid.png",
                        help="MAML vs pretraining figure (K=10), redrawn when both runs are finished; every recipe "
                             "at K=5 goes to its _5shot sibling once all are finished")
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        fail(f"--steps: must be at least 1, got {args.steps}")
    if args.episodes < 2:
        fail(f"--episodes: must be at least 2 (an interval needs two sines), got {args.episodes}")
    recipes = list(dict.fromkeys([*(args.recipe or []), *([args.only] if args.only else [])])) or list(RECIPES)
    read_results(args.out)  # checked before any training: a bad file fails fast

    for name in recipes:
        write_results(args.out, run_recipe(name, args))
        print(f"wrote {args.out} ({name})", flush=True)

    # each figure once its runs are finished (drawn by whichever command finishes last): the paper's
    # MAML vs pretraining at K=10, and every recipe at K=5, the shot count of both 5-shot targets
    figures = [(args.figure, ("maml", "pretrain"), 10),
               (args.figure.with_name(f"{args.figure.stem}_5shot{args.figure.suffix}"), tuple(RECIPES), 5)]
    for figure, names, shots in figures:
        runs = [args.runs.expanduser() / n for n in names]
        if not args.no_figure and all(run_finished(r) for r in runs):
            if metanmt_main(["plot-sinusoid", *map(str, runs), "--shots", str(shots), "--out", str(figure)]) != 0:
                fail("plot-sinusoid failed (see above)")


if __name__ == "__main__":
    main()
