"""``metanmt study STUDY.yaml --out DIR``: every stage of a study, in order, resumable, in ``jobs``
processes.

The study is a graph of tasks, each done when its output exists (so a rerun does only what is
missing, and a killed study resumes at the task it was in):

    train:SRC@W    a warm-start source trained to update W, its model exported (inits/SRC@W)
    inner:NAME     a meta init's inner loop, chosen on the dev language at its warm start
    train:NAME     an init trained (or resumed) to its last update
    converged      (``convergence: required``) the reference is flat on the dev language: a check the
                   study makes in its own process (no task process); no cell starts before it passes
    rule           the fine-tuning length chosen on the dev language with the reference init
    cells:LANG     one test language's cells (fine-tune, decode, score; resumable cell by cell)
    report         every cell gathered; results.csv, results.md, the plots, report.html

Tasks whose inputs are there run side by side, up to ``jobs`` at once, each in its own process
(``OMP_NUM_THREADS`` = 1 where several run; a task that runs alone gets ``jobs`` threads, and one
left running alone is lent the free cores: threads.py); a free process takes the reference's
training first, then the costliest (:func:`_priority_order`). The
device is where Accelerate puts each process (CUDA when present), so one study file runs on a
CPU or a GPU and writes the same report. A progress line says which stage and which cell each
process is at, and the time left at the rates measured so far.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..engine.checkpoint import confirm_replacement, release_directory, restore_on_failure
from ..errors import UserError
from . import cells as study_cells
from .folder import (check_settings, claim, data_fingerprint, init_dir, inner_file, read_json, report_dir, rule_file, warm_dir,
                     write_json)
from .inits import export_warm_start, train_command, trained_to
from .report import convergence_line
from .spec import Study, describe
from .threads import THREADS_FILE, ThreadLender, block_lending_signal

log = logging.getLogger(__name__)

STAGES = ("inits", "inner", "converged", "rule", "cells", "report")
POLL_SECONDS = 5.0
PROGRESS_SECONDS = 60.0


@dataclasses.dataclass
class Task:
    key: str
    stage: str
    deps: list[str]
    done: Callable[[], bool]
    # the command of its process (None: the study's own ``--task KEY``), and what runs in the study's
    # process once it succeeds
    command: Optional[Callable[[], list[str]]] = None
    after: Optional[Callable[[], None]] = None
    # a check, not a process: when the task is ready and not done, why (its inputs are there but fail it)
    refusal: Optional[Callable[[], str]] = None
    urgent: bool = False  # the fine-tuning-length choice waits for it (:func:`_priority_order`)


def tasks_of(study: Study, out: Path) -> list[Task]:
    """The study's tasks in a valid order."""
    tasks: list[Task] = []
    final = {name: f"train:{name}" for name in study.inits}
    for warm in study.warm_starts():
        key = f"train:{warm.init}@{warm.update}"
        deps = [final[w.init]] if (w := study.inits[warm.init].warm_start) else []
        tasks.append(Task(key, "inits", deps, done=lambda w=warm: (warm_dir(out, w.init, w.update) / "trainer_state.json").is_file(),
                          command=lambda w=warm: train_command(study, out, w.init, w.update),
                          after=lambda w=warm: export_warm_start(out, w.init, w.update)))
        for name, init in study.inits.items():
            if init.warm_start == warm and init.inner == "chosen":
                tasks.append(Task(f"inner:{name}", "inner", [key], done=lambda n=name: inner_file(out, n).is_file()))
    # the costliest training first (see _priority_order for what goes before it)
    for name in sorted(study.order(), key=lambda n: -study.cost(n)):
        init = study.inits[name]
        deps = []
        if init.warm_start is not None:
            w = init.warm_start
            deps.append(f"train:{w.init}@{w.update}")
            if init.inner == "chosen":
                deps.append(f"inner:{name}")
        # a source trained past a warm start is resumed from it: its own export comes first
        deps += [f"train:{name}@{w.update}" for w in study.warm_starts() if w.init == name]
        tasks.append(Task(final[name], "inits", deps, done=lambda n=name: trained_to(out, n) >= study.inits[n].steps,
                          command=lambda n=name: train_command(study, out, n)))
    rule_deps = [final[study.file.reference]]
    if study.file.finetune.length == "chosen":
        tasks.append(Task("rule", "rule", rule_deps, done=lambda: "choice" in _json_or_empty(rule_file(out))))
        rule_deps = ["rule"]
    cell_deps = [*final.values(), *rule_deps]
    if study.file.convergence == "required":  # no test cell scores a reference that is not converged
        reference = study.file.reference
        tasks.append(Task("converged", "converged", [final[reference]], done=lambda: reference_flat(study, out),
                          refusal=lambda: not_converged(study, out)))
        cell_deps.append("converged")
    for lang in study.langs:
        tasks.append(Task(f"cells:{lang}", "cells", cell_deps,
                          done=lambda lang=lang: study_cells.count_finished(out, lang) >= study_cells.planned_cells(study, lang)
                          and (study_cells.cells_dir(out, lang) / "results.md").is_file()))
    tasks.append(Task("report", "report", [f"cells:{lang}" for lang in study.langs],
                      done=lambda: (report_dir(out) / "report.html").is_file() and _report_current(study, out)))
    return _priority_order(tasks, first=[final[study.file.reference]])


