"""One process at a time per output folder: a lock file with its owner's pid, host and start time.

    lock = FolderLock(run_dir)       # run_dir/.metanmt.lock
    lock.check()                     # raises UserError while another live process holds it
    lock.acquire()                   # atomic (O_CREAT | O_EXCL); a stale lock is taken over, logged
    ...
    lock.release()                   # also at interpreter exit

A lock is stale when its process is gone: on this host, the pid no longer runs, or it runs with
another start time (the pid was reused). A lock from another host cannot be checked and is
refused with the file to delete. The lock is advisory for metanmt's own commands; it is not
an ``flock`` because those vanish with the process silently on some network file systems, and a
file with a pid is what a user can read and remove. Our own pid re-enters (one process may open a
folder twice, e.g. a test building two trainers).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

log = logging.getLogger(__name__)
LOCK_FILE = ".metanmt.lock"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}


class FolderLock:
    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.held = False

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # empty or damaged: written by a process killed while creating it

    def _stale_reason(self, owner: dict[str, Any]) -> Optional[str]:
        """Why ``owner``'s lock may be taken over, or None when it is (or may be) held."""
        pid, host = owner.get("pid"), owner.get("host")
        if not isinstance(pid, int):
            return "the lock file is damaged"
        if host != socket.gethostname():
            return None
        if pid == os.getpid():
            return "held by this process"
        if not _alive(pid):
            return f"process {pid} is gone"
        start = owner.get("start")
        if start is not None and _start_time(pid) not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None

    def check(self) -> None:
        """Raise UserError while another live process holds the lock; touch nothing."""
        owner = self._read()
        if owner is None or self._stale_reason(owner) is not None:
            return
        where = f"process {owner.get('pid')} on {owner.get('host')}"
        raise UserError(f"{self.folder}: in use by {where} (lock file {self.path}); wait for it to finish, or "
                        f"delete the lock file if that process is gone")

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue  # released meanwhile
                reason = self._stale_reason(owner)
                if reason is None:
                    self.check()  # raises with the owner's details
                if reason != "held by this process":
                    log.warning("%s: taking over a stale lock (%s)", self.path, reason)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            try:
                os.write(fd, json.dumps(_owner()).encode("utf-8"))
            finally:
                os.close(fd)
            self.held = True
            atexit.register(self.release)
            return
        raise UserError(f"{self.folder}: could not take the lock {self.path}; another process keeps taking it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except OSError:
                pass
