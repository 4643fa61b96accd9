"""The MetaNMT comparison on converged initializations: lv fi tr ko x 0/1k/4k/16k/40k words x 3 seeds.

    OMP_NUM_THREADS=1 python bench/l10n_converged_compare.py --data-root ../shared/data/l10n \\
        [--runs ~/runs/frontier] [--jobs 2] [--stage rule|inits|compare]

Three stages in this order (``--stage rule`` or ``--stage inits`` runs one alone), each resumable (a
rerun does only what is missing, so the study may span sittings):

1. **rule**: the fine-tuning length, chosen on Romanian (``bench/l10n_finetune_recipe.py``, its
   results file) with the ``multi`` init (exported first, below): a fixed number of updates per
   budget (the test languages have no dev set to stop on). Tuned on the reference init only: a bias
   from that can only favour the reference, so a gap in a meta init's favour is conservative.

The frontier multi-task run itself (``RUNS/multi``) is trained or resumed to ``FINAL`` first.

2. **inits**, at equal compute (the same updates of the same episode sizes, so about the same pairs
   and tokens; compare counts each init's steps, pairs, tokens and seconds, warm starts included):

   - ``multi``: the frontier multi-task run (``configs/l10n_frontier.yaml``, ``RUNS/multi``, resumed
     past 2 hours of training) at update ``FINAL`` = 10,000, exported with its trainer state;
   - ``fomaml``: that run at ``WARM`` = 8,750 (7/8 of ``FINAL``, the split of the shipped meta recipe)
     plus 1,250 updates of ``configs/l10n_meta_frontier.yaml`` (first-order MAML, 3 Adam 3e-4 inner
     steps, support loss in the outer step) at the constant learning rate the multi-task schedule had
     reached at ``WARM`` (its inverse square root: 5e-4 x sqrt(200 / 8,751) = 7.56e-5);
   - ``metanmt``: the same with MetaNMT's mechanism (language tables reset every episode, the ULR,
     the official inner loop), the recipe the dev-language measurement chose
     (``bench/l10n_frontier_recipes.py``, ``frontier_metanmt``);
   - ``scratch``: a randomly initialized model of the same architecture (compare's own row).

3. **compare**: ``bench/l10n_compare.py`` (``metanmt compare``) with the rule, all parameters, Adam
   3e-4, ~1,000-token batches, greedy decoding of the 500 test segments, 3 fine-tuning seeds (3 for
   scratch), the adaptation curve (0, 10, 30, 100 updates) on seed 0, paired tests against ``multi``
   (Holm over the report's cells), ``--jobs`` processes of one thread. The budgets run in phases:
   0/1k/4k for every init, language and seed first, then 16k, then 40k (into the same report folder,
   so each phase reuses the cells before it). The report is written under ``RUNS/converged/compare``
   while cells finish; once every cell is done it is copied (cells included, so ``metanmt compare
   --report-only`` recomputes it) to ``bench/results/l10n_compare``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from l10n_frontier import RULE, exported, flags_of, train_frontier  # noqa: E402 (bench/ is not a package)
FINAL, WARM = 10_000, 8_750
META = {"fomaml": "frontier_fomaml", "metanmt": "frontier_metanmt"}  # init name -> recipe of l10n_frontier_recipes
REPORT = ROOT / "bench" / "results" / "l10n_compare"
LANGS = ["lv", "fi", "tr", "ko"]
# the budgets in phases, the small ones (where meta-learning should show) first: 16k and 40k cost
# most of the fine-tuning, so a report of the first phase comes sittings before the whole one
PHASES = [["0", "1k", "4k"], ["0", "1k", "4k", "16k"], ["0", "1k", "4k", "16k", "40k"]]


def lr_at(run: Path, step: int) -> float:
    """The learning rate the run's inverse_sqrt schedule used for the update after ``step``."""
    from metanmt.engine.checkpoint import load_run_config

    optim = load_run_config(run).optim
    if optim.schedule != "inverse_sqrt":
        raise SystemExit(f"{run}: expected an inverse_sqrt schedule, found {optim.schedule}")
    return optim.lr * math.sqrt(max(1, optim.warmup_steps) / (step + 1))