def _priority_order(tasks: list[Task], first: list[str]) -> list[Task]:
    """The tasks in a valid order in which ``first`` (the reference's training) and everything it
    depends on come as early as their inputs allow, the rest keeping their order. A free process takes
    the first ready task, so the reference's last updates, which the fine-tuning-length choice and
    every cell wait for, run beside the meta inits rather than after them (docs/design.md, "The study
    as a graph of tasks")."""
    by_key = {t.key: t for t in tasks}
    urgent: set[str] = set()
    stack = list(first)
    while stack:
        key = stack.pop()
        if key in by_key and key not in urgent:
            urgent.add(key)
            stack.extend(by_key[key].deps)
    for task in tasks:
        task.urgent = task.key in urgent
    placed: list[Task] = []
    placed_keys: set[str] = set()
    left = list(tasks)
    while left:
        ready = [t for t in left if all(d in placed_keys for d in t.deps)]
        task = next((t for t in ready if t.key in urgent), ready[0])
        placed.append(task)
        placed_keys.add(task.key)
        left.remove(task)
    return placed


def _costliest_first(ready: list[Task], study: Study, out: Path) -> list[Task]:
    """The ready tasks in their order, but the inits' last trainings (those nothing urgent waits for)
    costliest first by the measured cost of a pass where every one of them has it: an inner-loop
    choice (``inner/NAME.json``) times the same candidates on the same episodes for every init, so its
    seconds are the cost of that init's model (MetaNMT's tables and ULR make it ~10% dearer, which the
    count of passes alone does not see)."""
    finals = [t for t in ready if t.stage == "inits" and "@" not in t.key and not t.urgent]
    if len(finals) < 2:
        return ready
    names = {t.key: t.key[len("train:"):] for t in finals}
    seconds = {n: _json_or_empty(inner_file(out, n)).get("seconds") for n in names.values()}
    per_pass = seconds if all(seconds.values()) else {n: 1.0 for n in names.values()}
    left = {n: max(0, study.inits[n].steps - trained_to(out, n)) / max(1, study.inits[n].steps) for n in names.values()}
    ordered = iter(sorted(finals, key=lambda t: -study.cost(names[t.key]) * per_pass[names[t.key]] * left[names[t.key]]))
    return [next(ordered) if t in finals else t for t in ready]


