"""Lending a free core to a task that is already running.

A task's process starts with the threads it gets at its start: one each where several run, every
core where one runs alone. When a process ends and nothing is ready to take its place (the costliest
meta init training alone while the cells wait for it; the last language's cells), its core would stay
idle to the end. So the study lends the free cores to the processes still running and takes them back
before it starts another task: the processes never hold more threads than ``jobs`` together, since two
busy processes with more threads than cores slow each other several-fold (docs/design.md, "Threads").

The study writes the count to the file named by the task's ``METANMT_THREADS_FILE`` and sends
``SIGUSR1``; the task's process (:func:`follow_lent_threads`, called first thing by the command line)
reads it and calls ``torch.set_num_threads``. The signal is blocked in the child from its start
(:func:`block_lending_signal`) until the handler is installed, so a count sent early waits rather than
killing it (SIGUSR1's default action), and ignored from the start of its shutdown on.

A process's float sums may be split differently across threads, so a task whose thread count changed
can differ from one that did not in the last bits of a result (as two runs with different
``OMP_NUM_THREADS`` do).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from pathlib import Path

THREADS_FILE = "METANMT_THREADS_FILE"
LENDING_SIGNAL = getattr(signal, "SIGUSR1", None)  # None on Windows: nothing is lent there


def block_lending_signal() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """A child's ``preexec_fn``: hold the lending signal until the child can take it."""
    if LENDING_SIGNAL is not None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {LENDING_SIGNAL})


def follow_lent_threads() -> None:
    """In a task's process: set torch's thread count to the study's file whenever the study signals."""
    path = os.environ.get(THREADS_FILE)
    if not path or LENDING_SIGNAL is None:
        return

    def take(signum: int, frame: object) -> None:
        try:
            threads = int(Path(path).read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return  # no count (yet): keep the threads held
        import torch

        if threads >= 1 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    signal.signal(LENDING_SIGNAL, take)
    signal.siginterrupt(LENDING_SIGNAL, False)  # a system call the signal lands in restarts rather than fails
    # the interpreter's shutdown puts a Python handler back to the default action (death by SIGUSR1)
    # but leaves an ignored signal ignored: a count sent while the task exits must not kill it
    atexit.register(signal.signal, LENDING_SIGNAL, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {LENDING_SIGNAL})  # a count sent before now arrives here


class ThreadLender:
    """The threads each running task's process holds, lent out and taken back by the study."""

    def __init__(self, jobs: int, logs: Path):
        self.jobs, self.logs = max(1, jobs), logs
        self.held: dict[str, tuple[subprocess.Popen, int]] = {}

    def file(self, key: str) -> Path:
        """The task's threads file (its process finds it in ``METANMT_THREADS_FILE``)."""
        return self.logs / f"{key.replace(':', '_')}.threads"

    def started(self, key: str, proc: subprocess.Popen, threads: int) -> None:
        self.held[key] = (proc, threads)

    def ended(self, key: str) -> None:
        self.held.pop(key, None)

    def _set(self, key: str, threads: int) -> None:
        proc, held = self.held[key]
        if threads == held or LENDING_SIGNAL is None or proc.poll() is not None:
            return
        path = self.file(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{threads}\n", encoding="utf-8")
        os.replace(tmp, path)
        proc.send_signal(LENDING_SIGNAL)
        self.held[key] = (proc, threads)

    def take_back(self, starting: int) -> None:
        """Before ``starting`` more tasks start: every running process back to its share of what stays."""
        shares = self.shares(len(self.held) + starting)
        for key, threads in zip(list(self.held), shares):
            if self.held[key][1] > threads:
                self._set(key, threads)

    def lend(self) -> None:
        """Nothing can start: the running processes share every core."""
        for key, threads in zip(list(self.held), self.shares(len(self.held))):
            self._set(key, threads)

    def shares(self, processes: int) -> list[int]:
        """``jobs`` threads split over ``processes`` (the earlier-started get the remainder), one at least."""
        if processes <= 0:
            return []
        base, extra = divmod(self.jobs, processes)
        return [max(1, base + (i < extra)) for i in range(processes)]

    def holding(self) -> dict[str, int]:
        return {key: held for key, (_, held) in self.held.items()}

