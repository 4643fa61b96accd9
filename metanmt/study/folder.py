"""A study's folder: its layout, its record of settings, and moving it to another machine.

    OUT/study.json                 the settings (the study file's values, the configs' text), the
                                   data's fingerprint, and where the folder and the data were
    OUT/inits/NAME/                each init's meta-training run (resumable)
    OUT/inits/NAME@UPDATE/         a warm start: NAME's model at UPDATE, with its trainer state
    OUT/inner/NAME.json            init NAME's inner loop, chosen on the dev language at its warm start
    OUT/rule.json                  the fine-tuning length chosen on the dev language
    OUT/cells/LANG/                one language's cells (a ``metanmt compare`` folder, resumable)
    OUT/report/                    every cell gathered, and the report: results.csv, results.md,
                                   the plots, report.html

The budgets may grow between starts (a later phase adds 16k and 40k to a finished 0/1k/4k study:
its cells are kept and the new ones run); any other change of the settings is refused.

A folder copied to another machine resumes there: paths inside it are found again from its new
place, and the data root (``--data-root``) may be elsewhere as long as its files are the same ones
(names and sizes: :func:`data_fingerprint`). Before resuming, the paths that runs and comparisons
recorded are rewritten (:func:`relocate`); a fine-tune interrupted mid-cell restarts that cell.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..engine.checkpoint import CONFIG_FILE, claim_directory, describe_changes
from ..errors import UserError
from ..files import atomic_write_text

RECORD = "study.json"


def init_dir(out: Path, name: str) -> Path:
    return out / "inits" / name


def warm_dir(out: Path, name: str, update: int) -> Path:
    return out / "inits" / f"{name}@{update}"


def inner_file(out: Path, name: str) -> Path:
    return out / "inner" / f"{name}.json"


def rule_file(out: Path) -> Path:
    return out / "rule.json"


def cells_dir(out: Path, lang: str) -> Path:
    return out / "cells" / lang


def report_dir(out: Path) -> Path:
    return out / "report"


def data_fingerprint(root: Path) -> str:
    """Names and sizes of every file under the data root: the same corpus wherever it lies."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _settings_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs, '' for nothing; budgets may grow (a later phase: 16k, 40k: the finished cells stay
    valid and new ones are added)."""
    new = json.loads(json.dumps(new))
    grown = set(old.get("budgets", [])) <= set(new.get("budgets", []))
    return describe_changes({**old, "budgets": None} if grown else old, {**new, "budgets": None} if grown else new,
                            limit=4)


def _check_data(out: Path, record: dict[str, Any], data_root: Path, fingerprint: str | None = None) -> None:
    if record["data_fingerprint"] != (fingerprint or data_fingerprint(data_root)):
        raise UserError(f"{out}: was made from other data than {data_root} (other file names or sizes); give "
                        "--data-root the study's corpus")


def check_settings(out: Path, settings: dict[str, Any], data_root: Path) -> None:
    """``out`` holds this study, made from this data, where it lies now (for a report of its finished
    cells, which reads the folder without claiming it)."""
    record = read_json(out / RECORD)
    details = _settings_changed(record["settings"], settings)
    if details:
        raise UserError(f"{out}: holds this study with other settings ({details})")
    _check_data(out, record, data_root)
    if record["folder"] != str(out.resolve()) or record["data_root"] != str(data_root):
        raise UserError(f"{out}: was moved (or its data was) since its last start; run the study once without "
                        "--report-only to take it up here")


def claim(out: Path, settings: dict[str, Any], data_root: Path, overwrite: bool) -> bool:
    """Lock ``out`` for this study (a folder of another study, or of the same study with other
    settings, is refused), relocate it if it was moved, and record the settings. Returns True
    when it continues an earlier start."""
    record = out / RECORD
    fingerprint = data_fingerprint(data_root)
    continuing = claim_directory(out, record, "study", resume=not overwrite, overwrite=overwrite, out_flag="--out")
    if continuing:
        old = read_json(record)
        details = _settings_changed(old["settings"], settings)
        if details:
            raise UserError(f"{out}: holds this study with other settings ({details}); use another --out or "
                            "pass --overwrite")
        _check_data(out, old, data_root, fingerprint)
        moved = {old["folder"]: str(out.resolve()), old["data_root"]: str(data_root)}
        moved = {a: b for a, b in moved.items() if a != b}
        if moved:
            relocate(out, moved)
    write_json(record, {"settings": settings, "data_fingerprint": fingerprint, "folder": str(out.resolve()),
                        "data_root": str(data_root)})
    return continuing


def _replace(value: Any, moved: dict[str, str]) -> Any:
    if isinstance(value, str):
        for old, new in moved.items():
            if value == old or value.startswith(old + "/"):
                return new + value[len(old):]
        return value
    if isinstance(value, dict):
        return {k: _replace(v, moved) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, moved) for v in value]
    return value


def relocate(out: Path, moved: dict[str, str]) -> None:
    """Rewrite the paths (old prefix -> new) that the study's runs and comparisons recorded, after the
    folder or the data moved; fine-tunes in progress are dropped (their records name the old paths)."""
    for config in (out / "inits").glob(f"*/{CONFIG_FILE}"):
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        atomic_write_text(config, yaml.safe_dump(_replace(data, moved), sort_keys=False))
    for record in [*(out / "cells").glob("*/compare.json"), report_dir(out) / "compare.json"]:
        if record.is_file():
            write_json(record, _replace(read_json(record), moved))
    for work in (out / "cells").glob("*/work"):
        shutil.rmtree(work, ignore_errors=True)
