"""The dev-NLL curves of multi-task runs side by side, with the study's convergence check and its
power-law forecast for each (metanmt/study/convergence.py).

    python bench/convergence.py RUN [RUN ...] [--label NAME ...] [--plot PATH] [--json PATH]

Each RUN is a folder holding a ``history.jsonl`` (a run folder). Prints a markdown table of the
validations (dev NLL after validation's fine-tune / dev chrF) every 2,000 updates, and per run: its
last validation, the fall over its last 2,000 updates, and where the fitted law passes the criterion.
bench/README.md, "The rate, and a smaller model", ran it on bench/results/study_convergence/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metanmt.engine.checkpoint import read_history
from metanmt.study.convergence import check, fitted_curve, power_law


def validations(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_history(run, "validation") if "dev_loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--label", nargs="*", default=None)
    parser.add_argument("--every", type=int, default=2000)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    labels = args.label or [run.name for run in args.runs]
    curves = {label: validations(run) for label, run in zip(labels, args.runs)}
    steps = sorted({s for curve in curves.values() for s in curve if s % args.every == 0 or s == 1000})
    print("| update | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
    for step in steps:
        cells = [f"{c[step]['dev_loss']:.3f} / {c[step]['dev_chrf']:.1f}" if step in c else "" for c in curves.values()]
        print(f"| {step:,} | " + " | ".join(cells) + " |")
    summary = {}
    for label, curve in curves.items():
        result = check(sorted((s, r["dev_loss"]) for s, r in curve.items()))
        summary[label] = result
        fit = (result or {}).get("forecast")
        line = f"{label}: " + ("fewer than 2 validations" if result is None else
                               f"{result['dev_loss_to']:.4f} at {result['to']:,}, fall {result['fall_per_1000']:.4f} "
                               f"per 1,000 from {result['from']:,}: {'flat' if result['flat'] else 'not flat'}")
        if fit:
            at = fit["flat_at"]
            line += (f"; law {fit['a']:.3f} + {fit['b']:.3f} (t/1000)^-{fit['c']:.3f} from {fit['fit_from']:,} "
                     f"(n = {fit['n']}, rms {fit['rms']:.4f}) passes near {at:,}" if at else "; the law does not pass")
            if at:
                line += f" at dev NLL {power_law(at / 1000, fit['a'], fit['b'], fit['c']):.3f}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=list) + "\n", encoding="utf-8")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for index, (label, curve) in enumerate(curves.items()):
            color = f"C{index}"
            ax.plot(sorted(curve), [curve[s]["dev_loss"] for s in sorted(curve)], marker="o", markersize=3,
                    color=color, label=label)
            fit = (summary[label] or {}).get("forecast")
            if fit and fit["flat_at"]:
                ax.plot(*fitted_curve(fit, fit["flat_at"]), "--", color=color, linewidth=1)
                ax.plot([fit["flat_at"]], [power_law(fit["flat_at"] / 1000, fit["a"], fit["b"], fit["c"])], "x",
                        color=color)
        ax.set(xlabel="updates", ylabel="Romanian dev NLL after validation's fine-tune",
               title="dev NLL; dashed: power-law fit to where it passes the criterion (x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
