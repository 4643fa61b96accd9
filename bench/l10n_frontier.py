"""The multi-task baseline at the efficient frontier: what 20 minutes of training on 2 CPU cores give.

    OMP_NUM_THREADS=2 python bench/l10n_frontier.py --data-root ../shared/data/l10n [--runs ~/runs/frontier]

1. ``metanmt meta-train configs/l10n_frontier.yaml`` into ``RUNS/multi`` (resumable: a rerun
   continues it). The config's step count is what fits in 20 minutes on an idle 2-core machine
   (bench/results/l10n_throughput.json measures the step rate); no validation runs inside it.
2. The Finnish dev set for early stopping: the last 200 pairs of ``fi.pool`` that are not in
   ``fi.40k`` (so never in a fine-tuning budget, nor in the test set), written to ``RUNS/fi_dev.tsv.gz``.
3. ``metanmt compare`` of that init on Finnish 16k (``RUNS/compare``): all parameters, Adam 3e-4,
   ~1,000-token batches, dev NLL picks the checkpoint (patience 3), greedy decoding of the 500
   test segments; ``--seeds`` fine-tuning seeds, mean with the Student-t 95% interval for that n.

Writes ``bench/results/l10n_frontier.json``: the config, the training minutes and updates its run
folder records, English tokens/s of the training, the plain `transformers` loop's tokens/s from
the throughput benchmark, and Finnish 16k BLEU / chrF / test NLL. Targets: >= 6.2 BLEU,
>= 25.6 chrF, NLL <= 3.34 (the calibration pilot's 20-minute multi-task run).

``--fine-tune rule`` fine-tunes for the fixed length chosen on the dev language Romanian (the rule
recorded in ``bench/results/l10n_finetune_recipe.json``: 20 epochs, at most 1,000 updates, so 700 at
16k; a study chooses its own with ``finetune.length: chosen``) instead of stopping on Finnish dev NLL,
and keeps its scores beside the others (``fi16k_rule``, ``met_rule``); the model scored is the run's
checkpoint at the config's steps, also when the run has been resumed past them.

``--within-minutes 20`` instead scores the run's last checkpoint within 20 minutes of training (on
the machine that trained it: a faster CPU fits more of the config's updates in them; a run resumed
past the config's steps has them) and keeps it, with that CPU's name, under ``within_minutes``.

``--at-pairs 208000`` instead scores (the same way, into ``RUNS/compare_at_STEP``) the checkpoint of
``RUNS/multi`` whose pairs seen are closest to that count, e.g. the pilot's 208K pairs once the run
has been resumed past them, and keeps it under ``at_pairs`` in the results file: the quality per
sentence pair, apart from the machine's speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "l10n_frontier.yaml"
OUT = ROOT / "bench" / "results" / "l10n_frontier.json"
THROUGHPUT = ROOT / "bench" / "results" / "l10n_throughput.json"
RULE = ROOT / "bench" / "results" / "l10n_finetune_recipe.json"  # the fine-tuning length chosen on Romanian
TARGETS = {"bleu": 6.2, "chrf": 25.6, "nll": 3.34}


def metanmt(*args: str) -> list[str]:
    """Run the metanmt CLI in a subprocess; returns the command."""
    command = [sys.executable, "-m", "metanmt", *args]
    subprocess.run(command, check=True, cwd=ROOT)
    return command


def held_out_dev(data_root: Path, out: Path, lang: str = "fi", size: int = 200) -> Path:
    """The last ``size`` pairs of the language's pool that are in none of its budget files."""
    from metanmt.data.corpus import read_pairs, write_tsv

    pool = read_pairs(data_root / "finetune" / f"{lang}.pool.tsv.gz", lang=lang)
    used = set(read_pairs(data_root / "finetune" / f"{lang}.40k.tsv.gz", lang=lang))  # 40k holds every smaller budget
    dev = [p for p in pool if p not in used][-size:]
    if len(dev) < size:
        raise SystemExit(f"{lang}.pool has only {len(dev)} pairs outside {lang}.40k; need {size}")
    write_tsv(out, [(lang, p.src, p.en, f"{lang}.pool, held out") for p in dev])
    return out


def exported(runs: Path, step: int) -> Path:
    """``RUNS/multi``'s model at checkpoint ``step`` as ``RUNS/multi_at_STEP`` (with its trainer state, so
    compare counts its compute), exported once and reused."""
    from metanmt.engine.run import export_checkpoint

    dest = runs / f"multi_at_{step}"
    if not (dest / "trainer_state.json").is_file():
        export_checkpoint(runs / "multi", step, dest)
    return dest


def rule_flags(rule: Path = RULE) -> list[str]:
    """compare's flags for the fine-tuning length chosen on Romanian (the ``choice`` of the recorded
    results file ``rule``): a fixed number of updates per budget, no early stopping."""
    if not rule.is_file():
        raise SystemExit(f"{rule} is missing: it records the fine-tuning length chosen on Romanian "
                         "(restore it from the repository)")
    choice = json.loads(rule.read_text(encoding="utf-8"))["choice"]
    return ["--epochs", str(choice["epochs"]), "--min-steps", str(choice["min_steps"]),
            "--max-steps", str(choice["max_steps"]), "--patience", "0"]


