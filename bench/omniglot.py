"""Meta-train on Omniglot background small1 only; score Lake et al.'s 20 official one-shot runs.

    OMP_NUM_THREADS=1 python bench/omniglot.py --eval-every 1000 --select-eval     # configs/omniglot_small1_maml.yaml
    python bench/omniglot.py --steps 6000 --algorithm fomaml --set algorithm.inner_steps=3
    python bench/omniglot.py --config configs/omniglot_small1_maml5.yaml --run-dir ~/runs/omni-maml5   # a lever
    python bench/omniglot.py --eval-only                                            # re-score the run

Trains (resumably: the run directory, ``~/runs/bench-omniglot`` by default, outside the checkout,
keeps checkpoints, and a rerun continues from the latest one) on ``images_background_small1`` only
-- the minimal split of Lake et al. 2015: 5 alphabets, 136 characters, x4 with 90-degree rotations
as extra classes -- with a 20-way 1-shot training task so the model's head has the 20 outputs the
official runs need. Then:

* **error curve** (``--eval-every N``): training runs in chunks of N meta-steps; after each chunk
  (and at the end) the official runs are scored with the config's evaluation inner loop (fixed
  before training) and ``[meta_step, error_pct]`` is appended to ``error_curve.json`` in the run
  directory, which a rerun keeps and continues; it is copied to the results file and drawn as a
  PNG. The curve is a report, not a selection: the reported number is always the LAST checkpoint's.
* **evaluation settings** (``--select-eval``): the evaluation inner steps and rate are chosen on
  background data only -- 20-way 1-shot episodes of the small2-only alphabets (or of held-out small1
  characters with ``--select-split val`` when the config sets ``task.val_characters``), never the
  runs -- by a fixed rule: score the ``--select-steps`` x ``--select-lrs`` grid on the same
  ``--select-episodes`` episodes, lowest error wins, ties -> fewer steps, then the smaller rate
  (:func:`metanmt.evaluation.omniglot.select_eval_settings`). Without it the config's
  ``algorithm.eval_inner_steps`` / ``eval_inner_lr`` are used. The choice is recorded.
* **official runs** (``all_runs.zip``: 20 within-alphabet 20-way 1-shot runs from the evaluation
  alphabets): adapt on each run's 20 training images, classify its 20 test images; error % per run
  and overall, under two batch-norm protocols with the same weights and settings:
  ``official_runs_error_pct`` under the training policy (``batch``: transductive, the 20 test images
  of a run are normalized together -- the MAML convention and the setting of published MAML
  numbers) and ``non_transductive_error_pct`` (statistics from the 20 training images only, each
  test image classified alone; :func:`metanmt.evaluation.omniglot.with_bn_policy`).
* **small2 5-way 1-shot** on the held-out alphabets of ``images_background_small2`` that small1
  lacks (Japanese (katakana), Sanskrit, Tagalog; Greek and Latin are in both and are dropped), for
  the SAME model: accuracy mean +- 95% CI over ``--episodes`` episodes.
  *How a 20-way model answers 5-way*: the 5-way model is the 20-way one with its head cut to the
  first 5 rows (``head.weight[:5]``, ``head.bias[:5]``), i.e. the episode's labels 0..4 on the
  20-way head with the softmax/argmax over those 5 outputs only. Training draws a fresh random
  label order every episode, so the 20 rows of the initialization are exchangeable and any 5 of
  them are a fair 5-way initialization; no head is trained for 5-way and no small2 data is used
  before this evaluation (except by ``--select-eval`` on its default split, which then says so in
  the results file). The evaluation inner loop is the same as for the official runs.

Levers (configs and options; see bench/README.md): ``configs/omniglot_small1_maml5.yaml`` (5 inner
steps at training, alpha=0.1, meta-batch 16: the MAML paper's 20-way setting),
``configs/omniglot_small1_fomaml.yaml`` (first order at a larger meta-batch for about the same time
per step), ``--set task.shift=2`` (random translation by up to +-2 px of every training image).

Writes bench/results/omniglot.json::

    {"official_runs_error_pct": e, "per_run_error_pct": [...20], "non_transductive_error_pct": e2,
     "error_curve": [[meta_step, error_pct], ...], "train_split": "background_small1",
     "algorithm": "...", "meta_steps": n, "seconds": t, "small2_5w1s_acc": {"mean": m, "ci95": c},
     ... extra keys: config, overrides, protocols, evaluation settings and how they were chosen ...}

``seconds`` is the meta-training time (accumulated over resumes, as the trainer's checkpoints
record it); evaluation time is reported separately.

First recorded result (configs/omniglot_small1_maml.yaml as shipped: second-order MAML, 1 inner
step lr 0.4, meta-batch 4, Adam 1e-3, 10,000 meta-steps, ~45 min on one thread of a shared 2-core
CPU, trained in resumed stages): 27.5% error on the official runs (transductive), i.e. NOT under
the 24% target (deep ConvNet on small1, Lake et al. 2015); error by meta-step 38.25 (1.2k), 33.25
(2.4k), 30.0 (3.6k), 28.75 (4.8k), 27.5 (10k) and still falling slowly. small2 5-way 1-shot:
90.2 +- 1.1% (600 episodes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from metanmt.config import load_config
from metanmt.engine.checkpoint import CONFIG_FILE, latest_checkpoint
from metanmt.engine.run import Run, load_run
from metanmt.engine.trainer import MetaTrainer, build_family
from metanmt.errors import UserError
from metanmt.evaluation.omniglot import evaluate_episodes, evaluate_official_runs, select_eval_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "omniglot_small1_maml.yaml"
DEFAULT_RUN_DIR = Path.home() / "runs" / "bench-omniglot"
TRAIN_SET = "background_small1"
CURVE_FILE = "error_curve.json"  # in the run directory: survives reruns (old checkpoints are pruned)
TARGET_PCT = 24.0  # deep ConvNet on small1 (Lake et al. 2015)


def fail(message: str) -> None:
    """Bad input: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def five_way_run(run: Run, ways: int = 5) -> Run:
    """The same run as a ``ways``-way learner: head cut to its first ``ways`` rows (see module doc)."""
    cfg = copy.deepcopy(run.cfg)
    cfg.task = {**cfg.task, "ways": ways}
    family = build_family(cfg)
    model = family.build_model()
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    trained_ways = state["head.weight"].shape[0]
    if trained_ways < ways:
        fail(f"the model has {trained_ways} outputs; cannot evaluate {ways}-way")
    state["head.weight"], state["head.bias"] = state["head.weight"][:ways], state["head.bias"][:ways]
    model.load_state_dict(state)
    model.eval()
    learned = None
    if run.learned_lrs is not None:  # Meta-SGD: cut the head's learned rates the same way
        learned = {k: (v[:ways] if k.startswith("head.") else v) for k, v in run.learned_lrs.items()}
    return Run(directory=run.directory, cfg=cfg, family=family, model=model, learned_lrs=learned)


