"""Safe file writes and path checks shared by every command (no torch, no other metanmt layer).

- :func:`atomic_write_text` / :func:`atomic_write_bytes`: a temporary name, then a rename; the
  temporary file is removed when the write fails (a full disk leaves no ``.tmp-*`` behind).
- :func:`check_output_file` / :func:`check_output_dir`: an output path that is a folder where a
  file is expected (or the reverse) is refused before any work starts.
- :func:`refuse_same_file` / :func:`refuse_overlap`: no command writes over one of its own inputs
  (``translate --input a.txt --output a.txt``) and no output folder is, holds, or lies inside an
  input folder (``finetune RUN --output-dir RUN``). Paths are compared after resolving links
  (``os.path.samefile`` where both exist), so ``./a.txt``, ``a.txt`` and a symlink to it are one file.
- :func:`os_error_line`: the one line the CLI prints for a file-system error.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError

#: errors of the environment a user can fix (a full disk, a read-only folder, a wrong path); the CLI
#: prints one line for these, any other OSError keeps its traceback
USER_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT,
               errno.EEXIST, errno.ENAMETOOLONG, errno.ENOTEMPTY, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``.tmp-<name>`` and a rename; on failure nothing is left."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def same_path(a: str | Path, b: str | Path) -> bool:
    """One file or folder (links resolved); a path that does not exist yet compares by resolved name."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def is_inside(child: str | Path, parent: str | Path) -> bool:
    """``child`` is ``parent`` or lies under it (after resolving links)."""
    child, parent = Path(child).resolve(), Path(parent).resolve()
    return child == parent or parent in child.parents


def refuse_same_file(output: str | Path, inputs: Iterable[tuple[str, Optional[str | Path]]], out_flag: str) -> None:
    """Refuse when the output file is one of the inputs (``inputs``: (flag, path) pairs, None skipped)."""
    for flag, path in inputs:
        if path is not None and same_path(output, path):
            raise UserError(f"{out_flag} {output}: is the same file as {flag} {path}; the input would be overwritten, "
                            f"choose another {out_flag}")


def refuse_overlap(out_dir: str | Path, inputs: Iterable[tuple[str, Optional[str | Path]]], out_flag: str,
                   inside_ok: bool = False) -> None:
    """Refuse an output folder that is an input, holds an input, or (unless ``inside_ok``) lies inside an input folder."""
    for flag, path in inputs:
        if path is None:
            continue
        if same_path(out_dir, path) or is_inside(path, out_dir):
            raise UserError(f"{out_flag} {out_dir}: holds {flag} {path}; writing there could replace the input, "
                            f"choose another {out_flag}")
        if not inside_ok and Path(path).is_dir() and is_inside(out_dir, path):
            raise UserError(f"{out_flag} {out_dir}: lies inside {flag} {path}; choose a folder outside it")


def _existing_ancestor_file(path: Path) -> Optional[Path]:
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_output_file(path: str | Path, flag: str) -> None:
    """``path`` can become a file: not a folder, and no parent of it is a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; expected a file name")
    blocker = _existing_ancestor_file(path)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")


def check_output_dir(path: str | Path, flag: str) -> None:
    """``path`` can become a folder: not a file, and no parent of it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file; expected a folder")
    blocker = _existing_ancestor_file(path)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")


def os_error_line(exc: OSError) -> str:
    """``PATH: No space left on device (free some space, then rerun; ...)`` for the CLI."""
    where = exc.filename or ""
    if exc.filename2:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space and rerun (with --resume where the command has it)",
            errno.EROFS: "the file system is read-only; choose another output path",
            errno.EACCES: "no permission; choose another output path or fix the permissions",
            errno.EPERM: "not permitted; choose another output path or fix the permissions"}.get(exc.errno or 0, "")
    return f"{where + ': ' if where else ''}{reason}{' (' + hint + ')' if hint else ''}"


def safetensors_problem(path: str | Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (missing, truncated, bad header), else None.

    Reads only the header (8-byte length + JSON), so checking a large model costs nothing; a file
    cut short is found by comparing the tensors' end offset with the file size."""
    import json
    import struct

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"truncated (header of {length} bytes in a file of {size})"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"not a safetensors file ({exc})"
    if not isinstance(header, dict):
        return "not a safetensors file (bad header)"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)), default=0)
    if 8 + length + end > size:
        return f"truncated ({size} of {8 + length + end} bytes)"
    return None


def saved_model_problem(directory: str | Path) -> Optional[str]:
    """``FILE: what is wrong`` for a damaged ``save_pretrained`` folder (config.json unreadable, a
    weights file missing or cut short), else None; only headers are read."""
    import json

    directory = Path(directory)
    config = directory / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{config}: damaged, not valid JSON ({exc})"
    weights = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if config.is_file() and not weights and not index.is_file() and not any(directory.glob("*.bin")):
        return f"{directory / 'model.safetensors'}: missing; the folder has a config.json but no weights"
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            return f"{path}: {problem}"
    return None
