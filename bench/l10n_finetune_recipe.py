"""Choose the comparison's fine-tuning length on the dev language (Romanian) only, never a test language.

    OMP_NUM_THREADS=1 python bench/l10n_finetune_recipe.py --init multi=RUN [--init NAME=RUN ...] \\
        [--data-root ../shared/data/l10n] [--budgets 1k 4k 16k 40k] [--epochs 5 10 20 40] [--min-steps 0 100]

The test languages have no dev set of their own (Latvian's 16k and 40k budgets are its whole pool),
so the comparison's fine-tunes cannot stop early on their own language: they run a fixed number of
updates, given by the recipe's scaling rule (:meth:`FinetuneRecipe.updates_for`)::

    updates = min(max_steps, max(min_steps, ceil(epochs x batches per epoch)))

This chooses ``epochs`` and ``min_steps`` (``max_steps`` fixed, ``--max-steps``) on Romanian. For each
init and budget (1k = the first 1,000 English words of ro.4k, as compare cuts it) one fine-tune at the
recipe's fixed learning rate (Adam 3e-4, ~1,000-token batches, all parameters, seed 0, no early
stopping) scores ``dev/ro`` (500 segments, greedy) after every update count that some candidate rule
gives that budget: compare's adaptation curve, so the weights at update k are those a k-update
fine-tune ends with. The rule with the highest chrF, averaged over budgets and then over inits, wins;
rules within 0.1 chrF of it count as tied and the one with fewer updates in all is taken. chrF, not
the dev NLL, decides: at small budgets the NLL rises from the first updates while chrF goes on rising
for a hundred (docs/design.md, "Fine-tuning defaults").

Resumable: each (init, budget, adapt) curve is stored in the results file as it finishes, and a rerun
(also one that adds an init) computes only what is missing. ``--rechoose`` recomputes the choice from
the stored curves. Writes ``bench/results/l10n_finetune_recipe.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "l10n_finetune_recipe.json"
TIE = 0.1  # chrF points within which two rules count as tied


def rule_updates(batches: int, epochs: float, min_steps: int, max_steps: int) -> int:
    """The update count of one rule at one budget (FinetuneRecipe.updates_for)."""
    from metanmt.adaptation.recipe import FinetuneRecipe

    return FinetuneRecipe(epochs=epochs, min_steps=min_steps, max_steps=max_steps).updates_for(batches)


def candidate_rules(epochs: list[float], min_steps: list[int], max_steps: int) -> list[dict]:
    return [{"epochs": e, "min_steps": m, "max_steps": max_steps} for e, m in itertools.product(epochs, min_steps)]


def choose(runs: list[dict], rules: list[dict]) -> dict:
    """The rule with the highest chrF averaged over budgets, then over inits (each init weighs the
    same, whatever budgets it has); within ``TIE`` of the best, the fewest updates in all."""
    scored = []
    for rule in rules:
        by_init: dict[str, list[float]] = {}
        updates = 0
        for run in runs:
            k = rule_updates(run["batches_per_epoch"], **rule)
            if str(k) not in run["points"]:
                break  # a curve made for another grid: this rule cannot be scored on it
            by_init.setdefault(run["init"], []).append(run["points"][str(k)]["chrf"])
            updates += k
        else:
            if by_init:
                chrf = sum(sum(v) / len(v) for v in by_init.values()) / len(by_init)
                scored.append({**rule, "mean_chrf": chrf, "total_updates": updates,
                               "per_init": {i: sum(v) / len(v) for i, v in by_init.items()}})
    if not scored:
        raise ValueError("no rule can be scored on the stored curves")
    best = max(s["mean_chrf"] for s in scored)
    chosen = min((s for s in scored if s["mean_chrf"] >= best - TIE), key=lambda s: (s["total_updates"], -s["mean_chrf"]))
    budgets = {r["budget"]: r["batches_per_epoch"] for r in runs}
    chosen = {**chosen, "updates": {b: rule_updates(n, chosen["epochs"], chosen["min_steps"], chosen["max_steps"])
                                    for b, n in budgets.items()}}
    return {"choice": chosen, "scored": scored,
            "rule": f"highest mean chrF over budgets then inits; within {TIE} chrF the fewest updates"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "l10n")
    parser.add_argument("--dev-lang", default="ro")
    parser.add_argument("--budgets", nargs="+", default=["1k", "4k", "16k", "40k"])
    parser.add_argument("--epochs", nargs="+", type=float, default=[5, 10, 20, 40])
    parser.add_argument("--min-steps", nargs="+", type=int, default=[0, 100])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--adapt", default="all")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rechoose", action="store_true", help="recompute the choice from --out's curves, run nothing")
    args = parser.parse_args()
    info = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {"runs": []}
    rules = candidate_rules(args.epochs, args.min_steps, args.max_steps)
    if args.rechoose:
        info.update(choose([r for r in info["runs"] if r["adapt"] == args.adapt], rules))
        args.out.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(info["choice"], indent=2))
        return 0
    if not args.init:
        parser.error("give --init NAME=PATH (at least one), or --rechoose")

    import torch

    from metanmt.adaptation.finetune import take_budget
    from metanmt.adaptation.loading import open_translation_model
    from metanmt.adaptation.recipe import FinetuneRecipe
    from metanmt.data.corpus import read_pairs
    from metanmt.evaluation.compare import adaptation_curve, plan_cells
    from metanmt.files import atomic_write_text
    from metanmt.tasks.translation.training import plan_batches

    lang = args.dev_lang
    dev = read_pairs(args.data_root / "dev" / f"{lang}.tsv.gz")
    plan = plan_cells(["init"], set(), args.data_root, [lang], args.budgets, 1, "finetune/{lang}.{budget}.tsv.gz")
    recipe = FinetuneRecipe(adapt=args.adapt, lr=3e-4, max_tokens=1000, seed=0)
    started = time.perf_counter()
    for name, path in (spec.split("=", 1) for spec in args.init):
        base = None
        # the init's own scores (0 updates) are the same at every budget: reuse them where measured
        at_zero = next((r["points"]["0"] for r in info["runs"]
                        if r["init"] == name and r["path"] == str(Path(path).resolve()) and "0" in r["points"]), None)
        for budget in args.budgets:
            done = [r for r in info["runs"] if (r["init"], r["budget"], r["adapt"]) == (name, budget, args.adapt)]
            if done:
                if done[0]["path"] != str(Path(path).resolve()):
                    raise SystemExit(f"{args.out}: {name} was measured on {done[0]['path']}, not {path}; "
                                     "give it another name or move the results file away")
                continue
            base = base or open_translation_model(path)
            if (lang, budget) not in plan.files:
                raise SystemExit(f"{lang} {budget}: {'; '.join(plan.notes)}")
            train = read_pairs(plan.files[(lang, budget)])
            if (lang, budget) in plan.cuts:  # 1k: the prefix of the 4k file, as compare cuts it
                train, _ = take_budget(train, plan.cuts[(lang, budget)], "prefix")
            batches = len(plan_batches([len(t) for _, t in base.family.encode(train)], recipe.max_tokens, None))
            points = sorted({0, *(rule_updates(batches, **rule) for rule in rules)})
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                curve = adaptation_curve(base, train, recipe, points, Path(work) / "ft", dev, 1, lang=lang,
                                         at_zero=at_zero)
            at_zero = curve["0"]
            seconds = time.perf_counter() - t0
            print(f"{name:>8} {budget:>4}: " + "  ".join(f"{k}:{v['chrf']:.1f}/{v['nll']:.3f}" for k, v in curve.items()),
                  flush=True)
            # read anew: processes measuring other budgets (``--budgets 16k`` beside ``--budgets 40k``) write here too
            info = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {"runs": []}
            info["runs"].append({"init": name, "path": str(Path(path).resolve()), "budget": budget, "adapt": args.adapt,
                                 "pairs": len(train), "batches_per_epoch": batches, "points": curve, "seconds": seconds})
            info.update({"dev": f"dev/{lang}.tsv.gz", "recipe": recipe.to_dict(), "grid": rules,
                         "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                         "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
            info["wall_seconds"] = info.get("wall_seconds", 0.0) + seconds
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(info, indent=2) + "\n")
    info = json.loads(args.out.read_text(encoding="utf-8"))
    info.update(choose([r for r in info["runs"] if r["adapt"] == args.adapt], rules))
    atomic_write_text(args.out, json.dumps(info, indent=2) + "\n")
    print(json.dumps(info["choice"], indent=2))
    print(f"{time.perf_counter() - started:.0f} s")
    return 0 if all(math.isfinite(r["mean_chrf"]) for r in info["scored"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
