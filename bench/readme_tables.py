"""Print the README's result tables from committed benchmark results (so the README quotes files, not memory).

    python bench/readme_tables.py compare [l10n_compare_quick]   # bench/results/l10n_compare/results.csv (mean ± 95% t interval, n, p)
    python bench/readme_tables.py curve [l10n_compare_quick]     # its adaptation curve columns (nll_at_K)
    python bench/readme_tables.py meta_step [meta_step_1thread]   # bench/results/meta_step.json (or that file)
    python bench/readme_tables.py recipes      # bench/results/meta_recipes.csv (the screening rows)
    python bench/readme_tables.py frontier_recipes [lora]   # its rows with a budget and fine-tuning preset
    python bench/readme_tables.py finetune_rule      # bench/results/l10n_finetune_recipe.json
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


def recipes_table() -> None:
    results = ROOT / "bench" / "results"
    with open(results / "meta_recipes.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if not r.get("budget")]  # the frontier rows have their own table
    info = json.loads((results / "meta_recipes.json").read_text(encoding="utf-8"))["recipes"]
    control = next((r for r in rows if r["recipe"] == "warm_multitask"), None)
    print("| recipe | algorithm | inner steps | inner adapt | warm start | pairs seen | train s | dev zero-shot NLL "
          "| dev BLEU | dev chrF | dev NLL | vs control BLEU / chrF / NLL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "–"
        if control is not None and r["warm_start"] != "none" and r is not control:
            gap = " / ".join(f"{float(r[k]) - float(control[k]):+.{d}f}" for k, d in (("dev_bleu", 2), ("dev_chrf", 1), ("dev_nll", 3)))
        zero = info.get(r["recipe"], {}).get("dev_zero_shot", {}).get("nll")
        print(f"| {r['recipe']} | {r['algo']} | {r['inner_steps']} | {r['adapt']} | {r['warm_start']} | {int(r['pairs_seen']):,} "
              f"| {float(r['seconds']):.0f} | {'–' if zero is None else f'{zero:.2f}'} | {r['dev_bleu']} | {r['dev_chrf']} "
              f"| {r['dev_nll']} | {gap} |")


def frontier_recipes_table(group: str = "mechanism") -> None:
    """bench/l10n_frontier_recipes.py's rows of one group (``mechanism`` or ``lora``): early-stopped dev
    scores with the Holm-corrected p against the group's multi-task control, and the adaptation curve
    (dev NLL / chrF after k updates)."""
    with open(ROOT / "bench" / "results" / "meta_recipes.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("budget") and ("lora" in r["recipe"]) == (group == "lora")]
    curve = [c.split("_")[-1] for c in rows[0] if c.startswith("nll_at_")] if rows else []
    print("| fine-tune | budget | recipe | pairs seen | train s | n | dev BLEU | dev chrF | dev NLL | "
          + " | ".join(f"NLL / chrF at {k}" for k in curve) + " |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(curve))
    for r in sorted(rows, key=lambda r: (r["finetune"], r["budget"])):
        p = {m: _p(r, m) for m in ("bleu", "chrf", "nll")}
        points = " | ".join(f"{float(r[f'nll_at_{k}']):.3f} / {float(r[f'chrf_at_{k}']):.1f}" if r.get(f"nll_at_{k}") else "–"
                            for k in curve)
        print(f"| {r['finetune']} | {r['budget']} | {r['recipe']} | {int(float(r['pairs_seen'])):,} | {float(r['seconds']):.0f} "
              f"| {r['n_seeds']} | {float(r['dev_bleu']):.2f}{p['bleu']} | {float(r['dev_chrf']):.1f}{p['chrf']} "
              f"| {float(r['dev_nll']):.3f}{p['nll']} | {points} |")


def finetune_rule_table() -> None:
    """bench/l10n_finetune_recipe.py: dev chrF / NLL after each update count of each budget's curve,
    the rules' mean chrF, and the choice."""
    from l10n_finetune_recipe import rule_updates  # bench/ is on sys.path when this file runs as a script

    info = json.loads((ROOT / "bench" / "results" / "l10n_finetune_recipe.json").read_text(encoding="utf-8"))
    for run in info["runs"]:
        points = " · ".join(f"{k}: {v['chrf']:.1f} / {v['nll']:.3f}" for k, v in run["points"].items())
        print(f"- {run['init']}, ro {run['budget']} ({run['pairs']} pairs, {run['batches_per_epoch']} batches an epoch, "
              f"{run['seconds']:.0f} s): {points}")
    print()
    first = [run for run in info["runs"] if run["init"] == info["runs"][0]["init"]]
    print(f"| epochs | min updates | max updates | mean dev chrF | updates at {', '.join(r['budget'] for r in first)} |")
    print("|---|---|---|---|---|")
    choice = info["choice"]
    for rule in sorted(info["scored"], key=lambda r: -r["mean_chrf"]):
        counts = [str(rule_updates(run["batches_per_epoch"], rule["epochs"], rule["min_steps"], rule["max_steps"]))
                  for run in first]
        chosen = " (chosen)" if (rule["epochs"], rule["min_steps"]) == (choice["epochs"], choice["min_steps"]) else ""
        print(f"| {rule['epochs']:g}{chosen} | {rule['min_steps']} | {rule['max_steps']} | {rule['mean_chrf']:.2f} "
              f"| {', '.join(counts)} |")


if __name__ == "__main__":
    {"compare": compare_table, "curve": curve_table, "meta_step": meta_step_table, "recipes": recipes_table,
     "frontier_recipes": frontier_recipes_table, "finetune_rule": finetune_rule_table}[sys.argv[1]](*sys.argv[2:])