def _json_or_empty(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def done_keys(tasks: list[Task]) -> list[str]:
    """The tasks that are done, in order, and so is everything they depend on: a report written before a
    later phase's cells is not done, nor are an init's dependants after it was set back."""
    done: list[str] = []
    for task in tasks:  # in a valid order: a task's dependencies come before it
        if all(d in done for d in task.deps) and task.done():
            done.append(task.key)
    return done


def reference_flat(study: Study, out: Path) -> bool:
    """The reference's dev NLL is flat by the study's criterion (:mod:`.convergence`)."""
    from .report import convergence

    result = convergence(study, out, with_forecast=False)
    return bool(result and result["flat"])


def not_converged(study: Study, out: Path) -> str:
    """Why no cell may start: the convergence check in words, and what to do."""
    name = study.file.reference
    return (f"study {study.name}: the reference {convergence_line(study, out)}, and the study file asks for a "
            f"converged reference (convergence: required), so no test cell was run. Train {name} longer "
            f"(inits.{name}.set: train.steps, its warm starts at the same fraction) in a new --out, or set "
            "convergence: reported to score it as it is")


def _report_current(study: Study, out: Path) -> bool:
    """The report holds every finished cell as it is now (a cell run again is a new cell to report)."""
    gathered = report_dir(out) / "cells"
    return all((gathered / p.name).is_file() and (gathered / p.name).read_bytes() == p.read_bytes()
               for lang in study.langs for p in (study_cells.cells_dir(out, lang) / "cells").glob("*.json"))


def run_task(study: Study, out: Path, key: str, device: str) -> None:
    """One task of :func:`tasks_of` that runs in the study's own code (``--task KEY``)."""
    keys = [t.key for t in tasks_of(study, out) if t.command is None and t.refusal is None]
    if key not in keys:
        raise UserError(f"--task {key!r}: not a task of this study that runs in its own code ({', '.join(keys)})")
    if key.startswith("inner:"):  # each task imports only what it runs (a process starts in seconds, not ten)
        from .inner import choose_inner

        result = choose_inner(study, out, key[len("inner:"):])
        c = result["choice"]
        log.info("inner loop at %s: rate %g, %d steps, gain %+.4f nats (n = %d episodes)", result["warm_start"],
                 c["lr"], c["steps"], c["gain"], c["n"])
    elif key == "rule":
        from .rule import choose_rule

        info = choose_rule(study, out)
        log.info("fine-tuning length: %s", info["choice"])
    elif key.startswith("cells:"):
        study_cells.run_language(study, out, key[len("cells:"):], device)
    elif key == "report":
        from .report import write_study_report

        study_cells.report_cells(study, out, device)
        write_study_report(study, out)


def _task_command(study: Study, out: Path, key: str, argv_extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "metanmt", "study", str(study.path), "--out", str(out), "--data-root",
            str(study.data_root), "--langs", *study.langs, *argv_extra, "--task", key]


def _planned_command(study: Study, out: Path, task: Task, argv_extra: list[str]) -> Optional[list[str]]:
    """The command a task will run; None where it depends on a choice not made yet (the inner loop), or
    where the study checks it in its own process (the convergence check)."""
    if task.refusal is not None:
        return None
    if task.command is None:
        return _task_command(study, out, task.key, argv_extra)
    try:
        return task.command()
    except FileNotFoundError:
        return None


def _wait_for_an_end(procs: list[subprocess.Popen], seconds: float) -> None:
    """Up to ``seconds``, less as soon as a process ends: the tasks that wait for it start at once (a
    study of short tasks spent most of its time in fixed sleeps)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(proc.poll() is None for proc in procs):
        time.sleep(min(0.1, seconds))


def _start_child() -> None:  # pragma: no cover - runs in the child
    """A task's process ends when the study's does (Linux), so a killed study leaves no orphan holding a
    lock; and it holds the thread-lending signal until it can take it (threads.py)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    block_lending_signal()


class Progress:
    """The progress line: stage counts, what each process is at, and the time left at measured rates."""

    def __init__(self, study: Study, out: Path, tasks: list[Task], jobs: int):
        self.study, self.out, self.tasks, self.jobs = study, out, tasks, jobs

    def _last_train_record(self, name: str) -> Optional[dict[str, Any]]:
        """The run's last logged training record (its step and cumulative seconds), None before one."""
        history = init_dir(self.out, name) / "history.jsonl"
        if not history.is_file():
            return None
        import json

        last = None
        for line in history.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("kind") == "train" and record.get("seconds"):
                last = record
        return last

    def _train_rate(self, name: str) -> Optional[float]:
        """Seconds per update so far (validation included: it is part of what is left)."""
        last = self._last_train_record(name)
        return last["seconds"] / max(1, last["step"]) if last else None

    def line(self, running: list[str]) -> str:
        done = set(done_keys(self.tasks))
        counts = " · ".join(f"{stage} {sum(t.key in done for t in self.tasks if t.stage == stage)}/"
                            f"{sum(t.stage == stage for t in self.tasks)}" for stage in STAGES
                            if any(t.stage == stage for t in self.tasks))
        where, eta = self.estimate(running, done)
        return f"study {self.study.name} [{counts}] running: {', '.join(where) or '-'}; {eta}"

    def estimate(self, running: list[str], done: Optional[set[str]] = None) -> tuple[list[str], str]:
        """What each running task is at, and the time left of every unfinished task at the measured
        rates (what waits shares the ``jobs`` processes)."""
        study, out = self.study, self.out
        done = set(done_keys(self.tasks)) if done is None else done
        left, busy, unknown = 0.0, [], []  # seconds left of waiting tasks; of each running one
        rates = {n: r for n in study.inits if (r := self._train_rate(n))}
        mean_rate = sum(rates.values()) / len(rates) if rates else None
        finished_cells = [c for lang in study.langs for c in study_cells.finished_cells(out, lang)]
        where = []
        for task in self.tasks:
            if task.key in done:
                continue
            if task.key.startswith("train:"):
                name, _, upto = task.key[len("train:"):].partition("@")
                target = int(upto) if upto else study.inits[name].steps
                logged = self._last_train_record(name)
                at = max(trained_to(out, name), int(logged["step"]) if logged else 0)
                rate = rates.get(name, mean_rate)
                if rate is None:
                    unknown.append(task.key)
                elif task.key in running:
                    busy.append(max(0, target - at) * rate)
                else:
                    left += max(0, target - at) * rate
                if task.key in running:
                    where.append(f"{task.key} {at}/{target} updates")
            elif task.key.startswith("cells:"):
                lang = task.key[len("cells:"):]
                n_done, planned = study_cells.count_finished(out, lang), study_cells.planned_cells(study, lang)
                seconds = study_cells.seconds_left(study, out, lang, finished_cells)
                if seconds is None:
                    unknown.append(task.key)
                elif task.key in running:
                    busy.append(seconds)
                else:
                    left += seconds
                if task.key in running:
                    at = study_cells.cells_at(out, lang)
                    where.append(f"{task.key} {n_done}/{planned} cells{' (at ' + ', '.join(at) + ')' if at else ''}")
            elif task.key in running:
                where.append(task.key)
            elif task.stage not in ("report", "converged"):  # seconds, not minutes
                unknown.append(task.key)
        # the running tasks go on side by side; what waits shares every process
        not_measured = f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}"
        if not busy and not left and unknown:  # no rate known yet: no estimate rather than "0 min"
            eta = f"time left not measured yet ({not_measured})"
        else:
            eta = f"about {(max(busy, default=0.0) + left / self.jobs) / 60:.0f} min left at the measured rates"
            if unknown:
                eta += f" (not measured yet: {not_measured})"
        return where, eta


