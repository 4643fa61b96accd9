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

``--overwrite`` deletes nothing up front: it moves the previous contents aside, into the hidden
folder ``.metanmt-replaced/`` of the same folder (renames only), and deletes them once the new run
has written its first checkpoint (:func:`confirm_replacement`). A new run that fails before that
moves them back (:func:`restore_replaced`, any exception, Ctrl-C included); one killed outright
(SIGKILL, a power cut) leaves the aside folder, and the next metanmt command that claims or reads
the folder finds it and restores it (:func:`recover_replacement`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import files
from .. import registry
from ..config import RunConfig, dump_config, from_dict, read_yaml
from ..errors import UserError
from ..locking import LOCK_FILE, FolderLock

log = logging.getLogger(__name__)
CONFIG_FILE = "metanmt.yaml"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# keys that may change between a run and its resumption: bookkeeping and the length of the run, which
# change nothing it computes, and the non-finite policy, so that a run stopped by NonFiniteError under
# "stop" continues from its last good checkpoint with "skip", as the error says (up to that step both
# policies train identically)
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.save_every", "train.keep_checkpoints", "train.trackers",
                     "train.collective_timeout_minutes", "train.on_nonfinite"}


def atomic_write_text(path: Path, text: str) -> None:
    files.atomic_write_text(path, text)


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


def with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """A saved or new run config with every key the current schema knows, absent ones at their default.

    A run saved before a key existed computes what that key's default computes (new keys default to
    the earlier behaviour), so resuming it with a newer metanmt is not a change; the family's
    ``task``/``model`` sections are filled from its own schema. ``suite`` is the path the task keys
    were read from, compared through those keys instead (a moved checkout is not a different run).
    Settings the current schema refuses are returned as they are, and then differ visibly."""
    try:
        out = from_dict(RunConfig, settings).to_dict()
        family = registry.task_family(out["family"]) if out.get("family") else None
    except (UserError, KeyError, ImportError):
        return settings
    if family is not None:
        for section, schema in (("task", getattr(family, "TaskConfig", None)), ("model", getattr(family, "ModelConfig", None))):
            if schema is None:
                continue
            try:
                out[section] = dataclasses.asdict(from_dict(schema, out[section], section))
            except UserError:
                pass
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any], ignore: set[str] = frozenset(), limit: int = 5) -> str:
    """``"key: old -> new; ..."`` for the keys whose values differ between two nested settings ("" if none)."""
    a, b = flatten(old), flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)
    return "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:limit])


#: what metanmt writes into its output folders, by kind; ``--overwrite`` replaces a folder only when
#: every entry is one of these (or a name recorded in WRITTEN_FILE by :func:`export_files`)
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "inner_lrs.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "spm.model", "language_embeddings.safetensors",
               "language_embeddings.json"}
WRITTEN_FILE = ".metanmt-files"
#: ``--overwrite``'s aside folders inside the output folder: REPLACING while the previous contents
#: are being moved in (a kill then leaves some of them outside, none of the new run's), REPLACED once
#: all are in (everything else but the lock is then the new run's), DISCARD once the new run has its
#: first checkpoint (deleted: the replacement is final)
REPLACING, REPLACED, DISCARD = ".metanmt-replacing", ".metanmt-replaced", ".metanmt-discard"
ASIDE = (REPLACING, REPLACED, DISCARD)
TOOLKIT_ENTRIES: dict[str, set[str]] = {
    "run": {CONFIG_FILE, CHECKPOINTS, "best", "logs", "history.jsonl", *MODEL_FILES},
    "fine-tune": {CONFIG_FILE, CHECKPOINTS, "finetune.json", *MODEL_FILES},
    "compare report": {"compare.json", "cells", "work", "results.csv", "results.md", "bleu_vs_budget.png"},
    "study": {"study.json", "inits", "inner", "rule.json", "cells", "report", "logs"},
}
_HELD: dict[Path, FolderLock] = {}
_REPLACING: set[Path] = set()  # folders whose previous contents this process holds aside, unconfirmed


