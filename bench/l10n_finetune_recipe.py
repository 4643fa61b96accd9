"""Tune the comparison's fine-tuning recipe on the dev language (Romanian) only, never a test language.

    python bench/l10n_finetune_recipe.py --init meta=runs/l10n/fomaml --init multi=runs/l10n/multitask \\
        [--data-root ../shared/data/l10n] [--budgets 4k 16k] [--adapt all emb+enc]

For every (init, budget, adapt) it fine-tunes on ``finetune/ro.{budget}.tsv.gz`` for 10
epochs, scoring the dev loss on ``dev/ro.tsv.gz`` after every epoch (no early stopping), and then
picks, per budget and adapt choice, the epoch count with the least mean regret over the inits
(see :func:`choose`): one recipe for every init, so the only difference between compare rows stays the
initialization. Writes ``bench/results/l10n_finetune_recipe.json`` (every curve, the choice, wall
times and the machine). The dev loss, not dev BLEU, decides: at this scale BLEU moves by noise
between seeds while the loss separates checkpoints (docs/design.md, "Why test NLL beside BLEU").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "l10n_finetune_recipe.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "l10n")
    parser.add_argument("--dev-lang", default="ro")
    parser.add_argument("--budgets", nargs="+", default=["4k", "16k"])
    parser.add_argument("--adapt", nargs="+", default=["all"])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rechoose", action="store_true", help="recompute the choice from --out's curves, run nothing")
    args = parser.parse_args()
    if args.rechoose:
        info = json.loads(args.out.read_text(encoding="utf-8"))
        budgets = sorted({r["budget"] for r in info["runs"]}, key=lambda b: float(b.rstrip("k")))
        adapts = list(dict.fromkeys(r["adapt"] for r in info["runs"]))
        info.update(choose(info["runs"], budgets, adapts))
        args.out.write_text(json.dumps(info, indent=2), encoding="utf-8")
        print(json.dumps(info["choice"], indent=2))
        return 0

    import torch

    from metanmt.adaptation.finetune import finetune_run
    from metanmt.adaptation.recipe import FinetuneRecipe

    inits = dict(spec.split("=", 1) for spec in args.init)
    dev = args.data_root / "dev" / f"{args.dev_lang}.tsv.gz"
    runs: list[dict] = []
    started = time.perf_counter()
    for budget in args.budgets:
        train = args.data_root / "finetune" / f"{args.dev_lang}.{budget}.tsv.gz"
        for adapt in args.adapt:
            for name, path in inits.items():
                # eval_every 0 = updates/10: with 10 epochs that is one dev evaluation per epoch
                recipe = FinetuneRecipe(adapt=adapt, epochs=10, eval_every=0, patience=0, dev_metric="loss",
                                        max_steps=10**6)
                with tempfile.TemporaryDirectory() as work:
                    t0 = time.perf_counter()
                    result = finetune_run(path, train, Path(work) / "ft", recipe, dev=dev)
                    seconds = time.perf_counter() - t0
                per_epoch = result["batches_per_epoch"]
                curve = [{"epoch": d["step"] / per_epoch, "dev_loss": d["loss"]} for d in result["dev"]]
                runs.append({"init": name, "budget": budget, "adapt": adapt, "batches_per_epoch": per_epoch,
                             "seconds": seconds, "curve": curve})
                best = min(curve, key=lambda c: c["dev_loss"])
                print(f"{name:>8} {budget:>4} {adapt:>8}: best epoch {best['epoch']:.0f} dev loss {best['dev_loss']:.3f} "
                      f"(epoch 0 {curve[0]['dev_loss']:.3f}) {seconds:.0f} s", flush=True)

    info = choose(runs, args.budgets, args.adapt)
    info.update({"inits": inits, "dev": str(dev), "epochs_tried": 10, "runs": runs,
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "wall_seconds": time.perf_counter() - started})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(json.dumps(info["choice"], indent=2))
    return 0 if all(math.isfinite(v["mean_regret"]) for v in info["choice"].values()) else 1


def choose(runs: list[dict], budgets: list[str], adapts: list[str]) -> dict:
    """Per budget and adapt choice, the epoch count (>= 1) with the least mean regret over the inits.

    An init's regret at epoch e is its dev loss there minus its best dev loss over all epochs; the
    mean over inits keeps one init's large losses (a far-from-converged init) from deciding alone.
    """
    choice: dict[str, dict] = {}
    for budget in budgets:
        for adapt in adapts:
            group = [r for r in runs if r["budget"] == budget and r["adapt"] == adapt]
            if not group:
                continue
            epochs = min(len(r["curve"]) for r in group)
            best = [min(c["dev_loss"] for c in r["curve"]) for r in group]
            regret = [sum(r["curve"][e]["dev_loss"] - b for r, b in zip(group, best)) / len(group) for e in range(epochs)]
            epoch = min(range(1, epochs), key=lambda e: regret[e])
            choice[f"{budget}/{adapt}"] = {"epochs": epoch, "mean_regret": regret[epoch],
                                           "dev_loss": {r["init"]: r["curve"][epoch]["dev_loss"] for r in group},
                                           "best_epoch": {r["init"]: min(range(epochs), key=lambda e: r["curve"][e]["dev_loss"])
                                                          for r in group}}
    return {"choice": choice, "rule": "least mean regret over inits (dev loss minus the init's best)"}


if __name__ == "__main__":
    raise SystemExit(main())