def make_trainer(cfg, run_dir: Path) -> MetaTrainer:
    has_ckpt = latest_checkpoint(run_dir) is not None
    # a run directory without a checkpoint (killed before the first save) holds nothing to resume
    overwrite = not has_ckpt and (run_dir / CONFIG_FILE).exists()
    trainer = MetaTrainer(cfg, run_dir, resume=has_ckpt, overwrite=overwrite)
    if has_ckpt:
        print(f"resuming {run_dir} at meta-step {trainer.state.step}", flush=True)
    return trainer


def read_curve(run_dir: Path) -> list[list[float]]:
    path = run_dir / CURVE_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def write_curve(run_dir: Path, curve: list[list[float]]) -> None:
    tmp = run_dir / f".{CURVE_FILE}.tmp"
    tmp.write_text(json.dumps(curve) + "\n")
    tmp.replace(run_dir / CURVE_FILE)


def score_point(run_dir: Path, curve: list[list[float]], step: int) -> None:
    """Score the run directory's model (saved at ``step``) on the official runs; add it to the curve."""
    error = evaluate_official_runs(load_run(run_dir), None)["official_runs_error_pct"]
    curve[:] = [p for p in curve if p[0] != step] + [[step, error]]
    curve.sort(key=lambda p: p[0])
    write_curve(run_dir, curve)
    print(f"meta-step {step}: {error:.2f}% error on the official runs", flush=True)