def run_study(study: Study, out: Path, jobs: Optional[int] = None, overwrite: bool = False,
              report_only: bool = False, dry_run: bool = False, device: str = "cpu",
              argv_extra: Optional[list[str]] = None) -> dict[str, Any]:
    """Run (or resume) every task; returns ``{"ran": [...], "already": [...], "report": path}``."""
    out = Path(out)
    jobs = jobs or study.file.jobs
    settings = describe(study)
    if out.resolve() == study.data_root or study.data_root in out.resolve().parents:
        raise UserError(f"--out {out}: lies in the data root {study.data_root}; write the study elsewhere")
    tasks = tasks_of(study, out)
    if dry_run:
        done = done_keys(tasks) if out.is_dir() else []
        return {"plan": [{"task": t.key, "after": t.deps, "done": t.key in done,
                          "command": _planned_command(study, out, t, argv_extra or [])} for t in tasks],
                "cells": {lang: study_cells.planned_cells(study, lang) for lang in study.langs},
                "time_left": Progress(study, out, tasks, jobs).estimate([])[1] if out.is_dir() else
                "time left not measured yet (nothing has run)",
                "data_fingerprint": data_fingerprint(study.data_root)}
    # a language or budget that selects no cell stops here, before --out is touched
    from ..evaluation.compare import _path

    no_test = [lang for lang in study.langs if not _path(study.data_root, study.file.data.test, lang=lang).is_file()]
    if no_test:
        raise UserError(f"--langs {' '.join(no_test)}: no test file "
                        f"{', '.join(str(_path(study.data_root, study.file.data.test, lang=lang)) for lang in no_test)}")
    for lang in study.langs:
        study_cells.planned_cells(study, lang)
    if report_only:
        if not (out / "study.json").is_file():
            raise UserError(f"--report-only: {out} holds no study to report on")
        # a report of the finished cells while the study runs: it reads the folder and writes only
        # report/, which compare locks for itself, so the study's own lock is not taken
        check_settings(out, settings, study.data_root)
        return _run(study, out, tasks, jobs, report_only, device, argv_extra or [])
    claim(out, settings, study.data_root, overwrite)
    try:
        # --overwrite set the previous study aside: it comes back if this start fails before its first task ends
        with restore_on_failure(out):
            return _run(study, out, tasks, jobs, report_only, device, argv_extra or [])
    finally:
        release_directory(out)


