"""Run directories: the exported model, the resolved config, and resumable checkpoints.

Layout of ``--output-dir``::

    metanmt.yaml                the resolved run config
    config.json, model.safetensors, (tokenizer files)    the latest model, ``from_pretrained``-ready
    inner_lrs.safetensors       learned inner learning rates (Meta-SGD runs only)
    best/                       the best model by validation score (when validation is on)
    checkpoints/step_00000500/  Accelerate state: model, optimizer, scheduler, RNGs, trainer state
    logs/                       tracker output (TensorBoard)

Every write goes to a temporary name first and is renamed into place, so a run killed while
writing leaves the previous checkpoint intact and ``--resume`` never sees a half-written one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig, dump_config, from_dict, read_yaml
from ..errors import UserError

CONFIG_FILE = "metanmt.yaml"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# keys that may change between a run and its resumption without changing what it computes
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.save_every", "train.keep_checkpoints", "train.trackers"}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``, so a difference names exactly its key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any], ignore: set[str] = frozenset(), limit: int = 5) -> str:
    """``"key: old -> new; ..."`` for the keys whose values differ between two nested settings ("" if none)."""
    a, b = flatten(old), flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)
    return "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:limit])


def claim_directory(
    out: Path, marker: Path, kind: str, resume: bool, overwrite: bool, foreign: str = "", out_flag: str = "--output-dir"
) -> bool:
    """Make ``out`` ours for a ``kind`` (run, fine-tune, ...) whose ``marker`` file identifies it.

    An empty or missing folder is taken; ``overwrite`` clears it; a non-empty folder without the
    marker, or one holding a ``kind`` while ``resume`` is off, is refused. Returns True when ``out``
    holds an earlier ``kind`` to continue (the caller then checks that its settings match).
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not marker.is_file():
            raise UserError(f"{out}: exists and is not {foreign or 'a ' + kind}; choose another {out_flag} or pass --overwrite")
        elif not resume:
            raise UserError(f"{out}: already holds a {kind}; pass --resume to continue it or --overwrite to replace it")
        else:
            return True
    out.mkdir(parents=True, exist_ok=True)
    return False


def prepare_output_dir(output_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two different runs in one directory (unless ``overwrite``)."""
    saved = output_dir / CONFIG_FILE
    if claim_directory(output_dir, saved, "run", resume, overwrite, foreign="a metanmt run"):
        details = describe_changes(read_yaml(saved), cfg.to_dict(), ignore=RESUMABLE_CHANGES)
        if details:
            raise UserError(f"{output_dir}: holds a different run ({details}); pass --overwrite to replace it")
    atomic_write_text(saved, dump_config(cfg))


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if not match:
        raise ValueError(f"not a checkpoint directory: {path}")
    return int(match.group(1))


def commit_directory(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` folder to ``final`` (replacing it) with renames only."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def export_files(directory: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)``, then rename each file it wrote into ``directory`` (file by file atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".tmp-export"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    for item in tmp.iterdir():
        target = directory / item.name
        if item.is_dir():
            commit_directory(item, target)
        else:
            os.replace(item, target)
    tmp.rmdir()


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a metanmt run directory (no {CONFIG_FILE})")
    return from_dict(RunConfig, read_yaml(path))