def meta_inits(runs: Path, data_root: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Train the meta inits (``only`` these) from the warm start at WARM, for the updates left to FINAL."""
    from l10n_frontier_recipes import train

    extra = (f"optim.lr={lr_at(runs / 'multi', WARM):.4e}", f"train.steps={FINAL - WARM}", "train.save_every=250")
    return {name: train(recipe, runs / "converged" / name, data_root, exported(runs, WARM), extra)[0]
            for name, recipe in META.items() if not only or name in only}


def train_multi(runs: Path, data_root: Path) -> list[str] | None:
    """The frontier multi-task run (``RUNS/multi``) to ``FINAL`` updates, trained or resumed; the
    command run, None when it is there."""
    return train_frontier(runs / "multi", data_root, FINAL)


def rule_flags(multi: Path) -> list[str]:
    """compare's recipe flags from the rule chosen on Romanian (a fixed length, no early stopping)."""
    if not RULE.is_file():
        raise SystemExit(f"{RULE} is missing: run --stage rule first")
    info = json.loads(RULE.read_text(encoding="utf-8"))
    measured = {r["budget"] for r in info["runs"] if r["path"] == str(multi.resolve())}
    if not {"1k", "4k", "16k", "40k"} <= measured:
        raise SystemExit(f"{RULE}: the rule has not been measured on {multi} at every budget; run --stage rule")
    return flags_of(info["choice"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--runs", type=Path, default=Path.home() / "runs" / "frontier", help="run folders (outside the checkout)")
    p.add_argument("--stage", choices=["rule", "inits", "compare"], default="compare",
                   help="rule or inits: that stage only; compare (default): all three in order")
    p.add_argument("--jobs", type=int, default=2, help="compare: processes of one thread (default %(default)s)")
    p.add_argument("--langs", nargs="+", default=LANGS)
    p.add_argument("--only", nargs="+", choices=list(META), help="inits stage: train only these meta inits "
                   "(two processes can then train one each)")
    args = p.parse_args()
    data_root, runs = args.data_root.resolve(), args.runs.expanduser().resolve()

    train_multi(runs, data_root)
    multi = exported(runs, FINAL)
    rule = [sys.executable, str(ROOT / "bench" / "l10n_finetune_recipe.py"), "--init", f"multi={multi}",
            "--data-root", str(data_root), "--out", str(RULE)]
    if args.stage != "inits":
        subprocess.run(rule, check=True, cwd=ROOT)  # resumable: measured budgets are kept
    if args.stage == "rule":
        return 0
    folders = {"multi": multi, **meta_inits(runs, data_root, args.only)}
    if args.stage == "inits":
        return 0
    if args.only:
        p.error("--only trains some meta inits; the comparison needs them all")
    out = runs / "converged" / "compare"
    for budgets in PHASES:  # the same report folder: each phase reuses the cells of the one before
        command = [sys.executable, str(ROOT / "bench" / "l10n_compare.py"),
                   *[x for name, folder in folders.items() for x in ("--init", f"{name}={folder}")],
                   "--data-root", str(data_root), "--langs", *args.langs, "--budgets", *budgets, "--seeds", "3",
                   "--scratch-seeds", "3", "--beam", "1", "--curve", "0", "10", "30", "100", "--curve-seeds", "1",
                   "--adapt", "all", "--lr", "3e-4", "--max-tokens", "1000", *rule_flags(folders["multi"]),
                   "--jobs", str(args.jobs), "--runs", str(runs / "converged"), "--out", str(out)]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    if args.langs == LANGS:
        shutil.rmtree(REPORT, ignore_errors=True)
        shutil.copytree(out, REPORT, ignore=shutil.ignore_patterns("work", "*.lock"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