def foreign_entries(out: Path, kind: str) -> list[str]:
    """Names in ``out`` that metanmt did not write for a ``kind`` (sorted)."""
    known = TOOLKIT_ENTRIES.get(kind, set()) | {LOCK_FILE, WRITTEN_FILE, *ASIDE}
    written = out / WRITTEN_FILE
    if written.is_file():
        try:
            known |= set(json.loads(written.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    return sorted(p.name for p in out.iterdir() if p.name not in known and not p.name.startswith((".tmp-", ".old-")))


def inspect_directory(
    out: Path, marker: Path, kind: str, resume: bool, overwrite: bool, foreign: str = "", out_flag: str = "--output-dir"
) -> bool:
    """Decide whether ``out`` may be claimed for a ``kind`` whose ``marker`` file identifies it,
    without touching anything (but for putting back what an interrupted ``--overwrite`` had set
    aside, :func:`recover_replacement`, so that the folder is judged as the user left it); raise
    UserError if not. Returns True when ``out`` holds an earlier ``kind`` to continue (the caller
    then checks that its settings match).

    An empty or missing folder may be taken; a folder in use by another live process is refused;
    ``overwrite`` may replace a folder only when everything in it was written by metanmt for this
    kind (a ``notes.txt`` is never deleted); a non-empty folder without the marker, or one holding
    a ``kind`` while ``resume`` is off, is refused.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    files.check_output_dir(out, out_flag)
    if not out.is_dir():
        _check_writable(out, out_flag)
        return False
    FolderLock(out).check()
    recover_replacement(out)  # an --overwrite killed before the new run's first checkpoint: restored first
    if not [p for p in out.iterdir() if p.name != LOCK_FILE]:
        _check_writable(out, out_flag)
        return False
    if overwrite:
        strangers = foreign_entries(out, kind)
        if strangers:
            shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
            raise UserError(f"{out}: holds {shown}, which metanmt did not write; --overwrite only replaces "
                            f"{foreign or 'a ' + kind} (move those away or choose another {out_flag})")
        _check_writable(out, out_flag)
        return False
    if not marker.is_file():
        raise UserError(f"{out}: exists and is not {foreign or 'a ' + kind}; choose another {out_flag} or pass --overwrite")
    if not resume:
        raise UserError(f"{out}: already holds a {kind}; pass --resume to continue it or --overwrite to replace it")
    _check_writable(out, out_flag)
    return True


def _check_writable(out: Path, out_flag: str) -> None:
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{out_flag} {out}: {existing} is not writable; choose another {out_flag}")


def take_directory(out: Path, overwrite: bool, lock: bool = True) -> bool:
    """Create ``out``, lock it for this process and, with ``overwrite``, move its contents aside
    (after :func:`inspect_directory` allowed it; see the module docstring). Returns True when this
    call created the folder."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if lock:
        held = _HELD.get(out.resolve()) or FolderLock(out)
        held.acquire()
        _HELD[out.resolve()] = held
    if overwrite:
        if out.resolve() in _REPLACING:  # replaced twice by this process: the first new run was never confirmed
            for entry in out.iterdir():
                if entry.name not in (LOCK_FILE, *ASIDE):
                    _remove(entry)
        else:
            _restore(out)  # a leftover of an earlier killed --overwrite (normally restored by inspect_directory)
            _set_aside(out)
    return created


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _set_aside(out: Path) -> None:
    """Move every entry of ``out`` but the lock into ``out/REPLACED``, by renames (one file system)."""
    entries = [e for e in out.iterdir() if e.name not in (LOCK_FILE, *ASIDE)]
    if not entries:
        return
    staging = out / REPLACING
    staging.mkdir()
    try:
        for entry in entries:
            os.replace(entry, staging / entry.name)
        os.replace(staging, out / REPLACED)  # from here on, everything else in `out` is the new run's
    except BaseException:
        _restore(out)
        raise
    _REPLACING.add(out.resolve())


def replacing(out: Path) -> bool:
    """This process has moved ``out``'s previous contents aside and its new run has no checkpoint yet."""
    return Path(out).resolve() in _REPLACING


def confirm_replacement(out: Path) -> None:
    """The new run in ``out`` has written its first checkpoint: delete the previous contents that
    ``--overwrite`` set aside (a no-op when there are none). Renamed to DISCARD first, so that a
    kill during the deletion is finished by the next start instead of restoring them."""
    out = Path(out)
    if out.resolve() not in _REPLACING:
        return
    _REPLACING.discard(out.resolve())
    aside = out / REPLACED
    if aside.is_dir():
        os.replace(aside, out / DISCARD)
    shutil.rmtree(out / DISCARD, ignore_errors=True)


def restore_replaced(out: Path) -> bool:
    """After a failure of the new run before its first checkpoint: remove what it wrote into ``out``,
    move the previous contents back, and release the lock. False (and nothing done) when this
    process holds no previous contents of ``out`` aside."""
    out = Path(out)
    if out.resolve() not in _REPLACING:
        return False
    _REPLACING.discard(out.resolve())
    try:
        _restore(out)
    finally:
        release_directory(out)
    log.warning("%s: the new run stopped before its first checkpoint; the previous contents are back", out)
    return True


@contextlib.contextmanager
def restore_on_failure(out: Path) -> Iterator[None]:
    """Around the work of a command that claimed ``out`` with ``--overwrite``: on any exception
    before :func:`confirm_replacement`, the previous contents come back (:func:`restore_replaced`)."""
    try:
        yield
    except BaseException:
        restore_replaced(out)
        raise


#: what the new run may have written before its first checkpoint: the names of every kind of folder
_ANY_KIND = set().union(*TOOLKIT_ENTRIES.values()) | {WRITTEN_FILE}


def _restore(out: Path) -> bool:
    """Undo or finish an ``--overwrite`` of ``out`` from what its aside folders say (the caller holds
    the lock): DISCARD is deleted; REPLACED means the new run never confirmed, so what it wrote is
    removed and the previous contents move back; REPLACING means the move was cut short, before the
    new run wrote anything, so what was moved goes back. True when something was restored."""
    shutil.rmtree(out / DISCARD, ignore_errors=True)
    source = next((out / name for name in (REPLACED, REPLACING) if (out / name).is_dir()), None)
    if source is None:
        return False
    if source.name == REPLACED:
        written = set(_ANY_KIND)
        try:
            written |= set(json.loads((out / WRITTEN_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            pass
        for entry in out.iterdir():  # the new run's; a file the user added meanwhile stays
            if entry.name in written or entry.name.startswith((".tmp-", ".old-")):
                _remove(entry)
    kept = []
    for entry in source.iterdir():
        target = out / entry.name
        if target.exists() or target.is_symlink():
            kept.append(entry.name)
            continue
        os.replace(entry, target)
    if kept:
        log.warning("%s: %s stay in %s: the folder holds other files of those names", out, ", ".join(kept), source)
    else:
        source.rmdir()
    return True


def recover_replacement(out: Path) -> bool:
    """Find what an ``--overwrite`` killed outright (SIGKILL, a power cut) left in ``out`` and restore
    the previous contents (or finish deleting them, when the new run had confirmed). Does nothing
    while another live process holds the folder (raises UserError, as :meth:`FolderLock.check`) or
    while this process is replacing it. True when the previous contents were restored."""
    out = Path(out)
    if out.resolve() in _REPLACING or not any((out / name).exists() for name in ASIDE):
        return False
    held = _HELD.get(out.resolve())
    lock = held or FolderLock(out)
    if held is None:
        lock.acquire()  # raises while a live process holds it; a dead owner's lock is taken over
    try:
        restored = _restore(out)
    finally:
        if held is None:
            lock.release()
    if restored:
        log.warning("%s: restored the previous contents, which an interrupted --overwrite had moved to %s "
                    "(its new run stopped before its first checkpoint)", out, REPLACED)
    return restored


def release_directory(out: Path) -> None:
    """Give up this process's lock on ``out`` (a no-op when it holds none)."""
    held = _HELD.pop(Path(out).resolve(), None)
    if held is not None:
        held.release()


def undo_claim(out: Path, kind: str, created: bool) -> None:
    """After a failure before anything worth keeping was written: remove what metanmt wrote into
    ``out`` (and ``out`` itself if this run created it), so the corrected rerun is not refused; with
    ``--overwrite``, the previous contents come back instead (:func:`restore_replaced`)."""
    if restore_replaced(out):
        return
    if out.is_dir() and not foreign_entries(out, kind):
        for entry in out.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    release_directory(out)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


def claim_directory(
    out: Path, marker: Path, kind: str, resume: bool, overwrite: bool, foreign: str = "", out_flag: str = "--output-dir"
) -> bool:
    """:func:`inspect_directory`, then :func:`take_directory`: check everything about ``out``, then
    lock it (and with ``overwrite`` move its contents aside, deleted at :func:`confirm_replacement`). Returns True when ``out`` holds an earlier ``kind``
    to continue. Callers check their other inputs first: nothing is removed before this call."""
    continuing = inspect_directory(out, marker, kind, resume, overwrite, foreign, out_flag)
    take_directory(out, overwrite)
    return continuing


def inspect_output_dir(output_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix two different runs in one directory (unless ``overwrite``); touches nothing.
    Returns True when ``output_dir`` holds this run to continue."""
    saved = output_dir / CONFIG_FILE
    continuing = inspect_directory(output_dir, saved, "run", resume, overwrite, foreign="a metanmt run")
    if continuing:
        before = with_defaults(read_yaml(saved))
        details = describe_changes(before, with_defaults(cfg.to_dict()),
                                   ignore=RESUMABLE_CHANGES | {"suite", "optim.cooldown_from"})
        if details:
            raise UserError(f"{output_dir}: holds a different run ({details}); pass --overwrite to replace it")
        check_cooldown_change(output_dir, int(before.get("optim", {}).get("cooldown_from") or 0),
                              cfg.optim.cooldown_from)
    return continuing


def check_cooldown_change(output_dir: Path, before: int, after: int) -> None:
    """A cooldown may be added, moved or removed on resume while the run has not reached it (the rates
    before a cooldown do not depend on where it starts: a stable run can be branched into cooldowns of
    several lengths, as in warmup-stable-decay training); once it has, its rates would change mid-way."""
    if before == after:
        return
    step = int(latest_trainer_state(output_dir).get("step", 0))
    starts = [c for c in (before, after) if c]
    if starts and step > min(starts):
        raise UserError(f"{output_dir}: optim.cooldown_from {before or 'none'} -> {after or 'none'}: the run's latest "
                        f"checkpoint is at update {step}, inside the cooldown already; resume it with "
                        f"optim.cooldown_from={before or 0}, or branch a copy of an earlier checkpoint")


def prepare_output_dir(output_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> bool:
    """:func:`inspect_output_dir`, then lock (and with ``overwrite`` clear, by setting the previous
    run aside) the folder and write the resolved config. Returns True when this call created the folder."""
    inspect_output_dir(output_dir, cfg, resume, overwrite)
    created = take_directory(output_dir, overwrite)
    try:
        atomic_write_text(output_dir / CONFIG_FILE, dump_config(cfg))
    except BaseException:
        restore_replaced(output_dir)
        raise
    return created


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


#: the model's state dict in a checkpoint folder: the trainer registers the model first for
#: checkpointing (trainer.py), and Accelerate numbers registered objects in that order
MODEL_STATE_FILE = "custom_checkpoint_0.pkl"


def model_state(checkpoint: Path) -> dict[str, Any]:
    """The model weights saved in a checkpoint folder (``checkpoints/step_N``), on the CPU."""
    import torch

    return torch.load(Path(checkpoint) / MODEL_STATE_FILE, map_location="cpu", weights_only=True)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def latest_trainer_state(output_dir: Path) -> dict:
    """``trainer_state.json`` of the run's latest checkpoint (step, seconds, pairs and tokens seen);
    ``{}`` before the first checkpoint."""
    latest = latest_checkpoint(Path(output_dir))
    return json.loads((latest / "trainer_state.json").read_text(encoding="utf-8")) if latest else {}


def run_finished(output_dir: Path) -> bool:
    """The run has a checkpoint at (or past) its config's ``train.steps``: a rerun trains nothing."""
    state = latest_trainer_state(output_dir)
    return bool(state) and int(state["step"]) >= load_run_config(output_dir).train.steps


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
    """Run ``write(tmp_dir)``, then rename each file it wrote into ``directory`` (file by file atomic).

    The names are recorded in ``WRITTEN_FILE``, so ``--overwrite`` knows them as metanmt's own; a
    failed write (a full disk) removes the temporary folder."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".tmp-export"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with files.library_write(tmp):  # a full disk inside safetensors or torch.save: one line naming the file
            write(tmp)
        names = sorted(item.name for item in tmp.iterdir())
        _record_written(directory, names)
        for item in tmp.iterdir():
            target = directory / item.name
            if item.is_dir():
                commit_directory(item, target)
            else:
                os.replace(item, target)
        tmp.rmdir()
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _record_written(directory: Path, names: list[str]) -> None:
    path = directory / WRITTEN_FILE
    old: list[str] = []
    if path.is_file():
        try:
            old = list(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            old = []
    if set(names) - set(old):
        atomic_write_text(path, json.dumps(sorted(set(old) | set(names))))


MANIFEST = "manifest.json"


def write_manifest(checkpoint: Path) -> None:
    """Record every file of a fully written checkpoint with its size (the last file written)."""
    sizes = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    atomic_write_text(checkpoint / MANIFEST, json.dumps(sizes, indent=1))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a file missing or truncated), or None if it is whole.

    Checkpoints written before manifests existed are checked by their trainer state and weights."""
    manifest = checkpoint / MANIFEST
    if manifest.is_file():
        try:
            sizes = dict(json.loads(manifest.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            return f"{MANIFEST} is unreadable ({exc})"
        for name, size in sizes.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            actual = path.stat().st_size
            if actual != size:
                return f"{name} has {actual} of its {size} bytes"
    else:
        state = checkpoint / "trainer_state.json"
        if not state.is_file():
            return "trainer_state.json is missing"
    for path in sorted(checkpoint.glob("*.safetensors")):
        problem = files.safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def run_folder_of(path: str | Path) -> Path:
    """The run folder a model path belongs to: ``RUN`` for ``RUN`` and for ``RUN/best``; else the path."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path.parent / CONFIG_FILE).is_file():
        return path.parent
    return path


def load_run_config(run_dir: str | Path) -> RunConfig:
    try:
        recover_replacement(Path(run_dir))  # a run an interrupted --overwrite had moved aside comes back
    except (UserError, OSError):
        pass  # in use by a live process, or not ours to write: read what is there
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a metanmt run directory (no {CONFIG_FILE})")
    return from_dict(RunConfig, read_yaml(path))


HISTORY_FILE = "history.jsonl"  # the trainer's log: one JSON record a line (train and validation)


def read_history(output_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The ``history.jsonl`` records of one kind ("train" or "validation"), last one per step, by step."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("kind") == kind:
                by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]
