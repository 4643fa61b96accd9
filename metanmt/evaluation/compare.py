"""Compare initializations across languages, budgets and seeds: the MetaNMT figure as a table and a plot.

Every (init, language, budget, seed) cell fine-tunes a copy of the init with the SAME recipe, so the
only difference between rows is the initialization, then translates and scores the language's test
set. Budget ``0`` is zero-shot (no fine-tuning; deterministic, so one row per init and language).
A from-scratch row (the first init's architecture and tokenizer, freshly initialized with a fixed
seed) is added as the floor::

    compare(inits=[("meta", "runs/meta"), ("multi", "runs/multi")], data_root="../shared/data/l10n",
            langs=["lv", "fi", "tr", "ko"], budgets=["0", "4k", "16k", "40k"], seeds=3, out="report",
            recipe=FinetuneRecipe(adapt="emb+enc"))

or ``metanmt compare --init meta=runs/meta --init multi=runs/multi --data-root DIR --langs lv fi tr ko
--budgets 0 4k 16k 40k --seeds 3 --out report/``. It writes:

- ``report/cells/<init>__<lang>__<budget>__s<seed>.json``: one finished cell each, written atomically;
  a second run skips these (resumable). An interrupted cell's fine-tune lives in
  ``report/work/<cell>/`` and resumes from its last checkpoint.
- ``report/results.csv``: ``init,lang,budget,seed,bleu,chrf,steps,seconds`` (``seconds`` is the
  cell's wall time: fine-tune + test decoding), then ``nll`` (test, nats/token), the data and
  compute of the fine-tune, and the meta-training compute of the init (``init_*``, from its run's
  ``checkpoints/*/trainer_state.json``) for equal-compute accounting.
- ``report/results.md``: language x budget x init, BLEU / chrF / NLL mean ± 95% CI over seeds, the
  gaps between the first init and the others, the inits' training compute, and notes (skipped
  budgets: a missing file, or a budget the pool could not fill that repeats a smaller one).
- ``report/bleu_vs_budget.png``: one panel per language, BLEU against budget, one line per init.

``report/compare.json`` holds the settings; rerunning with a different recipe refuses (the finished
cells would no longer be comparable) unless ``overwrite``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..adaptation.finetune import FINETUNE_FILE, FinetuneRecipe, Finetuner
from ..adaptation.loading import LoadedModel, open_translation_model, scratch_model
from ..data.corpus import fill_placeholders, read_pairs
from ..engine.checkpoint import (CONFIG_FILE, atomic_write_text, claim_directory, describe_changes, release_directory,
                                 run_folder_of)
from ..files import refuse_overlap
from ..errors import DataError, UserError
from ..tasks.language_embeddings import set_language
from .few_shot import mean_ci95
from .translate import evaluate_translation

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ["init", "lang", "budget", "seed", "bleu", "chrf", "steps", "seconds"]
EXTRA_COLUMNS = ["nll", "pairs", "words", "train_tokens", "pairs_seen", "tokens_seen", "best_step", "stopped",
                 "finetune_seconds", "eval_seconds", "test_segments", "num_beams", "init_steps", "init_pairs",
                 "init_tokens", "init_seconds", "init_warm_start_steps", "init_warm_start_pairs", "note"]
RANDOM = "random"  # --init NAME=random: a from-scratch row under that name
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_init(spec: str) -> tuple[str, str]:
    """``name=path`` (or ``name=random``) -> (name, path)."""
    if "=" not in spec:
        raise UserError(f"--init {spec!r}: expected NAME=PATH, e.g. meta=runs/meta (or scratch=random)")
    name, path = spec.split("=", 1)
    if not _NAME.match(name):
        raise UserError(f"--init {spec!r}: the name may only use letters, digits and _ . + -")
    return name, path


def budget_words(budget: str) -> Optional[int]:
    """``4k`` -> 4000, ``0`` -> 0, ``pool`` -> None (the whole pool)."""
    text = budget.strip().lower()
    if text == "pool":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", text)
    if not match:
        raise UserError(f"--budgets {budget!r}: expected 0, a word count such as 4k / 16000, or pool")
    return int(float(match.group(1)) * (1000 if match.group(2) else 1))


def _read_split(data_root: Path) -> dict[str, Any]:
    path = data_root / "split.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _path(data_root: Path, pattern: str, **values: str) -> Path:
    path = Path(fill_placeholders(pattern, **values))
    return path if path.is_absolute() else data_root / path


def cell_name(init: str, lang: str, budget: str, seed: int) -> str:
    return f"{init}__{lang}__{budget}__s{seed}"


@dataclasses.dataclass
class Plan:
    """The cells to run and the budgets left out (with why)."""

    cells: list[tuple[str, str, str, int]]
    files: dict[tuple[str, str], Path]  # (lang, budget) -> fine-tuning file
    notes: list[str]
    row_notes: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # -> the CSV's note


def plan_cells(init_names: list[str], scratch_names: set[str], data_root: Path, langs: list[str], budgets: list[str],
               seeds: int, finetune_pattern: str, scratch_seeds: Optional[int] = None) -> Plan:
    """Every cell, skipping (and noting) budgets whose file is missing, and budgets that split.json
    marks incomplete when a smaller budget of the language already used the whole pool."""
    split = _read_split(data_root).get("finetune", {})
    files: dict[tuple[str, str], Path] = {}
    notes: list[str] = []
    row_notes: dict[tuple[str, str], str] = {}
    usable: dict[str, list[str]] = {}
    for lang in langs:
        usable[lang] = []
        pool_seen: Optional[str] = None
        for budget in budgets:
            if budget_words(budget) == 0:
                usable[lang].append(budget)
                continue
            path = _path(data_root, finetune_pattern, lang=lang, budget=budget)
            if not path.is_file():
                notes.append(f"{lang} {budget}: skipped, no fine-tuning file {path}")
                continue
            info = split.get(lang, {}).get(budget, {})
            if info.get("complete") is False:
                words = info.get("en_words", "?")
                if pool_seen is not None:
                    notes.append(f"{lang} {budget}: skipped, the pool ({words} English words) cannot fill it and "
                                 f"{lang} {pool_seen} already uses the whole pool")
                    continue
                pool_seen = budget
                notes.append(f"{lang} {budget}: incomplete, the whole pool ({words} English words) is used")
                row_notes[(lang, budget)] = f"incomplete budget: whole pool, {words} English words"
            files[(lang, budget)] = path
            usable[lang].append(budget)
    # zero-shot cells first, then seed by seed, so that an interrupted run holds complete seeds
    cells = [(init, lang, budget, 0) for init in init_names if init not in scratch_names  # a random model's
             for lang in langs for budget in usable[lang] if budget_words(budget) == 0]   # zero-shot is noise
    for seed in range(seeds):
        for lang in langs:
            for budget in (b for b in usable[lang] if budget_words(b) != 0):
                for init in init_names:
                    if init in scratch_names and scratch_seeds is not None and seed >= scratch_seeds:
                        continue
                    cells.append((init, lang, budget, seed))
    if any(budget_words(b) == 0 for b in budgets):
        notes.append("budget 0 is zero-shot: no fine-tuning, deterministic decoding, one row per init and language")
    return Plan(cells, files, notes, row_notes)


def _cell_row(init: str, lang: str, budget: str, seed: int, evaluation: dict[str, Any], tuned: dict[str, Any],
              init_state: dict[str, Any], seconds: float, note: str) -> dict[str, Any]:
    return {
        "init": init, "lang": lang, "budget": budget, "seed": seed,
        "bleu": evaluation["bleu"], "chrf": evaluation["chrf"], "steps": tuned.get("updates", 0), "seconds": seconds,
        "nll": evaluation["nll"], "pairs": tuned.get("pairs", 0), "words": tuned.get("words", 0),
        "train_tokens": tuned.get("train_tokens", 0), "pairs_seen": tuned.get("pairs_seen", 0),
        "tokens_seen": tuned.get("tokens_seen", 0), "best_step": tuned.get("best_step", 0),
        "stopped": tuned.get("stopped", "zero-shot"), "finetune_seconds": tuned.get("seconds", 0.0),
        "eval_seconds": evaluation["translate_seconds"], "test_segments": evaluation["segments"],
        "num_beams": evaluation["num_beams"], "init_steps": init_state.get("step", ""),
        "init_pairs": init_state.get("examples_seen", ""), "init_tokens": init_state.get("tokens_seen", ""),
        "init_seconds": init_state.get("seconds", ""),
        "init_warm_start_steps": init_state.get("warm_start", {}).get("step", ""),
        "init_warm_start_pairs": init_state.get("warm_start", {}).get("examples_seen", ""), "note": note,
        "bleu_signature": evaluation["bleu_signature"], "chrf_signature": evaluation["chrf_signature"],
        "best_dev": tuned.get("best_dev", {}),
    }


def compare(inits: list[tuple[str, str]], data_root: str | Path, langs: list[str], budgets: list[str], seeds: int,
            out: str | Path, recipe: FinetuneRecipe, scratch: bool = True, scratch_seed: int = 0,
            scratch_seeds: Optional[int] = None, dev: Optional[str] = None, report_only: bool = False,
            test_pattern: str = "test/{lang}.tsv.gz", finetune_pattern: str = "finetune/{lang}.{budget}.tsv.gz",
            num_beams: int = 4, max_test_segments: Optional[int] = None, keep_models: bool = False,
            overwrite: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run (or resume) every cell and write the report; returns ``{"rows": [...], "ran": n, "skipped": m, ...}``."""
    data_root, out = Path(data_root), Path(out)
    if not data_root.is_dir():
        raise DataError(f"--data-root: {data_root} is not a directory")
    if not inits:
        raise UserError("compare: give at least one --init NAME=PATH")
    if seeds < 1:
        raise UserError(f"--seeds: must be at least 1, got {seeds}")
    if scratch_seeds is not None and scratch_seeds < 1:
        raise UserError(f"--scratch-seeds: must be at least 1, got {scratch_seeds}")
    names = [n for n, _ in inits]
    if len(set(names)) != len(names):
        raise UserError(f"--init: duplicate names in {', '.join(names)}")
    for b in budgets:
        budget_words(b)
    paths = dict(inits)
    if scratch and not any(p == RANDOM for p in paths.values()):
        if "scratch" in paths:
            raise UserError("--init scratch=...: the name 'scratch' is taken by the automatic from-scratch row; use --no-scratch")
        paths["scratch"] = RANDOM
        names.append("scratch")
    scratch_names = {n for n, p in paths.items() if p == RANDOM}
    if scratch_names == set(names):
        raise UserError("compare: the from-scratch row copies the first real init's architecture; give one --init NAME=PATH")
    for lang in langs:
        test = _path(data_root, test_pattern, lang=lang)
        if not test.is_file():
            raise DataError(f"{lang}: no test file {test}")

    for name, path in paths.items():  # every init is checked before --out is claimed
        folder = Path(path)
        if path != RANDOM and not ((folder / "config.json").is_file() or (folder / CONFIG_FILE).is_file()):
            raise UserError(f"--init {name}={path}: " + ("no such run or model folder" if not folder.is_dir() else
                                                           "neither a metanmt run nor a saved model (no config.json)"))
    refuse_overlap(out, [("--data-root", data_root),
                         *[(f"--init {n}", run_folder_of(p)) for n, p in paths.items() if p != RANDOM]], "--out")

    settings = {"recipe": recipe.to_dict(), "inits": {n: (p if p == RANDOM else str(Path(p).resolve())) for n, p in paths.items()},
                "scratch_seed": scratch_seed, "dev": dev, "test_pattern": test_pattern, "finetune_pattern": finetune_pattern,
                "num_beams": num_beams, "max_test_segments": max_test_segments, "data_root": str(data_root.resolve())}
    _claim(out, settings, overwrite)
    plan = plan_cells(names, scratch_names, data_root, langs, budgets, seeds, finetune_pattern, scratch_seeds)
    cells_dir, work_dir = out / "cells", out / "work"
    cells_dir.mkdir(parents=True, exist_ok=True)
    # report_only: the report of what is finished, e.g. while other processes run the rest
    todo = [] if report_only else [c for c in plan.cells if not (cells_dir / f"{cell_name(*c)}.json").is_file()]
    log.info("compare: %d cells, %d finished before, %d to run", len(plan.cells), len(plan.cells) - len(todo), len(todo))

    loaded: dict[str, LoadedModel] = {}
    first_real = next(n for n in names if n not in scratch_names)

    def get_init(name: str) -> LoadedModel:
        if name not in loaded:
            if name in scratch_names:
                loaded[name] = scratch_model(get_init(first_real), scratch_seed)
            else:
                loaded[name] = open_translation_model(paths[name], device)
        return loaded[name]

    pair_cache: dict[Path, list] = {}

    def pairs_of(path: Path) -> list:
        if path not in pair_cache:
            pair_cache[path] = read_pairs(path)
        return pair_cache[path]

    started = time.perf_counter()
    for index, (init, lang, budget, seed) in enumerate(todo, 1):
        name = cell_name(init, lang, budget, seed)
        log.info("cell %d/%d: %s", index, len(todo), name)
        base = get_init(init)
        note = ""
        if budget_words(budget) == 0:
            tuned_info: dict[str, Any] = {}
            model = base.model
            set_language(model, lang, base.family)  # language embeddings: a new language's table is zero
        else:
            work = work_dir / name
            if work.exists() and not (work / FINETUNE_FILE).is_file():
                shutil.rmtree(work)  # killed before the fine-tune claimed its folder: nothing to keep
            train = pairs_of(plan.files[(lang, budget)])
            dev_pairs = pairs_of(_path(data_root, dev, lang=lang)) if dev else None
            cell_recipe = dataclasses.replace(recipe, seed=seed)
            tuner = Finetuner(base.family, copy.deepcopy(base.model), train, cell_recipe, work, dev_pairs,
                              base.run_config, {"cell": name, "init": settings["inits"][init]}, device, lang=lang)
            tuned_info = tuner.run(resume=True)
            model = tuner.model
            nominal = budget_words(budget)
            note = plan.row_notes.get((lang, budget), "")
            if not note and nominal is not None and tuned_info["words"] < 0.95 * nominal:
                note = f"only {tuned_info['words']} English words in the file"
        t_eval = time.perf_counter()
        evaluation = evaluate_translation(LoadedModel(base.family, model, base.source, base.run_config),
                                          _path(data_root, test_pattern, lang=lang), num_beams=num_beams,
                                          max_segments=max_test_segments)
        evaluation["translate_seconds"] = time.perf_counter() - t_eval  # decoding + test NLL
        # the fine-tune's seconds span every attempt of an interrupted cell; loading the init is not counted
        row = _cell_row(init, lang, budget, seed, evaluation, tuned_info, base.meta_training,
                        float(tuned_info.get("seconds", 0.0)) + evaluation["translate_seconds"], note)
        atomic_write_text(cells_dir / f"{name}.json", json.dumps(row, indent=2, ensure_ascii=False))
        if not keep_models:
            shutil.rmtree(work_dir / name, ignore_errors=True)
        del model
        write_csv(out, load_rows(out, plan.cells))  # partial results are readable while the rest runs
    rows = load_rows(out, plan.cells)
    write_report(out, rows, names, langs, [b for b in budgets], plan.notes, settings)
    release_directory(out)
    return {"rows": rows, "ran": len(todo), "skipped": len(plan.cells) - len(todo), "notes": plan.notes,
            "seconds": time.perf_counter() - started}


