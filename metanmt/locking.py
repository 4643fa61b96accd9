"""One process at a time per output folder: a lock file with its owner's pid, host and start time.

    lock = FolderLock(run_dir)       # run_dir/.metanmt.lock
    lock.check()                     # raises UserError while another live process holds it
    lock.acquire()                   # atomic (O_CREAT | O_EXCL); a stale lock is taken over, logged
    ...
    lock.release()                   # also at interpreter exit

A lock is stale when its process is gone: the pid no longer runs, or it runs with another start
time (the pid was reused). The pid is checked where it means the same process: a lock of this host
name, or one written in this boot and pid namespace of this kernel (the ``pids`` field: the same
machine under another name, e.g. a renamed host). A lock from another host cannot be checked from
here: it is refused with its host, pid and time and the file to delete once that process is known to
be gone. The lock is advisory for metanmt's own commands; it is not
an ``flock`` because those vanish with the process silently on some network file systems, and a
file with a pid is what a user can read and remove. Our own pid re-enters (one process may open a
folder twice, e.g. a test building two trainers).
"""

from __future__ import annotations

import atexit
import datetime
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


def _pid_space() -> Optional[str]:
    """This kernel boot and pid namespace (Linux), in which a pid names one process; None where unknown.
    Two containers on one machine share the boot but not the namespace, so their pids are not compared."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid), "pids": _pid_space(),
            "taken": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


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

    def _checkable(self, owner: dict[str, Any]) -> bool:
        """Whether ``owner``'s pid can be checked here: this host name, or this boot and pid namespace."""
        space = owner.get("pids")
        return owner.get("host") == socket.gethostname() or (space is not None and space == _pid_space())

    def _taken(self, owner: dict[str, Any]) -> str:
        """When the lock was taken: its ``taken`` field, else (older locks) the lock file's time."""
        if isinstance(owner.get("taken"), str):
            return owner["taken"]
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return "an unknown time"
        return datetime.datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds")

    def _stale_reason(self, owner: dict[str, Any]) -> Optional[str]:
        """Why ``owner``'s lock may be taken over, or None when it is (or may be) held."""
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return "the lock file is damaged"
        if not self._checkable(owner):
            return None  # another host: check() says so
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
        pid, host, taken = owner.get("pid"), owner.get("host"), self._taken(owner)
        if not self._checkable(owner):
            raise UserError(f"{self.folder}: locked by process {pid} on host {host!r} since {taken} (lock file "
                            f"{self.path}); that process cannot be verified from this host ({socket.gethostname()!r}): "
                            f"wait for it to finish, or, if it is known to be gone, delete {self.path} and rerun")
        raise UserError(f"{self.folder}: in use by process {pid} on {host} since {taken} (lock file {self.path}); "
                        f"wait for it to finish, or delete the lock file if that process is gone")

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
