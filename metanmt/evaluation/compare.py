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

- ``OUT/cells/<init>__<lang>__<budget>__s<seed>.json``: one finished cell each, written atomically;
  a second run skips these (resumable). Each holds the cell's metrics, its test hypotheses
  (``hyps``), per-sentence test NLL (``sentence_nll``, nats summed over the sentence's
  ``sentence_tokens``) and its adaptation curve, so ``--report-only`` recomputes every number,
  p-values included, without translating again. An interrupted cell's fine-tune lives in
  ``OUT/work/<cell>/`` and resumes from its last checkpoint.
- ``OUT/results.csv``: ``init,lang,budget,seed,bleu,chrf,steps,seconds`` (``seconds`` is the
  cell's wall time: fine-tune + test decoding), then ``nll`` (test, nats/token), the data and
  compute of the fine-tune, the meta-training compute of the init (``init_*``, from its run's
  ``checkpoints/*/trainer_state.json``) for equal-compute accounting, ``n_seeds``, ``p_bleu``,
  ``p_chrf``, ``p_nll`` (paired tests against the reference init, Holm-corrected over the
  report: :mod:`.statistics`), and the adaptation curve ``nll_at_K``, ``chrf_at_K``.
- ``OUT/results.md``: language x budget x init, BLEU / chrF / NLL mean ± 95% Student t interval
  over seeds with n, the gaps of every init to the reference with p-values (``*`` = significant),
  the adaptation curve, the inits' training compute, how many of the planned cells are finished
  (a ``--report-only`` report made while cells still run says how many are missing), and notes
  (a budget the pool could not fill that repeats a smaller one, skipped; budgets cut from a larger file).
- ``OUT/bleu_vs_budget.png``: one panel per language, BLEU against budget, one line per init;
  ``OUT/adaptation_curve.png``: test NLL and chrF against fine-tuning updates per language and budget.

A budget without a file of its own (``1k``) is the first that many English words of the smallest
larger budget file (``4k``): the shared budget files are nested prefixes.

Asked for work it cannot do, compare fails before ``out`` is touched, naming what is missing: a
language without a test file, a (language, budget) without a file or a larger file to cut it from
(the message lists the language's fine-tuning files), a requested budget that no language has a
cell for, an option that selects no cell (``--scratch-seeds`` without a from-scratch row,
``--curve-seeds`` without a curve), and ``--report-only`` where no cell is finished. A typo in a
budget or a language must not read as a finished study.

The adaptation curve (``--curve``, default 0 10 30 100 updates; ``curve`` in Python, default none): MAML optimizes the quality after a
few updates, which a fine-tune run to convergence can hide, so each fine-tuned cell also runs the
fine-tuning loop for exactly ``max(curve)`` updates (fixed learning rate, no early stopping) and
scores the test set after each of those update counts. It costs ``max(curve)`` more updates and
one decoding of the test set per point (greedy by default, ``curve_beam``); ``curve_seeds`` (``--curve-seeds``)
limits it to the first N fine-tuning seeds of each cell, the report's curve table giving that n.

``report/compare.json`` holds the settings; rerunning with a different recipe refuses (the finished
cells would no longer be comparable) unless ``overwrite``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..adaptation.finetune import FINETUNE_FILE, FinetuneRecipe, Finetuner, take_budget
from ..adaptation.loading import LoadedModel, open_translation_model, scratch_model
from ..data.corpus import fill_placeholders, read_pairs
from ..engine.checkpoint import (CONFIG_FILE, atomic_write_text, claim_directory, confirm_replacement, describe_changes,
                                 release_directory, restore_on_failure, run_folder_of)
from ..files import refuse_overlap
from ..errors import DataError, UserError
from ..tasks.language_embeddings import set_language
from ..tasks.translation.decoding import translate_batch
from .few_shot import mean_ci95
from .scoring import score
from .statistics import (DEFAULT_SAMPLES, NLL_RESAMPLES, TESTS, PairedComparison, holm, paired_tests,
                         resamples_for, t_interval)

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ["init", "lang", "budget", "seed", "bleu", "chrf", "steps", "seconds"]
EXTRA_COLUMNS = ["nll", "pairs", "words", "train_tokens", "pairs_seen", "tokens_seen", "best_step", "stopped",
                 "finetune_seconds", "eval_seconds", "test_segments", "num_beams", "init_steps", "init_pairs",
                 "init_tokens", "init_seconds", "init_warm_start_steps", "init_warm_start_pairs", "note"]
SIGNIFICANCE_COLUMNS = ["n_seeds", "p_bleu", "p_chrf", "p_nll"]
CURVE = (0, 10, 30, 100)  # fine-tuning updates after which the adaptation curve scores the test set
ALPHA = 0.05  # results.md marks gaps whose Holm-corrected p is below this
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


def _files_like(data_root: Path, pattern: str, wildcard: str, **values: str) -> list[str]:
    """The files ``pattern`` names with any value of ``{wildcard}``, for a missing file's message:
    by name, or relative to ``data_root`` where the wildcard is in a folder's name."""
    marker = "@ANY@"
    path = str(_path(data_root, pattern, **values, **{wildcard: marker}))
    found = sorted(Path(p) for p in glob.glob(glob.escape(path).replace(marker, "*")) if Path(p).is_file())
    if marker in Path(path).name:
        return [p.name for p in found]
    return [str(p.relative_to(data_root)) if p.is_relative_to(data_root) else str(p) for p in found]


def cell_name(init: str, lang: str, budget: str, seed: int) -> str:
    return f"{init}__{lang}__{budget}__s{seed}"


@dataclasses.dataclass
class Plan:
    """The cells to run and the budgets left out (with why)."""

    cells: list[tuple[str, str, str, int]]
    files: dict[tuple[str, str], Path]  # (lang, budget) -> fine-tuning file
    notes: list[str]
    row_notes: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # -> the CSV's note
    cuts: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)  # -> English words cut from the file


#: budgets that may hold a file to cut a smaller budget from (with the requested ones)
STANDARD_BUDGETS = ("4k", "16k", "40k", "pool")


def _cut_source(data_root: Path, finetune_pattern: str, lang: str, words: int, budgets: list[str]) -> Optional[tuple[str, Path]]:
    """The smallest budget file larger than ``words`` (a budget without a file of its own is its
    first ``words`` English words: the shared budget files are nested prefixes)."""
    candidates = []
    for budget in dict.fromkeys([*budgets, *STANDARD_BUDGETS]):
        size = budget_words(budget)
        size = math.inf if size is None else size
        path = _path(data_root, finetune_pattern, lang=lang, budget=budget)
        if size > words and path.is_file():
            candidates.append((size, budget, path))
    return min(candidates)[1:] if candidates else None


def plan_cells(init_names: list[str], scratch_names: set[str], data_root: Path, langs: list[str], budgets: list[str],
               seeds: int, finetune_pattern: str, scratch_seeds: Optional[int] = None) -> Plan:
    """Every cell, skipping (and noting) budgets that split.json marks incomplete when a smaller
    budget of the language already used the whole pool (Latvian 40k after its 16k).

    A requested cell that cannot be made is an error, not a note (a typo must not read as a finished
    study): a (language, budget) without a file and without a larger file to cut it from (the
    message lists the language's fine-tuning files), and a budget no language has a cell for."""
    if not langs:
        raise UserError("--langs: give at least one language")
    if not budgets:
        raise UserError("--budgets: give at least one budget")
    for flag, values in (("--langs", langs), ("--budgets", [str(budget_words(b)) for b in budgets])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:  # every cell of it would be fine-tuned twice
            raise UserError(f"{flag}: {' '.join(twice)} given twice (as {' '.join(langs if flag == '--langs' else budgets)})")
    split = _read_split(data_root).get("finetune", {})
    files: dict[tuple[str, str], Path] = {}
    notes: list[str] = []
    row_notes: dict[tuple[str, str], str] = {}
    cuts: dict[tuple[str, str], int] = {}
    usable: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}  # budget -> each language without a file for it
    skipped: dict[str, list[str]] = {}  # budget -> why each language has no cell at it
    for lang in langs:
        usable[lang] = []
        pool_seen: Optional[str] = None
        for budget in budgets:
            if budget_words(budget) == 0:
                usable[lang].append(budget)
                continue
            path = _path(data_root, finetune_pattern, lang=lang, budget=budget)
            nominal = budget_words(budget)
            if not path.is_file():
                source = _cut_source(data_root, finetune_pattern, lang, nominal, budgets) if nominal else None
                if source is None:
                    have = _files_like(data_root, finetune_pattern, "budget", lang=lang)
                    missing.setdefault(budget, []).append(
                        f"{lang} {budget} has no fine-tuning file {path} and no larger budget file to cut it from "
                        f"(fine-tuning files of {lang}: {', '.join(have) or 'none'})")
                    continue
                cuts[(lang, budget)] = nominal
                files[(lang, budget)] = source[1]
                usable[lang].append(budget)
                notes.append(f"{lang} {budget}: the first {nominal:,} English words of {source[1].name} (no file of "
                             f"its own; the budget files are nested prefixes)")
                continue
            info = split.get(lang, {}).get(budget, {})
            if info.get("complete") is False:
                words = info.get("en_words", "?")
                if pool_seen is not None:
                    why = (f"{lang} {budget}: skipped, the pool ({words} English words) cannot fill it and "
                           f"{lang} {pool_seen} already uses the whole pool")
                    notes.append(why)
                    skipped.setdefault(budget, []).append(why)
                    continue
                pool_seen = budget
                notes.append(f"{lang} {budget}: incomplete, the whole pool ({words} English words) is used")
                row_notes[(lang, budget)] = f"incomplete budget: whole pool, {words} English words"
            files[(lang, budget)] = path
            usable[lang].append(budget)
    if missing:
        raise DataError(f"--budgets {' '.join(missing)}: " + "; ".join(w for whys in missing.values() for w in whys))
    empty = [b for b in dict.fromkeys(budgets) if not any(b in usable[lang] for lang in langs)]
    if empty:
        why = "; ".join(w for b in empty for w in skipped[b])
        raise DataError(f"--budgets {' '.join(empty)}: no cell for any of --langs {' '.join(langs)} ({why}); "
                        "drop it or add a language that has it")
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
    return Plan(cells, files, notes, row_notes, cuts)


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


@torch.no_grad()
def evaluate_model(family: Any, model: nn.Module, pairs: list, num_beams: int) -> dict[str, Any]:
    """Translate ``pairs``' sources, score them with sacreBLEU, and the per-sentence test NLL."""
    started = time.perf_counter()
    hyps = translate_batch(family, model, [p.src for p in pairs], num_beams=num_beams, progress=False)
    nats, tokens = family.sentence_losses(model, pairs)  # per sentence: the paired NLL test needs them
    scores = score(hyps, [p.en for p in pairs])
    return {"segments": len(pairs), "num_beams": num_beams, "bleu": scores["bleu"], "chrf": scores["chrf"],
            "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"],
            "nll": sum(nats) / max(1, sum(tokens)), "hyps": hyps, "sentence_nll": nats, "sentence_tokens": tokens,
            "translate_seconds": time.perf_counter() - started}


class CurveRecorder:
    """Scores the test set at the adaptation curve's points from a fine-tune's ``after_update`` hook.

    The cell's own fine-tune is the curve's run for its first updates (the same recipe, seed, batches
    and fixed rate; scoring does not move the dropout RNG), so a cell that runs from update 0 past the
    last point records its curve on the way and needs no second fine-tune (:func:`adaptation_curve`
    runs one only for the points it lacks: a resumed or early-stopped cell, a curve past its length).

        recorder = CurveRecorder(family, [0, 10, 30, 60], test[:200], num_beams=1)
        tuner.after_update = recorder.hook(tuner)
    """

    def __init__(self, family: Any, points: Sequence[int], test: list, num_beams: int):
        self.family, self.points, self.test, self.num_beams = family, set(points), test, num_beams
        self.scores: dict[str, dict[str, float]] = {}
        self.seconds = 0.0

    def record(self, step: int, model: nn.Module) -> None:
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            ev = evaluate_model(self.family, model, self.test, self.num_beams)
        self.scores[str(step)] = {"nll": ev["nll"], "chrf": ev["chrf"], "bleu": ev["bleu"]}
        self.seconds += time.perf_counter() - started

    def hook(self, tuner: Finetuner) -> Callable[[int], None]:
        return lambda step: self.record(step, tuner.model) if step in self.points else None


def adaptation_curve(base: LoadedModel, train: list, recipe: FinetuneRecipe, points: list[int], work: Path,
                     test: list, num_beams: int, device: str = "cpu",
                     at_zero: Optional[dict[str, float]] = None, lang: Optional[str] = None,
                     recorded: Optional[dict[str, dict[str, float]]] = None) -> dict[str, dict[str, float]]:
    """Test NLL, chrF and BLEU after each number of fine-tuning updates in ``points``: the project's
    fine-tuning loop (:class:`Finetuner`, the recipe with its seed) run for exactly ``max(points)``
    updates at the recipe's fixed learning rate, without a dev set (no early stopping), scored from
    its ``after_update`` callback. Scoring does not move the dropout RNG, so the weights at update k
    are those of the early-stopped run at update k. ``at_zero`` reuses the init's own scores;
    ``recorded``, the points a :class:`CurveRecorder` scored on the cell's own fine-tune: when it
    has every positive point, no fine-tune is run."""
    recorder = CurveRecorder(base.family, points, test, num_beams)
    out = recorder.scores
    record = recorder.record

    if 0 in points:
        if at_zero is None:
            if lang is not None:
                set_language(base.model, lang, base.family)  # as compare's zero-shot cell: a new language's table
            record(0, base.model)
        else:
            out["0"] = dict(at_zero)
    last = max(points)
    if recorded and all(str(k) in recorded for k in points if k > 0):
        out.update({k: v for k, v in recorded.items() if int(k) in points and int(k) > 0})
    elif last > 0:
        curve_recipe = dataclasses.replace(recipe, min_steps=last, max_steps=last, eval_every=last, patience=0)
        tuner = Finetuner(base.family, copy.deepcopy(base.model), train, curve_recipe, work, None, base.run_config,
                          {"adaptation_curve": points}, device, lang=lang)
        tuner.after_update = recorder.hook(tuner)
        tuner.run(overwrite=True)  # a killed curve is cheap: it restarts
        del tuner
    return {str(k): out[str(k)] for k in sorted(points)}


def compare(inits: list[tuple[str, str]], data_root: str | Path, langs: list[str], budgets: list[str], seeds: int,
            out: str | Path, recipe: FinetuneRecipe, scratch: bool = True, scratch_seed: int = 0,
            scratch_seeds: Optional[int] = None, dev: Optional[str] = None, report_only: bool = False,
            test_pattern: str = "test/{lang}.tsv.gz", finetune_pattern: str = "finetune/{lang}.{budget}.tsv.gz",
            num_beams: int = 4, max_test_segments: Optional[int] = None, keep_models: bool = False,
            overwrite: bool = False, device: str = "cpu", curve: Sequence[int] = (), curve_beam: int = 1,
            curve_seeds: Optional[int] = None, curve_segments: Optional[int] = None,
            reference: Optional[str] = None, paired_test: str = "bs",
            paired_samples: int = 0) -> dict[str, Any]:
    """Run (or resume) every cell and write the report; returns ``{"rows": [...], "ran": n, "skipped": m, ...}``.

    ``curve``: fine-tuning updates after which the adaptation curve scores the test set (e.g.
    :data:`CURVE`, the command line's default; empty: none), decoded with beam ``curve_beam``, for
    fine-tuning seeds below ``curve_seeds`` (default: every seed), on the first ``curve_segments`` test
    segments (default: the cells' test set; the cells themselves always score all of it).
    ``reference``: the init every other init is tested against (default ``multi`` if present, else
    the first); ``paired_test``: ``bs`` or ``ar`` (:mod:`.statistics`) with ``paired_samples``
    resamples (0: sacreBLEU's default, or more where the report's comparisons need them:
    :func:`.statistics.resamples_for`).
    """
    data_root, out = Path(data_root), Path(out)
    curve = sorted(set(curve))
    if any(k < 0 for k in curve):
        raise UserError(f"--curve: update counts must not be negative, got {curve}")
    if curve_beam < 1:
        raise UserError(f"--curve-beam: must be at least 1, got {curve_beam}")
    if curve_seeds is not None and curve_seeds < 1:
        raise UserError(f"--curve-seeds: must be at least 1, got {curve_seeds}")
    if curve_segments is not None and curve_segments < 1:
        raise UserError(f"--curve-segments: must be at least 1, got {curve_segments}")
    if paired_test not in TESTS:
        raise UserError(f"--paired-test: expected one of {', '.join(TESTS)}, got {paired_test!r}")
    if paired_samples < 0:
        raise UserError(f"--paired-samples: must not be negative, got {paired_samples}")
    if report_only and overwrite:
        raise UserError("--report-only with --overwrite: --overwrite discards the finished cells that --report-only "
                        "would report; give one of them")
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
    if scratch_seeds is not None and not scratch_names:
        raise UserError(f"--scratch-seeds {scratch_seeds}: there is no from-scratch row (--no-scratch, and no "
                        "--init NAME=random); drop --scratch-seeds or add the row")
    if reference is not None and reference not in names:
        raise UserError(f"--reference {reference!r}: not one of the inits ({', '.join(names)})")
    reference = reference or ("multi" if "multi" in names else names[0])
    if scratch_names == set(names):
        raise UserError("compare: the from-scratch row copies the first real init's architecture; give one --init NAME=PATH")
    no_test = [lang for lang in langs if not _path(data_root, test_pattern, lang=lang).is_file()]
    if no_test:
        have = _files_like(data_root, test_pattern, "lang")
        raise DataError(f"--langs {' '.join(no_test)}: no test file "
                        f"{', '.join(str(_path(data_root, test_pattern, lang=lang)) for lang in no_test)} "
                        f"(test files there: {', '.join(have) or 'none'})")

    for name, path in paths.items():  # every init is checked before --out is claimed
        folder = Path(path)
        if path != RANDOM and not ((folder / "config.json").is_file() or (folder / CONFIG_FILE).is_file()):
            raise UserError(f"--init {name}={path}: " + ("no such run or model folder" if not folder.is_dir() else
                                                           "neither a metanmt run nor a saved model (no config.json)"))
    refuse_overlap(out, [("--data-root", data_root),
                         *[(f"--init {n}", run_folder_of(p)) for n, p in paths.items() if p != RANDOM]], "--out")
    # the plan is made and checked before --out is claimed: a request that selects no cell writes nothing
    plan = plan_cells(names, scratch_names, data_root, langs, budgets, seeds, finetune_pattern, scratch_seeds)
    tuned_langs = list(dict.fromkeys(c[1] for c in plan.cells if budget_words(c[2]) != 0))
    asked_random = [f"--init {n}={RANDOM}" for n, p in inits if p == RANDOM]  # a from-scratch row asked for by name
    if reference in scratch_names and reference not in dict(inits):
        asked_random.append(f"--reference {reference}")
    if not tuned_langs and asked_random:
        raise UserError(f"{asked_random[0]}: a from-scratch row has no zero-shot cell, and --budgets "
                        f"{' '.join(budgets)} fine-tunes nothing; add a budget above 0")
    if curve_seeds is not None and not (curve and tuned_langs):
        why = "--curve has no values" if not curve else f"--budgets {' '.join(budgets)} fine-tunes nothing"
        raise UserError(f"--curve-seeds {curve_seeds}: no cell has an adaptation curve ({why}); "
                        "drop --curve-seeds or ask for a curve")
    if dev:
        dev_files = dict.fromkeys(_path(data_root, dev, lang=lang) for lang in tuned_langs)
        no_dev = [str(p) for p in dev_files if not p.is_file()]
        if no_dev:
            raise DataError(f"--dev {dev}: no dev file {', '.join(no_dev)}")
    cells_dir, work_dir = out / "cells", out / "work"
    finished = [c for c in plan.cells if (cells_dir / f"{cell_name(*c)}.json").is_file()]
    if report_only and not finished:
        raise UserError(f"--report-only: none of the {len(plan.cells)} planned cells is finished in {out}; nothing "
                        "to report (compare without --report-only runs them)")

    settings = {"recipe": recipe.to_dict(), "inits": {n: (p if p == RANDOM else str(Path(p).resolve())) for n, p in paths.items()},
                "scratch_seed": scratch_seed, "dev": dev, "test_pattern": test_pattern, "finetune_pattern": finetune_pattern,
                "num_beams": num_beams, "max_test_segments": max_test_segments, "data_root": str(data_root.resolve()),
                "curve": curve, "curve_beam": curve_beam, "curve_seeds": curve_seeds}
    if curve_segments is not None:  # recorded only when set: reports made before the option still match
        settings["curve_segments"] = curve_segments
    # --overwrite sets the previous report aside; it is deleted once the first cell is written and comes
    # back whole if this one stops before (any exception, Ctrl-C included)
    with restore_on_failure(out):
        settings = _claim(out, settings, overwrite)
        cells_dir.mkdir(parents=True, exist_ok=True)
        # report_only: the report of what is finished, e.g. while other processes run the rest
        todo = [] if report_only else [c for c in plan.cells if not (cells_dir / f"{cell_name(*c)}.json").is_file()]
        if report_only:
            log.info("compare --report-only: %s", _finished_text(len(finished), len(plan.cells)))
        else:
            log.info("compare: %d cells, %d finished before, %d to run", len(plan.cells), len(plan.cells) - len(todo),
                     len(todo))

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

        def test_pairs(lang: str) -> list:
            pairs = pairs_of(_path(data_root, test_pattern, lang=lang))
            return pairs[:max_test_segments] if max_test_segments else pairs

        curve_zero: dict[tuple[str, str], dict[str, float]] = {}  # (init, lang) -> the init's own curve scores

        started = time.perf_counter()
        for index, (init, lang, budget, seed) in enumerate(todo, 1):
            name = cell_name(init, lang, budget, seed)
            log.info("cell %d/%d: %s", index, len(todo), name)
            base = get_init(init)
            base.family.set_source_language(lang)  # its code or task prefix, where the checkpoint needs one
            note = ""
            test = test_pairs(lang)
            curve_test = test[:curve_segments] if curve_segments else test
            with_curve = bool(curve) and budget_words(budget) != 0 and (curve_seeds is None or seed < curve_seeds)
            recorder = CurveRecorder(base.family, [k for k in curve if k > 0], curve_test, curve_beam) if with_curve else None
            if budget_words(budget) == 0:
                tuned_info: dict[str, Any] = {}
                model = base.model
                set_language(model, lang, base.family)  # language embeddings: a new language's table is zero
            else:
                work = work_dir / name
                if work.exists() and not (work / FINETUNE_FILE).is_file():
                    shutil.rmtree(work)  # killed before the fine-tune claimed its folder: nothing to keep
                train = pairs_of(plan.files[(lang, budget)])
                if (lang, budget) in plan.cuts:
                    train, _ = take_budget(train, plan.cuts[(lang, budget)], "prefix")
                dev_pairs = pairs_of(_path(data_root, dev, lang=lang)) if dev else None
                cell_recipe = dataclasses.replace(recipe, seed=seed)
                tuner = Finetuner(base.family, copy.deepcopy(base.model), train, cell_recipe, work, dev_pairs,
                                  base.run_config, {"cell": name, "init": settings["inits"][init]}, device, lang=lang)
                if recorder is not None:  # the curve's points on the way (CurveRecorder)
                    tuner.after_update = recorder.hook(tuner)
                tuned_info = tuner.run(resume=True)
                model = tuner.model
                nominal = budget_words(budget)
                note = plan.row_notes.get((lang, budget), "")
                if not note and nominal is not None and tuned_info["words"] < 0.95 * nominal:
                    note = f"only {tuned_info['words']} English words in the file"
                if not note and (lang, budget) in plan.cuts:
                    note = f"first {nominal} English words of {plan.files[(lang, budget)].name}"
            evaluation = evaluate_model(base.family, model, test, num_beams)  # translate_seconds: decoding + test NLL
            # the fine-tune's seconds span every attempt of an interrupted cell; loading the init is not counted
            row = _cell_row(init, lang, budget, seed, evaluation, tuned_info, base.meta_training,
                            float(tuned_info.get("seconds", 0.0)) + evaluation["translate_seconds"], note)
            row.update(hyps=evaluation["hyps"], sentence_nll=evaluation["sentence_nll"],
                       sentence_tokens=evaluation["sentence_tokens"])
            if recorder is not None:
                del model
                t_curve = time.perf_counter()
                row["curve"] = adaptation_curve(base, train, cell_recipe, curve, work_dir / f"{name}__curve",
                                                curve_test, curve_beam, device, curve_zero.get((init, lang)), lang,
                                                recorded=recorder.scores)
                curve_zero.setdefault((init, lang), row["curve"].get("0"))  # the init scores the same in every cell
                row["curve_seconds"] = recorder.seconds + time.perf_counter() - t_curve
            atomic_write_text(cells_dir / f"{name}.json", json.dumps(row, indent=2, ensure_ascii=False))
            confirm_replacement(out)  # the first finished cell: the previous report is deleted only now
            if not keep_models:
                shutil.rmtree(work_dir / name, ignore_errors=True)
                shutil.rmtree(work_dir / f"{name}__curve", ignore_errors=True)
            model = None
            write_csv(out, load_rows(out, plan.cells), curve)  # partial results are readable while the rest runs
        rows = load_rows(out, plan.cells)
        test_refs = {lang: [p.en for p in test_pairs(lang)] for lang in langs}
        write_report(out, rows, names, langs, [b for b in budgets], plan.notes, settings, reference=reference,
                     references=test_refs, paired_test=paired_test, paired_samples=paired_samples,
                     planned=len(plan.cells))
        confirm_replacement(out)
        release_directory(out)
    if not report_only and not todo:  # not an empty request (refused above): everything was done before
        log.info("compare: all %d cells were already finished in %s; the report was rewritten", len(plan.cells), out)
    return {"rows": rows, "ran": len(todo), "skipped": len(plan.cells) - len(todo), "planned": len(plan.cells),
            "notes": plan.notes, "seconds": time.perf_counter() - started}


def _finished_text(finished: int, planned: int) -> str:
    """``12 of 40 cells finished; 28 missing`` (``all 40 cells finished`` when none is missing)."""
    if finished == planned:
        return f"all {planned} cells finished"
    return f"{finished} of {planned} cells finished; {planned - finished} missing"


def _claim(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    record = out / "compare.json"
    # a compare report always continues (finished cells are reused), so it is claimed with resume on
    if claim_directory(out, record, "compare report", resume=not overwrite, overwrite=overwrite, out_flag="--out"):
        old = json.loads(record.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(settings))
        # adding inits is fine (their cells are new); changing a path of an existing name is not
        old_inits, new_inits = old.get("inits", {}), new.get("inits", {})
        ignore = {f"inits.{n}" for n in set(old_inits) ^ set(new_inits)}
        # a report made before the adaptation curve existed: its cells have none, new cells add it
        ignore |= {k for k in ("curve", "curve_beam", "curve_seeds") if k not in old}
        details = describe_changes(old, new, ignore=ignore, limit=4)
        if details:
            raise UserError(f"{out}: its finished cells were made with other settings ({details}); "
                            "use another --out or pass --overwrite")
        settings = {**settings, "inits": {**old_inits, **new_inits}}
    atomic_write_text(record, json.dumps(settings, indent=2))
    return settings


def load_rows(out: Path, cells: list[tuple[str, str, str, int]]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        path = out / "cells" / f"{cell_name(*cell)}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows


def curve_columns(curve: list[int]) -> list[str]:
    return [f"nll_at_{k}" for k in curve] + [f"chrf_at_{k}" for k in curve]


def write_csv(out: Path, rows: list[dict[str, Any]], curve: Optional[list[int]] = None,
              significance: Optional[dict[tuple[str, str, str], dict[str, float]]] = None) -> Path:
    """``results.csv``: one row per cell; ``n_seeds`` and the Holm-corrected ``p_*`` of the row's
    (init, lang, budget) against the reference init (empty for the reference and where untested);
    the adaptation curve as ``nll_at_K`` / ``chrf_at_K``."""
    path = out / "results.csv"
    tmp = path.with_name(".tmp-results.csv")
    curve = list(curve or [])
    counts: dict[tuple[str, str, str], int] = {}
    for row in rows:
        key = (row["init"], row["lang"], row["budget"])
        counts[key] = counts.get(key, 0) + 1
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=REQUIRED_COLUMNS + EXTRA_COLUMNS + SIGNIFICANCE_COLUMNS + curve_columns(curve),
                                extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            key = (row["init"], row["lang"], row["budget"])
            flat = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}
            flat["n_seeds"] = counts[key]
            for metric, p in (significance or {}).get(key, {}).items():
                flat[f"p_{metric}"] = "" if math.isnan(p) else f"{p:.4g}"
            for k, point in (row.get("curve") or {}).items():
                flat[f"nll_at_{k}"], flat[f"chrf_at_{k}"] = f"{point['nll']:.4f}", f"{point['chrf']:.4f}"
            writer.writerow(flat)
    tmp.replace(path)
    return path


def format_mean_ci(values: list[float], digits: int = 2) -> str:
    """``mean ± half-width of the 95% Student t interval``; the mean alone for one value."""
    mean, half = mean_ci95(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    """(init, lang, budget) -> metric -> values over seeds (``nll_at_K`` / ``chrf_at_K`` where the
    cell has an adaptation curve; rows read back from results.csv work too)."""
    table: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for row in rows:
        entry = table.setdefault((row["init"], row["lang"], row["budget"]), {})
        for key in ("bleu", "chrf", "nll", "steps", "seconds"):
            entry.setdefault(key, []).append(float(row[key]))
        points = row.get("curve") or {}
        for k, point in points.items():
            for metric in ("nll", "chrf"):
                entry.setdefault(f"{metric}_at_{k}", []).append(float(point[metric]))
        if not points:  # a CSV row
            for key, value in row.items():
                if key.startswith(("nll_at_", "chrf_at_")) and value not in ("", None):
                    entry.setdefault(key, []).append(float(value))
    return table


def significance(rows: list[dict[str, Any]], reference: str, references: dict[str, list[str]],
                 paired_test: str = "bs", paired_samples: int = 0
                 ) -> tuple[dict[tuple[str, str, str], dict[str, float]], int]:
    """(init, lang, budget) -> {"bleu", "chrf", "nll"}: Holm-corrected p-values of every init
    against ``reference`` in every cell where both have stored hypotheses (:mod:`.statistics`),
    and the resamples of the BLEU / chrF test (``paired_samples``, or 0: :func:`resamples_for` the
    number of comparisons). Each metric's family is all the (init, cell) comparisons of the report;
    ``raw_*`` keep the uncorrected values. Cells made before hypotheses were stored are left out (NaN)."""
    stored: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("hyps") is not None and row.get("sentence_nll") is not None:
            stored.setdefault((row["init"], row["lang"], row["budget"]), []).append(row)
    pairs = [(key, cells, stored[(reference, key[1], key[2])]) for key, cells in stored.items()
             if key[0] != reference and stored.get((reference, key[1], key[2]))]
    samples = paired_samples or resamples_for(paired_test, len(pairs), ALPHA)
    comparisons = []
    for (init, lang, budget), cells, base in pairs:
        refs = references[lang]
        if any(len(c["hyps"]) != len(refs) for c in (*cells, *base)):
            raise DataError(f"{lang} {budget}: the stored hypotheses do not match the {len(refs)} test segments; "
                            "were the cells made with another --max-test-segments?")
        comparisons.append(PairedComparison([c["hyps"] for c in base], [c["hyps"] for c in cells], refs,
                                            [c["sentence_nll"] for c in base], [c["sentence_nll"] for c in cells]))
    # one process per thread this report was given (the tests are a Python loop: threads do not help)
    found = paired_tests(comparisons, paired_test, samples, workers=torch.get_num_threads())
    tests = [(key, p) for (key, _, _), p in zip(pairs, found)]
    out: dict[tuple[str, str, str], dict[str, float]] = {key: {} for key, _ in tests}
    for metric in ("bleu", "chrf", "nll"):
        for (key, p), adjusted in zip(tests, holm([p[metric] for _, p in tests])):
            out[key][metric] = adjusted
            out[key][f"raw_{metric}"] = p[metric]
    return out, samples


def _shown_path(path: str, out: Path) -> str:
    """An init's folder as the report shows it: relative to the report where both lie in one folder
    (a study's ``inits/`` beside its ``report/``), so the report does not change when the folder moves."""
    if not path or path == RANDOM:
        return path
    folder, report = Path(path).resolve(), Path(out).resolve()
    return os.path.relpath(folder, report) if folder.is_relative_to(report.parent) else path


def _mark(p: Optional[float]) -> str:
    if p is None or math.isnan(p):
        return ""
    return f" (p={p:.3g}{'*' if p < ALPHA else ''})"


def write_report(out: Path, rows: list[dict[str, Any]], inits: list[str], langs: list[str], budgets: list[str],
                 notes: list[str], settings: dict[str, Any], reference: Optional[str] = None,
                 references: Optional[dict[str, list[str]]] = None, paired_test: str = "bs",
                 paired_samples: int = 0, planned: Optional[int] = None) -> None:
    """results.csv, results.md, bleu_vs_budget.png and adaptation_curve.png from the finished cells
    (their stored hypotheses and per-sentence NLL: nothing is translated again). ``planned``: the
    number of cells of the comparison; a report with fewer rows says how many are missing."""
    reference = reference or ("multi" if "multi" in inits else inits[0])
    curve = list(settings.get("curve") or [])
    sig, samples = (significance(rows, reference, references, paired_test, paired_samples) if references
                    else ({}, paired_samples or DEFAULT_SAMPLES[paired_test]))
    write_csv(out, rows, curve, sig)
    table = summarize(rows)
    lines = ["# Initializations compared on low-resource languages", "",
             f"BLEU and chrF (sacreBLEU: {rows[0]['bleu_signature'] if rows else '-'}; "
             f"{rows[0]['chrf_signature'] if rows else '-'}) of beam-{settings['num_beams']} decoding of each "
             "language's test set, mean ± the half-width of the 95% Student t interval over the n fine-tuning seeds "
             "(t(0.975, n-1): 4.30 at n = 3; none at n = 1); NLL is the test cross-entropy in nats per "
             "target token (lower is better). Budgets in English words; 0 = zero-shot.", ""]
    if planned is not None and len(rows) < planned:
        lines += [f"**Partial report: {_finished_text(len(rows), planned)}** (still running, or not run yet: "
                  "the same command without `--report-only` runs them).", ""]
    lines += ["| lang | budget | init | BLEU | chrF | NLL | updates | seconds | n |",
              "|---|---|---|---|---|---|---|---|---|"]
    for lang in langs:
        for budget in budgets:
            for init in inits:
                m = table.get((init, lang, budget))
                if not m:
                    continue
                lines.append(f"| {lang} | {budget} | {init} | {format_mean_ci(m['bleu'])} | {format_mean_ci(m['chrf'])} "
                             f"| {format_mean_ci(m['nll'], 3)} "
                             f"| {np.mean(m['steps']):.0f} | {np.mean(m['seconds']):.1f} | {len(m['bleu'])} |")
    others = [i for i in inits if i != reference]
    if others and any(table.get((reference, lang, b)) for lang in langs for b in budgets):
        lines += ["", f"## Each init minus {reference} (difference of the means; Holm-corrected p)", "",
                  f"Paired tests per cell against **{reference}** on the same test sentences: BLEU and chrF by "
                  f"sacreBLEU's {TESTS[paired_test]} ({samples} samples, seed 12345) over test sentences, each "
                  "sentence's sufficient statistics averaged over an init's seeds; NLL by a paired sign-flip "
                  f"permutation test ({NLL_RESAMPLES} resamples) on per-sentence NLL averaged over seeds. "
                  f"p-values are Holm-corrected over the {len(sig)} (init, cell) comparisons of this report, per "
                  f"metric; `*` marks p < {ALPHA}. Cells without stored hypotheses have no p. The tests resample "
                  "sentences, not fine-tuning seeds: a small p says these fine-tuned systems differ on this test "
                  "set; how much a gap moves between seeds is in the intervals above (with n = 1 there is none, "
                  "and a significant gap may be one fine-tune's early stop rather than its init).", "",
                  "| lang | budget | init | n | Δ BLEU | Δ chrF | Δ NLL |", "|---|---|---|---|---|---|---|"]
        for lang in langs:
            for budget in budgets:
                a = table.get((reference, lang, budget))
                for other in others:
                    b = table.get((other, lang, budget))
                    if a and b:
                        d = {k: float(np.mean(b[k]) - np.mean(a[k])) for k in ("bleu", "chrf", "nll")}
                        p = sig.get((other, lang, budget), {})
                        lines.append(f"| {lang} | {budget} | {other} | {len(b['bleu'])} vs {len(a['bleu'])} "
                                     f"| {d['bleu']:+.2f}{_mark(p.get('bleu'))} | {d['chrf']:+.2f}{_mark(p.get('chrf'))} "
                                     f"| {d['nll']:+.3f}{_mark(p.get('nll'))} |")
    if curve and any(f"nll_at_{curve[-1]}" in m for m in table.values()):
        lines += ["", "## Adaptation curve (test NLL / chrF after k fine-tuning updates)", "",
                  f"The same recipe and seeds, a fixed learning rate and no early stopping, scored after "
                  f"{', '.join(map(str, curve))} updates (beam {settings.get('curve_beam', 1)}"
                  + (f", the first {settings['curve_segments']} test segments" if settings.get("curve_segments") else "")
                  + "); mean ± 95% t interval "
                  "over seeds. `adaptation_curve.png` plots both.", "",
                  "| lang | budget | init | n | " + " | ".join(f"NLL / chrF at {k}" for k in curve) + " |",
                  "|---|---|---|---|" + "---|" * len(curve)]
        for lang in langs:
            for budget in budgets:
                for init in inits:
                    m = table.get((init, lang, budget), {})
                    if f"nll_at_{curve[-1]}" not in m:
                        continue
                    cells = [f"{format_mean_ci(m.get(f'nll_at_{k}', []), 3)} / {format_mean_ci(m.get(f'chrf_at_{k}', []), 1)}"
                             for k in curve]
                    lines.append(f"| {lang} | {budget} | {init} | {len(m[f'nll_at_{curve[-1]}'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Compute of each initialization (meta-training / pre-training)", "",
              "All of an initialization's training is counted, a warm start's included.", "",
              "| init | source | steps | sentence pairs | target tokens | seconds | of which warm start (steps / pairs) |",
              "|---|---|---|---|---|---|---|"]
    for init in inits:
        first_row = next((r for r in rows if r["init"] == init), None)
        src = _shown_path(settings["inits"].get(init, ""), out)
        if first_row is None:
            continue
        lines.append(f"| {init} | {src} | {first_row['init_steps']} | {first_row['init_pairs']} | {first_row['init_tokens']} "
                     f"| {_num(first_row['init_seconds'])} | {_warm_start_text(first_row)} |")
    recipe = settings["recipe"]
    total = sum(float(r["seconds"]) for r in rows)
    lines += ["", "## Fine-tuning recipe (identical for every init; the seed is each row's)", "",
              "`" + json.dumps(recipe) + "`", "", f"dev set for early stopping: {settings['dev'] or 'none (all planned updates, last model)'}",
              "", f"{_finished_text(len(rows), planned) if planned is not None else f'{len(rows)} cells'}, "
              f"{total:.0f} s of cell wall time in all.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    plot(out / "bleu_vs_budget.png", table, inits, langs, budgets)
    if curve and any(f"nll_at_{curve[-1]}" in m for m in table.values()):
        plot_curve(out / "adaptation_curve.png", table, inits, langs, budgets, curve)


def _warm_start_text(row: dict[str, Any]) -> str:
    steps, pairs = row.get("init_warm_start_steps", ""), row.get("init_warm_start_pairs", "")
    return "–" if steps in ("", None) else f"{steps} / {pairs}"


def _num(value: Any) -> str:
    try:
        return f"{float(value):.0f}"
    except (TypeError, ValueError):
        return "–"


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Write a PNG under a temporary name and rename it into place (a killed run leaves the old plot)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


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
    return save_figure(fig, path, dpi=120)


def plot_curve(path: Path, table: dict[tuple[str, str, str], dict[str, list[float]]], inits: list[str],
               langs: list[str], budgets: list[str], curve: list[int]) -> Path:
    """The adaptation curve: for each language a row of test NLL and a row of test chrF against
    fine-tuning updates, one panel per fine-tuned budget (column), one line per init with its 95%
    Student t band over seeds. Both metrics, because they can part ways: on a few hundred pairs the
    NLL rises from the first updates (the model grows over-confident) while chrF still climbs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = [b for b in budgets if budget_words(b) != 0
             and any(f"nll_at_{curve[-1]}" in table.get((i, lang, b), {}) for i in inits for lang in langs)]
    metrics = [("nll", "test NLL (nats/token)"), ("chrf", "test chrF")]
    panels = [(lang, metric, label) for lang in langs for metric, label in metrics]
    rows, cols = max(1, len(panels)), max(1, len(tuned))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (lang, metric, label) in enumerate(panels):
        for c, budget in enumerate(tuned):
            ax = axes[r][c]
            for index, init in enumerate(inits):
                m = table.get((init, lang, budget), {})
                xs, ys, lo, hi = [], [], [], []
                for k in curve:
                    mean, half, _ = t_interval(m.get(f"{metric}_at_{k}", []))
                    if not math.isnan(mean):
                        half = 0.0 if math.isnan(half) else half
                        xs.append(k), ys.append(mean), lo.append(mean - half), hi.append(mean + half)
                if xs:
                    color = colors[index % len(colors)]
                    ax.plot(xs, ys, marker="o", color=color, label=init)
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            ax.set_xscale("symlog", linthresh=max(1, min([k for k in curve if k > 0], default=1)))
            ax.set_xticks(curve, [str(k) for k in curve])
            ax.set_title(f"{lang} {budget}", fontsize=9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == rows - 1:
                ax.set_xlabel("fine-tuning updates")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        axes[0][-1].legend(list(handles.values()), list(handles), fontsize=7)
    return save_figure(fig, path, dpi=110)