def _claim(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    record = out / "compare.json"
    # a compare report always continues (finished cells are reused), so it is claimed with resume on
    if claim_directory(out, record, "compare report", resume=not overwrite, overwrite=overwrite, out_flag="--out"):
        old = json.loads(record.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(settings))
        # adding inits is fine (their cells are new); changing a path of an existing name is not
        old_inits, new_inits = old.get("inits", {}), new.get("inits", {})
        details = describe_changes(old, new, ignore={f"inits.{n}" for n in set(old_inits) ^ set(new_inits)}, limit=4)
        if details:
            raise UserError(f"{out}: its finished cells were made with other settings ({details}); "
                            "use another --out or pass --overwrite")
        settings = {**settings, "inits": {**old_inits, **new_inits}}
    atomic_write_text(record, json.dumps(settings, indent=2))


def load_rows(out: Path, cells: list[tuple[str, str, str, int]]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        path = out / "cells" / f"{cell_name(*cell)}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows


def write_csv(out: Path, rows: list[dict[str, Any]]) -> Path:
    path = out / "results.csv"
    tmp = path.with_name(".tmp-results.csv")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=REQUIRED_COLUMNS + EXTRA_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)
    return path


def format_mean_ci(values: list[float], digits: int = 2) -> str:
    """``mean ± 95% CI half-width``; the mean alone for one value."""
    mean, half = mean_ci95(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    """(init, lang, budget) -> metric -> values over seeds."""
    table: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for row in rows:
        entry = table.setdefault((row["init"], row["lang"], row["budget"]), {})
        for key in ("bleu", "chrf", "nll", "steps", "seconds"):
            entry.setdefault(key, []).append(float(row[key]))
    return table


def write_report(out: Path, rows: list[dict[str, Any]], inits: list[str], langs: list[str], budgets: list[str],
                 notes: list[str], settings: dict[str, Any]) -> None:
    """results.csv, results.md and bleu_vs_budget.png from the finished cells."""
    write_csv(out, rows)
    table = summarize(rows)
    lines = ["# Initializations compared on low-resource languages", "",
             f"BLEU and chrF (sacreBLEU: {rows[0]['bleu_signature'] if rows else '-'}; "
             f"{rows[0]['chrf_signature'] if rows else '-'}) of beam-{settings['num_beams']} decoding of each "
             "language's test set, mean ± 95% CI over fine-tuning seeds; NLL is the test cross-entropy in nats per "
             "target token (lower is better). Budgets in English words; 0 = zero-shot.", "",
             "| lang | budget | init | BLEU | chrF | NLL | updates | seconds | n |", "|---|---|---|---|---|---|---|---|---|"]
    for lang in langs:
        for budget in budgets:
            for init in inits:
                m = table.get((init, lang, budget))
                if not m:
                    continue
                lines.append(f"| {lang} | {budget} | {init} | {format_mean_ci(m['bleu'])} | {format_mean_ci(m['chrf'])} "
                             f"| {format_mean_ci(m['nll'], 3)} "
                             f"| {np.mean(m['steps']):.0f} | {np.mean(m['seconds']):.1f} | {len(m['bleu'])} |")
    real = [i for i in inits if settings["inits"].get(i) != RANDOM]
    if len(real) >= 2:
        first = real[0]
        lines += ["", f"## {first} minus each other init (difference of the means)", "",
                  "| lang | budget | vs | Δ BLEU | Δ chrF | Δ NLL |", "|---|---|---|---|---|---|"]
        for lang in langs:
            for budget in budgets:
                a = table.get((first, lang, budget))
                for other in inits[1:]:
                    b = table.get((other, lang, budget))
                    if a and b and other != first:
                        d = {k: float(np.mean(a[k]) - np.mean(b[k])) for k in ("bleu", "chrf", "nll")}
                        lines.append(f"| {lang} | {budget} | {other} | {d['bleu']:+.2f} | {d['chrf']:+.2f} | {d['nll']:+.3f} |")
    lines += ["", "## Compute of each initialization (meta-training / pre-training)", "",
              "All of an initialization's training is counted, a warm start's included.", "",
              "| init | source | steps | sentence pairs | target tokens | seconds | of which warm start (steps / pairs) |",
              "|---|---|---|---|---|---|---|"]
    for init in inits:
        first_row = next((r for r in rows if r["init"] == init), None)
        src = settings["inits"].get(init, "")
        if first_row is None:
            continue
        lines.append(f"| {init} | {src} | {first_row['init_steps']} | {first_row['init_pairs']} | {first_row['init_tokens']} "
                     f"| {_num(first_row['init_seconds'])} | {_warm_start_text(first_row)} |")
    recipe = settings["recipe"]
    total = sum(float(r["seconds"]) for r in rows)
    lines += ["", "## Fine-tuning recipe (identical for every init; the seed is each row's)", "",
              "`" + json.dumps(recipe) + "`", "", f"dev set for early stopping: {settings['dev'] or 'none (all planned updates, last model)'}",
              "", f"{len(rows)} cells, {total:.0f} s of cell wall time in all.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    plot(out / "bleu_vs_budget.png", table, inits, langs, budgets)


def _warm_start_text(row: dict[str, Any]) -> str:
    steps, pairs = row.get("init_warm_start_steps", ""), row.get("init_warm_start_pairs", "")
    return "–" if steps in ("", None) else f"{steps} / {pairs}"


def _num(value: Any) -> str:
    try:
        return f"{float(value):.0f}"
    except (TypeError, ValueError):
        return "–"


def plot(path: Path, table: dict[tuple[str, str, str], dict[str, list[float]]], inits: list[str], langs: list[str],
         budgets: list[str]) -> Path:
    """One panel per language: BLEU against budget (evenly spaced), one line per init, 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(langs)), figsize=(4 * max(1, len(langs)), 3.6), squeeze=False, sharey=True)
    for ax, lang in zip(axes[0], langs):
        for init in inits:
            xs, ys, errs = [], [], []
            for x, budget in enumerate(budgets):
                m = table.get((init, lang, budget))
                if m:
                    mean, half = mean_ci95(m["bleu"])
                    xs.append(x)
                    ys.append(mean)
                    errs.append(0.0 if math.isnan(half) else half)
            if xs:
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=init)
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_ylim(bottom=0)
        ax.set_title(lang)
        ax.set_xlabel("budget (English words)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("BLEU")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