def train_with_curve(cfg, run_dir: Path, eval_every: int) -> list[list[float]]:
    """Train to ``train.steps`` in chunks of ``eval_every`` meta-steps (0: one chunk), scoring the
    official runs after each chunk; the curve is kept in the run directory across reruns."""
    trainer = make_trainer(cfg, run_dir)
    stored = read_curve(run_dir)
    curve = [p for p in stored if p[0] <= trainer.state.step]  # points of checkpoints this run still builds on
    if curve != stored:
        write_curve(run_dir, curve)
    total = cfg.train.steps
    while trainer.state.step < total:
        until = total if eval_every <= 0 else min(total, (trainer.state.step // eval_every + 1) * eval_every)
        trainer.train(until=until)
        if eval_every > 0:
            score_point(run_dir, curve, trainer.state.step)
    if eval_every > 0 and trainer.state.step not in {p[0] for p in curve}:
        score_point(run_dir, curve, trainer.state.step)  # e.g. a finished run rescored with a curve
    return curve


def plot_curve(curve: list[list[float]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in curve], [p[1] for p in curve], "o-", label="official runs (transductive)")
    ax.axhline(TARGET_PCT, color="r", ls="--", lw=1, label=f"deep ConvNet, small1 ({TARGET_PCT:g}%)")
    ax.set_xlabel("meta-steps")
    ax.set_ylabel("error % (20 runs, 20-way 1-shot)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "omniglot")
    parser.add_argument("--steps", type=int, help="meta-steps (default: the config's train.steps)")
    parser.add_argument("--algorithm", help="maml | fomaml | reptile | multitask (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--episodes", type=int, default=600, help="small2 5-way 1-shot episodes")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="score the official runs every N meta-steps for the error curve (0: no curve)")
    parser.add_argument("--select-eval", action="store_true",
                        help="choose the evaluation inner steps and rate on background episodes (fixed rule)")
    parser.add_argument("--select-steps", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--select-lrs", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--select-episodes", type=int, default=200)
    parser.add_argument("--select-seed", type=int, default=4321)
    parser.add_argument("--select-split", choices=["test", "val"], default="test",
                        help="test: small2-only alphabets; val: held-out small1 characters (task.val_characters)")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "omniglot.json")
    parser.add_argument("--curve-png", type=Path, help="default: --out with _error_curve.png")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--eval-only", action="store_true", help="score the run directory as it is")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    run_dir = args.run_dir.expanduser()

    overrides = [f"data.root={args.data_root.resolve()}"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.algorithm:
        overrides.append(f"algorithm.name={args.algorithm}")
    overrides += args.set
    try:
        cfg = load_config(args.config, overrides)
    except UserError as exc:
        fail(str(exc))
    if cfg.family != "omniglot" or cfg.task.get("train_sets") != [TRAIN_SET] or cfg.task.get("split") != "minimal":
        fail(f"{args.config}: the benchmark trains on {TRAIN_SET} only (suite tasks/omniglot_small1.yaml)")
    if args.eval_every < 0:
        fail(f"--eval-every: must be >= 0, got {args.eval_every}")
    if cfg.task.get("ways") != 20:
        print(f"warning: training task is {cfg.task.get('ways')}-way; the official runs are 20-way", flush=True)
    if args.select_split == "val" and not cfg.task.get("val_characters"):
        fail("--select-split val: the config holds out no small1 characters (set task.val_characters)")

    t0 = time.perf_counter()
    if args.eval_only:
        curve = read_curve(run_dir)
    else:
        curve = train_with_curve(cfg, run_dir, args.eval_every)
    wall_train = time.perf_counter() - t0
    latest = latest_checkpoint(run_dir)
    if latest is None:
        fail(f"{run_dir}: no checkpoint to score (train first, without --eval-only)")
    trainer_state = json.loads((latest / "trainer_state.json").read_text())

    t1 = time.perf_counter()
    run = load_run(run_dir)
    a = run.cfg.algorithm
    selection = None
    steps, lr = a.steps_at_eval, a.lr_at_eval
    if args.select_eval:
        selection = select_eval_settings(run, args.select_steps, args.select_lrs, episodes=args.select_episodes,
                                         seed=args.select_seed, split=args.select_split)
        steps, lr = selection["chosen"]["inner_steps"], selection["chosen"]["inner_lr"]
        selection["alphabets"] = sorted({c.split(":")[-1].split("/")[0] for c in run.family.split_characters(args.select_split)})
        print(f"evaluation settings chosen on background {args.select_split} episodes: {steps} steps, lr {lr} "
              f"({selection['chosen']['error_pct']:.2f}% error there)", flush=True)
    official = evaluate_official_runs(run, None, steps=steps, lr=lr)  # task.official_runs (all_runs.zip) under data.root
    print(f"official runs: {official['official_runs_error_pct']:.2f}% error ({official['bn_policy']}; "
          f"{', '.join(f'{e:.0f}' for e in official['per_run_error_pct'])})", flush=True)
    non_trans = evaluate_official_runs(run, None, steps=steps, lr=lr, bn_policy="running_reset")
    print(f"official runs, non-transductive: {non_trans['official_runs_error_pct']:.2f}% error", flush=True)
    small2 = evaluate_episodes(five_way_run(run), episodes=args.episodes, seed=args.eval_seed, split="test", steps=steps, lr=lr)
    acc = small2["accuracy"]
    print(f"small2 5-way 1-shot: {100 * acc['mean']:.2f} +- {100 * acc['ci95']:.2f}% (95% Student t interval, "
          f"n={args.episodes} episodes)", flush=True)
    eval_seconds = time.perf_counter() - t1

    t = run.family.task_cfg
    meta_steps = int(trainer_state["step"])
    png = args.curve_png or args.out.with_name(args.out.stem + "_error_curve.png")
    if curve:
        plot_curve(curve, png, f"{a.name}, {run.cfg.train.meta_batch_size} tasks/step, {a.inner_steps} inner step(s); "
                               f"background small1")
    result = {
        "official_runs_error_pct": official["official_runs_error_pct"],
        "per_run_error_pct": official["per_run_error_pct"],
        "protocol": official["protocol"],
        "non_transductive_error_pct": non_trans["official_runs_error_pct"],
        "non_transductive_per_run_error_pct": non_trans["per_run_error_pct"],
        "non_transductive_protocol": non_trans["protocol"],
        "reported_checkpoint": f"the last checkpoint (meta-step {meta_steps}); the error curve is a report, "
                               "not used to pick a checkpoint",
        "error_curve": curve,
        "error_curve_eval": {"inner_steps": a.steps_at_eval, "inner_lr": a.lr_at_eval, "bn_policy": official["bn_policy"],
                             "note": "the config's evaluation settings (fixed before training), transductive"},
        "error_curve_png": str(png.relative_to(ROOT)) if curve and png.resolve().is_relative_to(ROOT) else (str(png) if curve else None),
        "train_split": TRAIN_SET,
        "algorithm": a.name,
        "meta_steps": meta_steps,
        "seconds": round(float(trainer_state["seconds"]), 1),
        "small2_5w1s_acc": {"mean": acc["mean"], "ci95": acc["ci95"], "n": args.episodes, "interval": "student_t"},
        "small2_5w1s_eval": {
            "episodes": args.episodes,
            "seed": args.eval_seed,
            "alphabets": sorted({c.split(":")[-1].split("/")[0] for c in run.family.split_characters("test")}),
            "five_way_from_twenty": "head cut to its first 5 rows (labels 0..4, softmax over those 5); no extra training",
            "bn_policy": small2["bn_policy"],
        },
        "eval_inner_steps": steps,
        "eval_inner_lr": lr,
        "eval_settings_from": (f"--select-eval on background {args.select_split} episodes (fixed rule, see eval_selection)"
                               if selection else "the config (fixed before scoring)"),
        "eval_selection": selection,
        "bn_policy": official["bn_policy"],
        "transductive": official["transductive"],
        "train_task": {"ways": t.ways, "shots": t.shots, "query": t.query, "rotations": t.rotations,
                       "image_size": t.image_size, "shift": t.shift},
        "config_file": str(args.config.resolve().relative_to(ROOT)) if args.config.resolve().is_relative_to(ROOT) else str(args.config),
        "overrides": [o for o in overrides if not o.startswith("data.root=")],
        "config": {k: v for k, v in run.cfg.to_dict().items() if k not in ("data", "suite")},
        "eval_seconds": round(eval_seconds, 1),
        "this_invocation_train_wall_seconds": round(wall_train, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}" + (f" and {png}" if curve else ""))


if __name__ == "__main__":
    main()