# how the fine-tune stops: "nll" = early stopping on dev NLL of held-out fi.pool pairs (patience 3);
# "rule" = the fixed length chosen on the dev language Romanian (rule_flags)
FINE_TUNE = {
    "nll": "all parameters, Adam 3e-4, ~1,000-token batches, dev NLL on 200 held-out fi.pool pairs (patience 3), "
           "greedy decoding of the 500 test segments",
    "rule": "all parameters, Adam 3e-4, ~1,000-token batches, the fixed length chosen on Romanian dev chrF "
            "(bench/results/l10n_finetune_recipe.json; no early stopping), greedy decoding of the 500 test segments",
}


def finnish_16k(init: Path, out: Path, data_root: Path, runs: Path, seeds: int, fine_tune: str = "nll") -> dict:
    """Fine-tune ``init`` on Finnish 16k (``seeds`` seeds; ``fine_tune``: see FINE_TUNE) and score the test
    set; mean, Student-t half-width (n = seeds) and the per-seed values of BLEU, chrF and test NLL, and
    the updates."""
    import math

    from metanmt.evaluation.statistics import t_interval

    if fine_tune == "rule":
        stop = rule_flags()
    else:
        stop = ["--dev", str(held_out_dev(data_root, runs / "fi_dev.tsv.gz")), "--dev-metric", "loss", "--patience", "3"]
    metanmt("compare", "--init", f"multi={init}", "--data-root", str(data_root), "--langs", "fi", "--budgets", "16k",
            "--seeds", str(seeds), "--no-scratch", "--beam", "1", "--curve", *stop, "--out", str(out))
    with open(out / "results.csv", encoding="utf-8") as f:
        cells = [r for r in csv.DictReader(f) if r["init"] == "multi" and r["budget"] == "16k"]
    fi16k = {}
    for metric in ("bleu", "chrf", "nll"):
        values = [float(r[metric]) for r in cells]
        mean, half, _ = t_interval(values)
        fi16k[metric] = round(mean, 4)
        fi16k[f"{metric}_ci95"] = None if math.isnan(half) else round(half, 4)  # Student t, n = n_seeds
        fi16k[f"{metric}_seeds"] = [round(v, 4) for v in values]
    fi16k["n_seeds"] = len(cells)
    fi16k["updates"] = [int(float(r["steps"])) for r in cells]
    return fi16k


def met(fi16k: dict) -> dict:
    return {"bleu": fi16k["bleu"] >= TARGETS["bleu"], "chrf": fi16k["chrf"] >= TARGETS["chrf"],
            "nll": fi16k["nll"] <= TARGETS["nll"]}


def suffix(fine_tune: str) -> str:
    """A protocol's suffix on its keys and report folders: "" (nll), "_rule" (``fi16k_rule``, ``met_rule``)."""
    return "" if fine_tune == "nll" else f"_{fine_tune}"


def checkpoint_states(run: Path) -> dict[int, dict]:
    """``trainer_state.json`` of every kept checkpoint of ``run``, by step."""
    from metanmt.engine import checkpoint as ckpt

    return {ckpt.checkpoint_step(c): json.loads((c / "trainer_state.json").read_text()) for c in ckpt.list_checkpoints(run)}


def score_checkpoint(key: str, step: int, state: dict, runs: Path, data_root: Path, args: argparse.Namespace,
                     judged: bool = False, **fields) -> None:
    """Checkpoint ``step`` of ``RUNS/multi`` (its trainer ``state``) on Finnish 16k (into
    ``RUNS/compare_at_STEP``), stored under ``key`` of the results file with ``fields`` and where the
    checkpoint stands; ``judged``: also its training tokens/s and whether it met the targets (which
    are about minutes of training). An entry of the same checkpoint keeps its other ``--fine-tune``
    protocols."""
    sfx = suffix(args.fine_tune)
    scores = finnish_16k(exported(runs, step), runs / f"compare_at_{step}{sfx}", data_root, runs, args.seeds,
                         args.fine_tune)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entry = result.get(key, {}) if result.get(key, {}).get("updates") == step else {}
    entry.update({**fields, "updates": step, "pairs_seen": state["examples_seen"], "tokens_seen": state["tokens_seen"],
                  "minutes": round(state["seconds"] / 60, 2), f"fi16k{sfx}": scores})
    if judged:
        entry.update({"tokens_per_s": round(state["tokens_seen"] / state["seconds"], 1), f"met{sfx}": met(scores)})
    result[key] = entry
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


