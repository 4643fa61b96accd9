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
get more done than one two-thread process), all writing their cells into the same ``--out``;
a last invocation over every language then finds all cells finished and writes the report.
At the l10n configs' model size (d_model 256, 3+3 layers) one update on ~1,000 target tokens takes about 1 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "l10n_compare"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "l10n")
    parser.add_argument("--langs", nargs="+", default=["lv", "fi", "tr", "ko"])
    parser.add_argument("--budgets", nargs="+", default=["0", "4k", "16k", "40k"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the languages in N processes of one thread each, then write the report from all cells")
    args, recipe_flags = parser.parse_known_args()  # anything else is a recipe flag of `metanmt compare`

    import sacrebleu
    import torch
    import transformers

    from metanmt.cli import main as cli

    command = ["compare", *(x for spec in args.init for x in ("--init", spec)), "--data-root", str(args.data_root),
               "--langs", *args.langs, "--budgets", *args.budgets, "--seeds", str(args.seeds), "--out", str(args.out),
               *recipe_flags]
    started = time.perf_counter()
    if args.jobs > 1:
        # each job runs the cells of its languages into the same --out (cells are separate files);
        # the final invocation below finds every cell finished and writes the full report
        groups = [args.langs[i :: args.jobs] for i in range(args.jobs)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        jobs = []
        for group in (g for g in groups if g):
            job_command = list(command)
            start = job_command.index("--langs") + 1
            job_command[start : start + len(args.langs)] = group
            jobs.append(subprocess.Popen([sys.executable, "-m", "metanmt", *job_command], env=env, cwd=ROOT))
        if any(job.wait() != 0 for job in jobs):
            return 1
    status = cli(command)
    if status == 0:
        info = {
            "command": "metanmt " + " ".join(command),
            "machine": platform.machine(), "processor": platform.processor() or platform.uname().machine,
            "cpu_count": os.cpu_count(), "torch_threads": 1 if args.jobs > 1 else torch.get_num_threads(), "jobs": args.jobs,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "sacrebleu": sacrebleu.__version__, "wall_seconds_this_invocation": time.perf_counter() - started,
        }
        (args.out / "hardware.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
