"""A study's cells: one ``compare`` folder per test language (so that several processes can run
languages side by side, each folder locked by its writer), gathered into one report folder.

Every language's folder is made with the same settings (the languages are not part of them), so
gathering copies finished cells next to one another and ``compare --report-only`` over every
language computes the report, p-values and Holm correction included, from the stored hypotheses
and per-sentence NLL, without translating again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..evaluation.compare import budget_words, cell_name, compare, plan_cells
from .folder import cells_dir, init_dir, read_json, report_dir
from .rule import length_of
from .spec import Study


def compare_arguments(study: Study, out: Path, langs: list[str], folder: Path, device: str) -> dict[str, Any]:
    """``compare``'s arguments for the study's cells of ``langs`` in ``folder``: the budgets any of
    them has cells for (Latvian has no 40k cell once its 16k uses the whole pool, and a compare of
    Latvian alone would refuse a budget without a cell)."""
    sf = study.file
    cells = {(lang, budget) for _, lang, budget, _ in _study_plan(study)}
    return dict(
        inits=[(name, str(init_dir(out, name))) for name in study.order()], data_root=study.data_root, langs=langs,
        budgets=[b for b in sf.budgets if any((lang, b) in cells for lang in langs)], seeds=sf.seeds, out=folder,
        recipe=length_of(study, out), scratch=sf.scratch_seeds > 0,
        scratch_seeds=sf.scratch_seeds or None, test_pattern=sf.data.test, finetune_pattern=sf.data.finetune,
        num_beams=sf.decoding.beam, max_test_segments=sf.decoding.test_segments, curve=sf.curve.points,
        curve_seeds=sf.curve.seeds if sf.curve.points else None, curve_segments=sf.curve.segments,
        reference=sf.reference, paired_test=sf.paired_test, device=device)


def _study_plan(study: Study) -> list[tuple[str, str, str, int]]:
    """Every cell of the study, (init, lang, budget, seed): zero-shot, fine-tuned and from-scratch.
    Planned over all its languages at once: a budget that one language cannot fill is that
    language's note, not an error."""
    sf = study.file
    names = study.order() + (["scratch"] if sf.scratch_seeds else [])
    return plan_cells(names, {"scratch"} if sf.scratch_seeds else set(), study.data_root, study.langs, sf.budgets,
                      sf.seeds, sf.data.finetune, sf.scratch_seeds or None).cells


def _plan(study: Study, lang: str) -> list[tuple[str, str, str, int]]:
    """The language's cells."""
    return [cell for cell in _study_plan(study) if cell[1] == lang]


def planned_cells(study: Study, lang: str) -> int:
    """How many cells the language has (zero-shot, fine-tuned and from-scratch)."""
    return len(_plan(study, lang))


def count_finished(out: Path, lang: str) -> int:
    """How many of the language's cells are finished (their files, not read)."""
    folder = cells_dir(out, lang) / "cells"
    return sum(1 for _ in folder.glob("*.json")) if folder.is_dir() else 0


def cells_at(out: Path, lang: str) -> list[str]:
    """The cells the language's process is at (their fine-tune folders exist in ``work/`` and they are
    not finished), e.g. ``["meta lv 16k s0"]``."""
    work, done = cells_dir(out, lang) / "work", cells_dir(out, lang) / "cells"
    names = {p.name.removesuffix("__curve") for p in work.iterdir() if p.is_dir()} if work.is_dir() else set()
    return [name.replace("__", " ") for name in sorted(names) if not (done / f"{name}.json").is_file()]


def finished_cells(out: Path, lang: str) -> list[dict[str, Any]]:
    folder = cells_dir(out, lang) / "cells"
    return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def seconds_left(study: Study, out: Path, lang: str, finished: list[dict[str, Any]]) -> Optional[float]:
    """The language's unfinished cells, in seconds at the rates the ``finished`` cells (of every
    language) measured; None while a rate it needs is unmeasured.

    A cell's cost is not one mean: at a fixed fine-tuning length its updates grow with its budget
    (a 16k cell fine-tunes about four times as long as a 4k one), so the estimate is the planned
    updates x the measured seconds per update, plus the measured seconds to score a cell and, for a
    cell with an adaptation curve, to draw it. The planned updates are the budget's English words x
    the updates per word of the language's finished cells (of every language's before it has any),
    at most the rule's ``max_steps``; a budget of the whole pool is taken at ``max_steps``."""
    tuned = [c for c in finished if int(c.get("steps") or 0) > 0 and c.get("words")]
    scored = [float(c.get("eval_seconds") or 0.0) for c in finished]
    curves = [float(c["curve_seconds"]) for c in finished if c.get("curve_seconds")]
    own = [c for c in tuned if c.get("lang") == lang] or tuned
    per_update = (sum(float(c.get("finetune_seconds") or 0.0) for c in tuned) / sum(int(c["steps"]) for c in tuned)
                  if tuned else None)
    per_word = sum(int(c["steps"]) for c in own) / sum(int(c["words"]) for c in own) if own else None
    sf = study.file
    done = {p.stem for p in (cells_dir(out, lang) / "cells").glob("*.json")}
    total = 0.0
    for init, _, budget, seed in _plan(study, lang):
        if cell_name(init, lang, budget, seed) in done:
            continue
        if not scored:
            return None
        total += sum(scored) / len(scored)
        words = budget_words(budget)
        if words == 0:
            continue  # zero-shot: scored only
        if per_update is None or per_word is None:
            return None
        updates = sf.finetune.max_steps if words is None else min(sf.finetune.max_steps, round(per_word * words))
        total += updates * per_update
        if sf.curve.points and seed < sf.curve.seeds:
            if not curves:
                return None
            total += sum(curves) / len(curves)
    return total


def run_language(study: Study, out: Path, lang: str, device: str = "cpu") -> dict[str, Any]:
    return compare(**compare_arguments(study, out, [lang], cells_dir(out, lang), device))


def gather(study: Study, out: Path) -> Path:
    """Copy every language's finished cells into ``report/`` (all made with one set of settings)."""
    dest = report_dir(out)
    records = {lang: read_json(cells_dir(out, lang) / "compare.json") for lang in study.langs
               if (cells_dir(out, lang) / "compare.json").is_file()}
    missing = [lang for lang in study.langs if lang not in records]
    if missing:
        raise UserError(f"{out}: the cells of {' '.join(missing)} have not been run; run the study without --report-only")
    first = next(iter(records.values()))
    different = [lang for lang, record in records.items() if record != first]
    if different:
        raise UserError(f"{out}/cells: {' '.join(different)} were made with other settings than {study.langs[0]}")
    (dest / "cells").mkdir(parents=True, exist_ok=True)
    mine = dest / "compare.json"
    if mine.is_file() and read_json(mine) != first:
        mine.unlink()  # the cells were redone with other settings: the report folder follows them
        shutil.rmtree(dest / "cells")
        (dest / "cells").mkdir()
    if not mine.is_file():
        shutil.copy2(cells_dir(out, study.langs[0]) / "compare.json", mine)
    for lang in study.langs:
        for cell in sorted((cells_dir(out, lang) / "cells").glob("*.json")):
            target = dest / "cells" / cell.name
            if not target.is_file() or target.read_bytes() != cell.read_bytes():
                shutil.copy2(cell, target)
    return dest


def report_cells(study: Study, out: Path, device: str = "cpu") -> dict[str, Any]:
    """compare's report (results.csv, results.md, plots) over every language's finished cells."""
    folder = gather(study, out)
    return compare(**{**compare_arguments(study, out, study.langs, folder, device), "report_only": True})
