"""Print the README's result tables from committed benchmark results (so the README quotes files, not memory).

    python bench/readme_tables.py compare [l10n_compare_quick]   # bench/results/l10n_compare/results.csv (mean ± 95% t interval, n, p)
    python bench/readme_tables.py curve [l10n_compare_quick]     # its adaptation curve columns (nll_at_K)
    python bench/readme_tables.py meta_step [meta_step_1thread]   # bench/results/meta_step.json (or that file)

``compare`` and ``curve`` read the ``results.csv`` of a ``metanmt compare`` report (or of a study's
``report/``) kept under bench/results/NAME; ``meta_step`` reads bench/meta_step.py's results file.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _compare_rows(report: str = "l10n_compare") -> list[dict[str, str]]:
    with open(ROOT / "bench" / "results" / report / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _p(row: dict[str, str], metric: str) -> str:
    """`` (p=0.012*)``: the Holm-corrected p of the row's cell against the reference, * below 0.05."""
    value = row.get(f"p_{metric}", "")
    return "" if value in ("", None) else f" (p={float(value):.2g}{'*' if float(value) < 0.05 else ''})"


def compare_table(report: str = "l10n_compare") -> None:
    """Mean ± 95% Student t interval over the n seeds of each cell; the meta − multi gap with the
    Holm-corrected p-values of the paired tests stored in results.csv."""
    from metanmt.evaluation.compare import format_mean_ci, summarize

    rows = _compare_rows(report)
    table = summarize(rows)
    inits = list(dict.fromkeys(r["init"] for r in rows))
    print("| lang | budget | " + " | ".join(f"{i} BLEU / chrF / NLL" for i in inits) + " | n (" + " / ".join(inits)
          + ") | meta − multi BLEU / chrF / NLL (Holm p) |")
    print("|---|---|" + "---|" * (len(inits) + 2))
    for lang in dict.fromkeys(r["lang"] for r in rows):
        for budget in dict.fromkeys(r["budget"] for r in rows if r["lang"] == lang):
            cells, ns = [], []
            for init in inits:
                m = table.get((init, lang, budget))
                ns.append(str(len(m["bleu"])) if m else "0")
                cells.append("–" if not m else
                             f"{format_mean_ci(m['bleu'])} / {format_mean_ci(m['chrf'], 1)} / {format_mean_ci(m['nll'])}")
            gap = "–"
            meta, multi = table.get(("meta", lang, budget)), table.get(("multi", lang, budget))
            if meta and multi:
                d = {k: float(np.mean(meta[k]) - np.mean(multi[k])) for k in ("bleu", "chrf", "nll")}
                first = next(r for r in rows if (r["init"], r["lang"], r["budget"]) == ("meta", lang, budget))
                gap = (f"{d['bleu']:+.2f}{_p(first, 'bleu')} / {d['chrf']:+.1f}{_p(first, 'chrf')} / "
                       f"{d['nll']:+.2f}{_p(first, 'nll')}")
            print(f"| {lang} | {budget} | " + " | ".join(cells) + f" | {' / '.join(ns)} | {gap} |")


def curve_table(report: str = "l10n_compare") -> None:
    """The adaptation curve: test NLL after K fine-tuning updates, mean ± 95% t interval over n seeds."""
    from metanmt.evaluation.compare import format_mean_ci, summarize

    rows = _compare_rows(report)
    points = sorted(int(k[len("nll_at_"):]) for k in (rows[0] if rows else {}) if k.startswith("nll_at_"))
    if not points:
        print("results.csv has no adaptation curve (nll_at_K) columns")
        return
    table = summarize(rows)
    print("| lang | budget | init | n | " + " | ".join(f"NLL at {k}" for k in points) + " |")
    print("|---|---|---|---|" + "---|" * len(points))
    for (init, lang, budget), m in table.items():
        if points and f"nll_at_{points[-1]}" in m:
            print(f"| {lang} | {budget} | {init} | {len(m[f'nll_at_{points[-1]}'])} | "
                  + " | ".join(format_mean_ci(m.get(f"nll_at_{k}", []), 3) for k in points) + " |")


def meta_step_table(name: str = "meta_step") -> None:
    """``name``: the results file under bench/results (meta_step_1thread: the one-thread rows)."""
    data = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text(encoding="utf-8"))
    print("| family | algorithm | implementation | inner steps | meta-steps/s | ms/step | peak RSS MB | max grad diff "
          "| plain steps: paired (range) / unpaired |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        if "steps_per_s" not in r:
            print(f"| {r['family']} | {r['algo']} | {r['impl']} {r['variant']} | | {r.get('error') or r.get('skipped')} | | | | |")
            continue
        steps = 5 if "steps5" in r["variant"] else 1
        variant = r["variant"].replace("+steps5", "").replace("steps5", "-")
        name = r["impl"] + ("" if variant == "-" else f" ({variant})")
        diff = "–" if r.get("max_grad_diff") is None else f"{r['max_grad_diff']:.1e}"
        cost = "–"
        if "cost_in_plain_steps_paired" in r:
            low, high = r["cost_in_plain_steps_paired_range"]
            cost = f"{r['cost_in_plain_steps_paired']:.2f} ({low:.2f}-{high:.2f}) / {r['cost_in_plain_steps_unpaired']:.2f}"
        elif "meta_step_cost_in_plain_steps" in r:
            cost = f"– / {r['meta_step_cost_in_plain_steps']:.2f}"
        print(f"| {r['family']} | {r['algo']} | {name} | {steps} | {r['steps_per_s']:.3f} | {r['ms_per_step']:.0f} "
              f"| {r['peak_mb']:.0f} | {diff} | {cost} |")
    print()
    for e in data["ratios"]:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items()}))


if __name__ == "__main__":
    {"compare": compare_table, "curve": curve_table, "meta_step": meta_step_table}[sys.argv[1]](*sys.argv[2:])