def _run(study: Study, out: Path, tasks: list[Task], jobs: int, report_only: bool, device: str,
         argv_extra: list[str]) -> dict[str, Any]:
    if report_only:
        finished = sum(study_cells.count_finished(out, lang) for lang in study.langs)
        if not finished:
            raise UserError(f"--report-only: no cell of the study is finished in {out}; nothing to report")
        missing = [lang for lang in study.langs if not (study_cells.cells_dir(out, lang) / "compare.json").is_file()]
        if missing:
            raise UserError(f"--report-only: the cells of {' '.join(missing)} have not started in {out}; a report needs "
                            "every language begun")
        run_task(study, out, "report", device)
        return {"ran": ["report"], "already": [], "report": str(report_dir(out) / "report.html")}

    by_key = {t.key: t for t in tasks}
    already = done_keys(tasks)
    if len(already) == len(tasks):
        log.info("study %s: every task was already finished in %s (%s); nothing to do", study.name, out,
                 ", ".join(already))
        return {"ran": [], "already": already, "report": str(report_dir(out) / "report.html")}
    progress = Progress(study, out, tasks, jobs)
    finished: set[str] = set(already)
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    lender = ThreadLender(jobs, out / "logs")
    ran: list[str] = []
    refused: dict[str, str] = {}  # a check that failed: what waits for it never starts
    (out / "logs").mkdir(exist_ok=True)
    last_time = 0.0
    try:
        while len(finished) < len(tasks):
            for task in tasks:  # a check runs here, at once, when its inputs are there (tasks are in a valid order)
                if task.refusal and task.key not in finished and task.key not in refused and \
                        all(d in finished for d in task.deps):
                    if task.done():
                        finished.add(task.key)
                        log.info("study %s: %s passed: the cells may start", study.name, task.key)
                    else:  # what does not wait for it goes on (the meta inits, the length rule)
                        refused[task.key] = task.refusal()
                        log.warning("%s", refused[task.key])
            ready = [t for t in tasks if t.key not in finished and t.key not in running and not t.refusal
                     and all(d in finished for d in t.deps)]
            ready = _costliest_first(ready, study, out)
            started_or_ended = False
            starting = []
            for task in ready[: max(0, jobs - len(running))]:
                if task.done():  # finished by an earlier start while its dependants waited
                    finished.add(task.key)
                else:
                    starting.append(task)
            held = lender.holding()
            if starting:  # the cores lent to running tasks come back first
                lender.take_back(len(starting))
            elif running:  # nothing can start: the running tasks take the free cores (threads.py)
                lender.lend()
            for key, threads in lender.holding().items():
                if threads != held[key]:
                    log.info("study %s: %s now has %d thread%s", study.name, key, threads, "" if threads == 1 else "s")
            shares = lender.shares(len(running) + len(starting))
            for task in starting:
                threads = str(shares[len(running)])
                command = task.command() if task.command else _task_command(study, out, task.key, argv_extra)
                logfile = open(out / "logs" / f"{task.key.replace(':', '_')}.log", "a", encoding="utf-8")
                logfile.write(f"+ {' '.join(command)}\n")
                logfile.flush()
                env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       THREADS_FILE: str(lender.file(task.key))}
                log.info("study %s: start %s (%s thread%s)", study.name, task.key, threads, "" if threads == "1" else "s")
                started_or_ended = True
                proc = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_start_child if sys.platform == "linux" else None)
                running[task.key] = (proc, logfile)
                lender.started(task.key, proc, int(threads))
            if not running:
                stuck = [t.key for t in tasks if t.key not in finished and t.key not in refused]
                if refused:
                    raise UserError(" ".join(refused.values()) + f" (tasks not run: {', '.join(stuck)})")
                if stuck:
                    raise UserError(f"study {study.name}: tasks {', '.join(stuck)} cannot start (their inputs are missing)")
                break
            _wait_for_an_end([proc for proc, _ in running.values()], POLL_SECONDS)
            for key, (proc, logfile) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                logfile.close()
                del running[key]
                lender.ended(key)
                if code != 0:
                    tail = (out / "logs" / f"{key.replace(':', '_')}.log").read_text(encoding="utf-8").strip().splitlines()
                    reason = next((line for line in reversed(tail) if "error" in line.lower()), tail[-1] if tail else "")
                    raise UserError(f"study {study.name}: {key} failed (exit {code}): {reason.strip()} "
                                    f"(log: {out / 'logs' / (key.replace(':', '_') + '.log')}); rerun the same command "
                                    "to resume")
                task = by_key[key]
                if task.after:
                    task.after()
                if not task.done():
                    raise UserError(f"study {study.name}: {key} ended without its output; see {out / 'logs'}")
                finished.add(key)
                ran.append(key)
                confirm_replacement(out)  # a task of this start is done: what --overwrite set aside goes
                log.info("study %s: %s done", study.name, key)
                if key == f"train:{study.file.reference}":
                    log.info("study %s: %s", study.name, convergence_line(study, out))
                started_or_ended = True
            now = time.monotonic()
            if running and (now - last_time >= PROGRESS_SECONDS or started_or_ended):  # a line a minute, and one
                log.info("%s", progress.line(list(running)))                              # whenever a task starts or ends
                last_time = now
    finally:
        for proc, logfile in running.values():
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            logfile.close()
    write_json(out / "logs" / "last_start.json", {"ran": ran, "already": already})
    return {"ran": ran, "already": already, "report": str(report_dir(out) / "report.html")}