def at_pairs(run: Path, runs: Path, data_root: Path, args: argparse.Namespace) -> None:
    """The run's checkpoint whose pairs seen are closest to ``--at-pairs`` (a rule fixed before any
    score: the pilot's 208K pairs), on Finnish 16k; stored under ``at_pairs`` in the results file
    (each ``--fine-tune`` protocol under its own key)."""
    states = checkpoint_states(run)
    step = min(states, key=lambda s: abs(states[s]["examples_seen"] - args.at_pairs))
    score_checkpoint("at_pairs", step, states[step], runs, data_root, args, asked_pairs=args.at_pairs)


def within_minutes(run: Path, runs: Path, data_root: Path, args: argparse.Namespace) -> None:
    """What ``--within-minutes`` of training buy on the machine that trained ``run``: its last checkpoint
    whose training seconds (the trainer's, startups and checkpoint writes excluded) fit in them (a rule
    fixed before any score), on Finnish 16k; stored under ``within_minutes`` with the CPU that trained it
    (``--cpu``, default this machine's), each ``--fine-tune`` protocol under its own key. The config's
    2,000 updates are the 20 minutes of a 2-core AMD EPYC; a faster CPU fits more updates in them."""
    from l10n_throughput import cpu

    states = checkpoint_states(run)
    fitting = [s for s in states if states[s]["seconds"] <= args.within_minutes * 60]
    if not fitting:
        raise SystemExit(f"{run}: no checkpoint within {args.within_minutes} minutes of training")
    step = max(fitting)
    score_checkpoint("within_minutes", step, states[step], runs, data_root, args, judged=True,
                     asked_minutes=args.within_minutes, cpu=args.cpu or cpu()["cpu"])


def train_frontier(run: Path, data_root: Path) -> list[str] | None:
    """``configs/l10n_frontier.yaml`` into ``run`` to the config's updates, trained or resumed where an
    earlier sitting left it. Returns the command run, None when the run is already there."""
    from metanmt.config import load_config
    from metanmt.engine.checkpoint import latest_trainer_state

    if latest_trainer_state(run).get("step", 0) >= load_config(CONFIG, []).train.steps:
        return None
    command = ["meta-train", str(CONFIG), "--set", f"data.root={data_root}", "--output-dir", str(run),
               *(["--resume"] if (run / "metanmt.yaml").is_file() else [])]
    print("+ metanmt", " ".join(command), flush=True)
    return metanmt(*command)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--runs", type=Path, default=Path.home() / "runs" / "frontier", help="run folders (outside the checkout)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (default %(default)s)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--at-pairs", type=int, help="instead: score the run's checkpoint closest to this many pairs seen "
                                                "(the run may have trained past the config's steps)")
    p.add_argument("--within-minutes", type=float, help="instead: score the run's last checkpoint within this many "
                                                        "minutes of training (a faster CPU fits more updates)")
    p.add_argument("--cpu", help="--within-minutes: the CPU that trained the run (default: this machine's)")
    p.add_argument("--fine-tune", choices=list(FINE_TUNE), default="nll",
                   help="nll: early stopping on Finnish held-out dev NLL (default); rule: the fixed length chosen on "
                        "Romanian. Each protocol's scores are kept under their own key")
    args = p.parse_args()
    data_root, runs = args.data_root.resolve(), args.runs.expanduser().resolve()
    run = runs / "multi"
    if args.at_pairs and args.within_minutes:
        p.error("give --at-pairs or --within-minutes, not both")
    if args.at_pairs:
        return at_pairs(run, runs, data_root, args)
    if args.within_minutes:
        return within_minutes(run, runs, data_root, args)

    from metanmt.config import load_config
    from metanmt.engine.checkpoint import latest_trainer_state

    steps = load_config(CONFIG, []).train.steps  # the 20 minutes: the config's updates
    train_frontier(run, data_root)
    state = latest_trainer_state(run)
    init = run
    if state["step"] != steps:  # resumed past the config's steps (a longer run): its checkpoint at them
        init = exported(runs, steps)
        state = json.loads((init / "trainer_state.json").read_text())
    sfx = suffix(args.fine_tune)
    scores = finnish_16k(init, runs / f"compare{sfx}", data_root, runs, args.seeds, args.fine_tune)
    plain = None
    if THROUGHPUT.is_file():
        rows = json.loads(THROUGHPUT.read_text())["rows"]
        plain = next((r["english_tokens_per_s"] for r in rows if r["case"] == "plain"), None)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}  # other protocols and at_pairs are kept
    result.update({
        "config": str(CONFIG.relative_to(ROOT)), "minutes": round(state["seconds"] / 60, 2), "updates": state["step"],
        "pairs_seen": state["examples_seen"], "tokens_seen": state["tokens_seen"],
        "tokens_per_s": round(state["tokens_seen"] / state["seconds"], 1), "plain_loop_tokens_per_s": plain,
        f"fi16k{sfx}": scores, "targets": TARGETS, f"met{sfx}": met(scores), f"fine_tune{sfx}": FINE_TUNE[args.fine_tune],
    })
    result.setdefault("threads", os.environ.get("OMP_NUM_THREADS"))  # of the timed training run
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
