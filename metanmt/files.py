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
- :func:`library_write`: a write failure inside torch.save or safetensors (a full disk, a file-size
  limit), which reaches Python as a RuntimeError or a SafetensorError without an errno, becomes the
  OSError it is (:func:`write_failure`), naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import UserError

#: errors of the environment a user can fix (a full disk, a read-only folder, a wrong path); the CLI
#: prints one line for these, any other OSError keeps its traceback
USER_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT,
               errno.EEXIST, errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


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
    rerun = "rerun (with --resume where the command has it)"
    hint = {errno.ENOSPC: f"free some space and {rerun}",
            getattr(errno, "EDQUOT", errno.ENOSPC): f"over the disk quota; free some space and {rerun}",
            errno.EFBIG: f"larger than {_size_limit_text()}; raise that limit or choose another output path, then {rerun}",
            errno.EROFS: "the file system is read-only; choose another output path",
            errno.EACCES: "no permission; choose another output path or fix the permissions",
            errno.EPERM: "not permitted; choose another output path or fix the permissions"}.get(exc.errno or 0, "")
    return f"{where + ': ' if where else ''}{reason}{' (' + hint + ')' if hint else ''}"


def _file_size_limit() -> Optional[int]:
    """This process's file-size limit in bytes (``ulimit -f``), None when there is none."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _size_limit_text() -> str:
    limit = _file_size_limit()
    return f"the file-size limit of {limit} bytes (ulimit -f)" if limit is not None else "the file system allows for one file"


#: what torch.save's C++ writer raises when a write fails, as a RuntimeError without the errno: in
#: torch 2.13, under a full disk and under a file-size limit alike, "[enforce fail at
#: inline_container.cc:672] . unexpected pos 576 vs 534" (its context: "basic_ios::clear: iostream
#: error"); "file write failed" and "PytorchStreamWriter failed writing file" in other versions
_TORCH_WRITE_FAILED = ("unexpected pos", "iostream error", "file write failed", "failed writing file")
#: an errno in a message: safetensors (Rust) says "I/O error: No space left on device (os error 28)"
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
#: a file system with less free space than this after a failed write is taken to be full
_FULL_BYTES = 1 << 20


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _file_at_size_limit(path: Path) -> Optional[Path]:
    """``path``, or the largest file under the folder ``path``, when it has reached the file-size limit."""
    limit = _file_size_limit()
    if limit is None:
        return None
    try:
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        sizes = [(p.stat().st_size, str(p)) for p in found]
    except OSError:
        return None
    size, name = max(sizes, default=(0, ""))
    return Path(name) if sizes and size >= limit else None


def write_failure(exc: BaseException, path: str | Path) -> Optional[Exception]:
    """The error to report for ``exc``, raised by a library (torch.save, safetensors) while writing
    ``path`` (a file, or a folder it was writing into), when it is a failure of the file system;
    None when it is not (a bug keeps its traceback). Call it before the partial file is removed:

    * an OSError in the exception's chain, or an errno in its message (safetensors): that error;
    * torch.save's errno-less RuntimeError: a file that reached this process's file-size limit is
      ``EFBIG`` (File too large); a file system left with under 1 MiB free is ``ENOSPC`` (No space
      left on device); otherwise a UserError saying the write failed and what to check.
    """
    path = Path(path)
    at_limit = _file_at_size_limit(path)
    for item in _chain(exc):
        code = item.errno if isinstance(item, OSError) else None
        if code is None:
            match = _ERRNO_IN_TEXT.search(str(item))
            code = int(match.group(1) or match.group(2)) if match else None
        if code is not None:
            if code not in USER_ERRNOS:
                return None
            return OSError(code, os.strerror(code), str(at_limit if code == errno.EFBIG and at_limit else path))
    if not any(marker in str(item) for item in _chain(exc) for marker in _TORCH_WRITE_FAILED):
        return None
    if at_limit is not None:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(at_limit))
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    try:
        stat = os.statvfs(existing) if existing is not None else None
    except (OSError, AttributeError):
        stat = None
    if stat is not None and stat.f_bavail * stat.f_frsize < _FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{path}: could not be written (PyTorch: {detail}); check that the disk has free space and that "
                     "no quota or file-size limit is reached, then rerun (with --resume where the command has it)")


@contextlib.contextmanager
def library_write(path: str | Path) -> Iterator[None]:
    """Around a library's write into ``path``: a file-system failure it reports as something else
    (torch.save's RuntimeError, safetensors' SafetensorError) or as an OSError without a file name
    is raised as an OSError naming the file (:func:`write_failure`), which the CLI prints as one line."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in USER_ERRNOS:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    except Exception as exc:
        error = write_failure(exc, path)
        if error is None:
            raise
        raise error from exc


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
