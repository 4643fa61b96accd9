"""The fine-tuning length, chosen on the dev language only, never a test language.

The test languages have no dev set to stop on, so every cell fine-tunes for a fixed number of
updates given by the recipe's scaling rule (:meth:`FinetuneRecipe.updates_for`)::

    updates = min(max_steps, max(min_steps, ceil(epochs x batches per epoch)))

For each dev-language budget of ``finetune.search`` one fine-tune of the reference init (the cells'
recipe, seed 0, no early stopping) scores the dev set (greedy) after every update count some
candidate rule gives that budget (compare's adaptation curve: the weights at update k are those a
k-update fine-tune ends with). The rule with the highest chrF averaged over the budgets wins; rules
within ``tie`` chrF of it count as tied and the one with the fewest updates in all is taken. chrF,
not the dev NLL, decides: at small budgets the NLL rises from the first updates while chrF goes on
rising (docs/design.md, "Fine-tuning defaults"). Only the reference init is used: a bias from that
can only favour the reference, so a gap in another init's favour is conservative. ::

    choose_length([{"budget": "1k", "batches_per_epoch": 3, "points": {...}}], rules, tie=0.1)
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

from ..adaptation.finetune import take_budget
from ..adaptation.loading import open_translation_model
from ..adaptation.recipe import FinetuneRecipe
from ..data.corpus import read_pairs
from ..errors import UserError
from ..evaluation.compare import _path, adaptation_curve, plan_cells
from ..tasks.translation.training import plan_batches
from .folder import init_dir, read_json, rule_file, write_json
from .spec import Study


def rule_updates(batches: int, epochs: float, min_steps: int, max_steps: int) -> int:
    return FinetuneRecipe(epochs=epochs, min_steps=min_steps, max_steps=max_steps).updates_for(batches)


def candidate_rules(study: Study) -> list[dict[str, Any]]:
    search, cap = study.file.finetune.search, study.file.finetune.max_steps
    return [{"epochs": e, "min_steps": m, "max_steps": cap} for e, m in itertools.product(search.epochs, search.min_steps)]


def choose_length(runs: list[dict[str, Any]], rules: list[dict[str, Any]], tie: float) -> dict[str, Any]:
    """The rule with the highest chrF averaged over budgets; within ``tie`` of it, the fewest updates."""
    scored = []
    for rule in rules:
        chrfs, updates = [], 0
        for run in runs:
            k = rule_updates(run["batches_per_epoch"], **rule)
            chrfs.append(run["points"][str(k)]["chrf"])
            updates += k
        scored.append({**rule, "mean_chrf": sum(chrfs) / len(chrfs), "total_updates": updates})
    best = max(s["mean_chrf"] for s in scored)
    chosen = min((s for s in scored if s["mean_chrf"] >= best - tie), key=lambda s: (s["total_updates"], -s["mean_chrf"]))
    chosen = {**chosen, "updates": {r["budget"]: rule_updates(r["batches_per_epoch"], chosen["epochs"], chosen["min_steps"],
                                                            chosen["max_steps"]) for r in runs}}
    return {"choice": chosen, "scored": scored,
            "rule": f"highest mean dev chrF over the budgets; within {tie} chrF the fewest updates"}


def choose_rule(study: Study, out: Path) -> dict[str, Any]:
    """Measure the dev-language curves of the reference init (resumable, budget by budget) and choose."""
    path, ref = rule_file(out), study.file.reference
    search = study.file.finetune.search
    rules = candidate_rules(study)
    info = read_json(path) if path.is_file() else {"runs": []}
    dev_lang = study.file.data.dev_lang
    base = None
    for budget in search.budgets:
        if any(r["budget"] == budget for r in info["runs"]):
            continue
        base = base or open_translation_model(init_dir(out, ref))
        plan = plan_cells([ref], set(), study.data_root, [dev_lang], [budget], 1, study.file.data.finetune)
        train = read_pairs(plan.files[(dev_lang, budget)])
        if (dev_lang, budget) in plan.cuts:  # 1k: the prefix of the 4k file, as compare cuts it
            train, _ = take_budget(train, plan.cuts[(dev_lang, budget)], "prefix")
        dev_file = _path(study.data_root, study.file.data.dev, lang=dev_lang)
        if not dev_file.is_file():
            raise UserError(f"finetune.length: chosen: the dev language {dev_lang} has no dev file {dev_file}")
        dev = read_pairs(dev_file)[: search.segments]
        recipe = dataclasses.replace(study.recipe, seed=0)
        base.family.set_source_language(dev_lang)
        batches = len(plan_batches([len(t) for _, t in base.family.encode(train)], recipe.max_tokens, None))
        points = sorted({0, *(rule_updates(batches, **rule) for rule in rules)})
        at_zero = next((r["points"]["0"] for r in info["runs"] if "0" in r["points"]), None)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            curve = adaptation_curve(base, train, recipe, points, Path(work) / "ft", dev, 1, lang=dev_lang,
                                     at_zero=at_zero)
        info["runs"].append({"init": ref, "budget": budget, "pairs": len(train), "batches_per_epoch": batches,
                             "points": curve, "seconds": time.perf_counter() - started})
        info.update({"dev": str(dev_file.relative_to(study.data_root)), "dev_segments": len(dev),
                     "recipe": recipe.to_dict(), "grid": rules})
        write_json(path, info)
    runs = [r for r in info["runs"] if r["budget"] in search.budgets]
    info.update(choose_length(runs, rules, search.tie))
    write_json(path, info)
    return info


def length_of(study: Study, out: Path) -> FinetuneRecipe:
    """The cells' recipe: the chosen length (``finetune.length: chosen``) or the study file's own."""
    if study.file.finetune.length == "fixed":
        return study.recipe
    choice = read_json(rule_file(out))["choice"]
    return dataclasses.replace(study.recipe, epochs=choice["epochs"], min_steps=choice["min_steps"],
                               max_steps=choice["max_steps"], patience=0)
