"""The MetaNMT benchmark: meta-learned vs multi-task vs from-scratch initializations on lv fi tr ko.

    python bench/l10n_compare.py --init meta=runs/meta --init multi=runs/multi \\
        --data-root ../shared/data/l10n [--adapt emb+enc] [--dev dev/ro.tsv.gz] [--seeds 3]

is exactly::

    metanmt compare --init meta=runs/meta --init multi=runs/multi --data-root ../shared/data/l10n \\
        --langs lv fi tr ko --budgets 0 4k 16k 40k --seeds 3 --beam 4 \\
        --out bench/results/l10n_compare   (+ the recipe flags given here)

plus ``bench/results/l10n_compare/hardware.json`` (CPU, threads, torch / transformers / sacrebleu
versions, total wall time), so the README can quote the exact command and machine. Latvian's 16k
and 40k files are its whole pool (split.json: ``complete: false``): 16k runs on the pool and is
noted, 40k is skipped as a repeat. The run is resumable: rerun the same command after a kill and
finished cells are kept. It needs meta-trained checkpoints (``metanmt meta-train
configs/l10n_fomaml.yaml`` and ``configs/l10n_multitask.yaml`` at equal compute); each init's
meta-training steps, pairs, tokens and seconds are read from its run folder and reported.

``--jobs N`` runs the languages in N processes of one thread each (on 2 cores, two one-thread jobs
get more done than one two-thread process), each into its own folder under ``RUNS/compare-jobs/``
(a compare folder is locked by its writer); their cells are gathered into ``--out``, where a last
invocation over every language finds all cells finished and writes the report. Cells ``--out``
already holds (an earlier run with fewer jobs) are handed to the job of their language, not rerun.
At the l10n configs' model size (d_model 256, 3+3 layers) one update on ~1,000 target tokens takes about 1 s on 2 CPU cores.

The reduced one-command reproduction, for other languages of a corpus in the same format::

    python bench/l10n_compare.py --quick --data-root PATH --langs fi tr [--minutes 20]

trains both inits from the shipped configs for ``--minutes`` of training time each, then runs the
comparison with fewer cells (budgets 0 1k 4k, 2 seeds, one scratch seed, the adaptation curve;
any ``metanmt compare`` flag given here replaces the quick default). The inits:

- **multi**: ``configs/l10n_frontier.yaml`` (the multi-task baseline at the CPU frontier) for ``S`` steps;
- **meta**: the shipped meta recipe on the same episodes, ``configs/l10n_meta_frontier.yaml``,
  warm-started from the multi-task run at step ``W = 7/8 S`` (the shipped 1,750-of-2,000 split),
  then meta-trained for the remaining eighth of the minutes. Both stages count in compare's
  compute table.

The warm start is the multi run itself: it is trained to ``W``, its model is copied (with its
trainer state, so its compute is counted) to ``RUNS/multi_at_W``, and it is then resumed to ``S``
(``train.steps`` may change on resume), so the shared first ``W`` steps are trained once: about
1.13 x ``--minutes`` of training in all (a multi run already past ``W`` gives the warm start from its
checkpoint at ``W`` where it kept one). Minutes become steps through a measured rate, not a
wall-clock stop (the trainer counts steps, and a step count keeps equal-compute accounting and
resuming exact): each config first runs ``--calibration-steps`` steps into its real run folder,
the seconds per step of their last third (the first steps of a process are several times slower)
set the step count, and the run is resumed to it.
Validation is off in the timed part (``train.eval_every=0``). ``--dry-run`` prints the plan
(``--seconds-per-step MULTI META`` skips the calibration); a rerun of the command resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from metanmt.engine.checkpoint import latest_trainer_state

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "l10n_compare"


QUICK_DEFAULTS = {"--budgets": ["0", "1k", "4k"], "--seeds": ["2"], "--scratch-seeds": ["1"], "--curve": ["0", "10", "30", "100"],
                  "--beam": ["1"], "--epochs": ["10"], "--max-steps": ["100"], "--adapt": ["all"]}
# the inits of the quick reproduction: the multi-task frontier config, and the meta recipe on its episodes
# warm-started at WARM_FRACTION of the multi-task run (configs/l10n_meta_frontier.yaml: 1,750 of 2,000)
MULTI, META = "l10n_frontier.yaml", "l10n_meta_frontier.yaml"
WARM_FRACTION = 7 / 8


def steps_for(minutes: float, seconds_per_step: float) -> int:
    """Training steps that fill ``minutes`` at the measured rate (at least one)."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds per step must be positive, got {seconds_per_step}")
    return max(1, int(minutes * 60 // seconds_per_step))


def quick_plan(minutes: float, multi_rate: float, meta_rate: float, calibration: int) -> dict[str, int]:
    """Step counts of the quick reproduction: multi ``S`` steps, meta warm-started at ``W`` and
    meta-trained ``T`` steps in the remaining time (none of them below the calibration steps)."""
    total = max(calibration, steps_for(minutes, multi_rate))
    warm = max(calibration, round(WARM_FRACTION * total))
    meta = max(calibration, steps_for(minutes * (1 - WARM_FRACTION), meta_rate))
    return {"multi_steps": total, "warm_steps": warm, "meta_steps": meta}


def _train(config: str, out: Path, steps: int, args: argparse.Namespace, extra: list[str], dry: bool) -> list[str]:
    from l10n_meta_train import metanmt_command  # bench/ is on sys.path when this file runs as a script

    cmd = [*metanmt_command(args.processes), "meta-train", str(ROOT / "configs" / config), "--output-dir", str(out),
           "--set", f"data.root={args.data_root}", "--set", f"train.steps={steps}", "--set", "train.eval_every=0",
           *extra, *[x for s in args.set for x in ("--set", s)]]
    if (out / "metanmt.yaml").is_file():
        cmd.append("--resume")
        if not dry and latest_trainer_state(out).get("step", 0) >= steps:
            return cmd  # trained (a rerun, or the calibration already reached it)
    print("+", " ".join(cmd), flush=True)
    if not dry:
        env = {**os.environ, "OMP_NUM_THREADS": "1" if args.processes > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return cmd


def steady_rate(history: Path, until: int) -> float | None:
    """Seconds per step over the last third of a run's first ``until`` steps, from its logged
    cumulative ``seconds``; None with fewer than two logged steps there. The first steps of a process
    are slow (at the frontier config's size on 2 threads, ~1 s a step for the first 20 against ~0.3
    from step 80 on; docs/design.md), so a rate measured from step 0 plans too few steps."""
    if not history.is_file():
        return None
    points = {}
    for line in history.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and 2 * until / 3 <= record["step"] <= until:
            points[record["step"]] = float(record["seconds"])
    if len(points) < 2:
        return None
    first, last = min(points), max(points)
    return (points[last] - points[first]) / (last - first)


def _rate(config: str, out: Path, args: argparse.Namespace, extra: list[str], given: float | None) -> float:
    """Seconds per step of ``config``: given, or measured over the last third of its first
    ``--calibration-steps`` steps (all of them where the log has too few points)."""
    if given:
        return given
    if latest_trainer_state(out).get("step", 0) < args.calibration_steps:
        _train(config, out, args.calibration_steps, args, extra, False)
    rate = steady_rate(out / "history.jsonl", args.calibration_steps)
    if rate is not None and rate > 0:
        return rate
    state = latest_trainer_state(out)
    return float(state["seconds"]) / max(1, int(state["step"]))


def _snapshot(run: Path, dest: Path) -> None:
    """The run's exported model (a save_pretrained folder with its tokenizer) and its trainer state,
    so the warm start's compute is counted by compare."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in run.iterdir():
        if item.is_file() and item.name != "metanmt.yaml":
            shutil.copy2(item, dest / item.name)
    (dest / "trainer_state.json").write_text(json.dumps(latest_trainer_state(run), indent=2), encoding="utf-8")


def quick(args: argparse.Namespace) -> tuple[list[str], dict]:
    """Train both inits (see the module docstring); returns the --init flags and the plan. The plan
    (rates and step counts) is kept in RUNS/quick_plan.json, so a rerun resumes to the same steps."""
    runs = args.runs
    multi, meta = runs / "multi", runs / "meta"
    plan_file = runs / "quick_plan.json"
    plan = json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else {}
    if plan and plan.get("minutes") != args.minutes:
        raise SystemExit(f"{plan_file}: planned for {plan.get('minutes')} minutes, not {args.minutes}; "
                         "give the same --minutes or another --runs")
    given = args.seconds_per_step or [None, None]

    def keep() -> None:
        if not args.dry_run:
            runs.mkdir(parents=True, exist_ok=True)
            plan_file.write_text(json.dumps(plan, indent=2), encoding="utf-8")

    if "multi_steps" not in plan:
        rate = _rate(MULTI, multi, args, [], given[0])
        plan = {"minutes": args.minutes, "calibration_steps": args.calibration_steps, "multi_seconds_per_step": rate,
                **quick_plan(args.minutes, rate, given[1] or rate, args.calibration_steps)}
        plan.pop("meta_steps")  # set by the meta stage's own rate
        keep()
    warm = runs / f"multi_at_{plan['warm_steps']}"
    if not (warm / "trainer_state.json").is_file():
        if latest_trainer_state(multi).get("step", 0) > plan["warm_steps"]:
            if not args.dry_run:
                from metanmt.engine.run import export_checkpoint
                from metanmt.errors import UserError

                try:
                    export_checkpoint(multi, plan["warm_steps"], warm)
                except UserError as exc:  # that checkpoint is gone
                    raise SystemExit(str(exc)) from None
        else:
            _train(MULTI, multi, plan["warm_steps"], args, [], args.dry_run)
            if not args.dry_run:
                _snapshot(multi, warm)
    pretrained = ["--set", f"model.pretrained={warm}"]
    if "meta_steps" not in plan:
        rate = given[1] if args.dry_run else _rate(META, meta, args, pretrained, given[1])
        plan.update(meta_seconds_per_step=rate,
                    meta_steps=max(args.calibration_steps, steps_for(args.minutes * (1 - WARM_FRACTION), rate)))
        keep()
    _train(META, meta, plan["meta_steps"], args, pretrained, args.dry_run)
    _train(MULTI, multi, plan["multi_steps"], args, [], args.dry_run)
    return ["--init", f"meta={meta}", "--init", f"multi={multi}"], plan


def seed_job_folder(out: Path, folder: Path, langs: list[str]) -> int:
    """Give a ``--jobs`` job's compare folder the finished cells of its languages that ``out`` already
    holds (from an earlier one-process run into ``out``, say), so the job does not run them again;
    returns how many were copied. Only where both folders were made with the same settings (a job
    folder not made yet gets ``out``'s ``compare.json``): cells of other settings are left alone, and
    compare itself refuses a folder whose settings differ from its command's."""
    record = out / "compare.json"
    if not record.is_file():
        return 0
    mine = folder / "compare.json"
    if mine.is_file() and json.loads(mine.read_text(encoding="utf-8")) != json.loads(record.read_text(encoding="utf-8")):
        return 0
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    if not mine.is_file():
        shutil.copy2(record, mine)
    copied = 0
    for cell in sorted((out / "cells").glob("*.json")):
        if not (folder / "cells" / cell.name).is_file() and json.loads(cell.read_text(encoding="utf-8"))["lang"] in langs:
            shutil.copy2(cell, folder / "cells" / cell.name)
            copied += 1
    return copied


def gather_job_cells(folders: list[Path], out: Path) -> int:
    """Copy the finished cells of the ``--jobs`` folders into ``out`` with the settings they were made
    with (``compare.json``: the same for every job, the languages are not in it), so that compare
    then finds ``out`` a report of those settings with every cell finished; returns the cells copied.
    Jobs made with settings other than each other's or ``out``'s are refused, not mixed."""
    records = {folder: json.loads((folder / "compare.json").read_text(encoding="utf-8")) for folder in folders}
    mine = out / "compare.json"
    if mine.is_file():
        records[out] = json.loads(mine.read_text(encoding="utf-8"))
    first = next(iter(records.values()), None)
    different = [str(folder) for folder, record in records.items() if record != first]
    if different:
        raise SystemExit(f"{', '.join(different)}: made with other settings than {next(iter(records))}; "
                         "not gathered (use another --out or --runs)")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    if not mine.is_file() and folders:
        shutil.copy2(folders[0] / "compare.json", mine)
    copied = 0
    for folder in folders:
        for cell in sorted((folder / "cells").glob("*.json")):
            shutil.copy2(cell, out / "cells" / cell.name)
            copied += 1
    return copied


def with_quick_defaults(flags: list[str]) -> list[str]:
    """The quick comparison's flags: the defaults above unless the command line gives the flag."""
    given = {f for f in flags if f.startswith("--")}
    return [*flags, *(x for flag, values in QUICK_DEFAULTS.items() if flag not in given for x in (flag, *values))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", action="append", metavar="NAME=PATH")
    parser.add_argument("--quick", action="store_true", help="train both inits for --minutes each, then a reduced comparison")
    parser.add_argument("--minutes", type=float, default=20.0, help="--quick: training minutes per init (default %(default)s)")
    # outside the checkout, and not the quickstart's runs/quick (a run folder the inits would be trained into)
    parser.add_argument("--runs", type=Path, default=Path.home() / "runs" / "l10n_compare",
                        help="--quick: where the inits are trained; --jobs: where the jobs' compare folders are "
                             "(default: %(default)s)")
    parser.add_argument("--calibration-steps", type=int, default=120,
                        help="--quick: steps that measure the rate (over their last third)")
    parser.add_argument("--seconds-per-step", type=float, nargs=2, metavar=("MULTI", "META"),
                        help="--quick: known rates instead of measuring them")
    parser.add_argument("--processes", type=int, default=1, help="--quick: meta-train processes (accelerate launch if > 1)")
    parser.add_argument("--set", action="append", default=[], help="--quick: config override for every training run")
    parser.add_argument("--dry-run", action="store_true", help="--quick: print the plan and commands, run nothing")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "l10n")
    parser.add_argument("--langs", nargs="+", default=["lv", "fi", "tr", "ko"])
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(ROOT)} ({OUT.name}_quick with --quick)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the languages in N processes of one thread each, then write the report from all cells")
    args, recipe_flags = parser.parse_known_args()  # anything else is a flag of `metanmt compare`
    if args.quick == bool(args.init):
        parser.error("give --init NAME=PATH (at least one) or --quick (which trains the inits), not both")
    if args.minutes <= 0 or args.calibration_steps < 1:
        parser.error("--minutes must be positive and --calibration-steps at least 1")
    if args.dry_run and args.quick and not args.seconds_per_step:
        parser.error("--dry-run measures nothing: give --seconds-per-step MULTI META")
    args.data_root = args.data_root.resolve()
    args.runs = args.runs.expanduser()
    if (args.runs / "metanmt.yaml").is_file():  # its subfolders and plan would be mixed into that run
        parser.error(f"--runs {args.runs}: is a metanmt run folder; give a folder for the runs to go into")
    args.out = args.out or (OUT.with_name(OUT.name + "_quick") if args.quick else OUT)
    defaults = {"--budgets": ["0", "4k", "16k", "40k"], "--seeds": ["3"]}
    flags = with_quick_defaults(recipe_flags) if args.quick else \
        [*recipe_flags, *(x for k, v in defaults.items() if k not in recipe_flags for x in (k, *v))]

    started = time.perf_counter()
    plan: dict = {}
    if args.quick:
        init_flags, plan = quick(args)
        print(json.dumps(plan), flush=True)
    else:
        init_flags = [x for spec in args.init for x in ("--init", spec)]
    command = ["compare", *init_flags, "--data-root", str(args.data_root), "--langs", *args.langs, "--out", str(args.out),
               *flags]
    if args.dry_run:
        print("+ metanmt " + " ".join(command))
        return 0

    import sacrebleu
    import torch
    import transformers

    from l10n_throughput import cpu  # the CPU's model name and vector extension (bench/ is on sys.path)
    from metanmt.cli import main as cli
    from metanmt.engine.checkpoint import export_files

    if args.jobs > 1:
        # each job runs the cells of its languages into its own folder under RUNS (a compare folder
        # is locked by the process that writes it); their cells (one file each, same settings) are
        # then gathered into --out, where the final invocation below finds every cell finished
        groups = [g for g in (args.langs[i :: args.jobs] for i in range(args.jobs)) if g]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        jobs, folders = [], []
        for group in groups:
            job_command = list(command)
            start = job_command.index("--langs") + 1
            job_command[start : start + len(args.langs)] = group
            folders.append(args.runs / "compare-jobs" / f"{args.out.name}-{'-'.join(group)}")
            job_command[job_command.index("--out") + 1] = str(folders[-1])
            seed_job_folder(args.out, folders[-1], group)  # cells --out already has are not run again
            jobs.append(subprocess.Popen([sys.executable, "-m", "metanmt", *job_command], env=env, cwd=ROOT))
        if any(job.wait() != 0 for job in jobs):
            return 1
        gather_job_cells(folders, args.out)
    status = cli(command)
    if status == 0:
        info = {
            "command": "metanmt " + " ".join(command),
            "machine": platform.machine(), "processor": platform.processor() or platform.uname().machine, **cpu(),
            "cpu_count": os.cpu_count(), "torch_threads": 1 if args.jobs > 1 else torch.get_num_threads(), "jobs": args.jobs,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "sacrebleu": sacrebleu.__version__, "wall_seconds_this_invocation": time.perf_counter() - started,
        }
        if plan:
            info["quick"] = plan
        # recorded as metanmt's own file, so that a rerun of the comparison into --out is not refused
        export_files(args.out, lambda tmp: (tmp / "hardware.json").write_text(json.dumps(info, indent=2), encoding="utf-8"))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
