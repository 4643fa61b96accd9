"""Meta-train FOMAML and the multi-task baseline on the shared l10n corpus with equal data seen.

    python bench/l10n_meta_train.py --data-root ../shared/data/l10n            # both, 2 processes each
    python bench/l10n_meta_train.py --data-root ../shared/data/l10n --only fomaml --processes 1

Each run is ``metanmt meta-train configs/l10n_<algo>.yaml`` (through ``accelerate launch`` when
``--processes`` > 1, one thread per process); both configs sample the same languages and the same
support + query pairs per step, so equal steps means equal sentence pairs seen. A run that exists
is resumed. Writes bench/results/l10n_meta_train.json: per run the pairs and tokens seen, wall
time, tokens/s, peak memory of the main process, and the dev (Romanian) curve of validation.
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

ROOT = Path(__file__).resolve().parents[1]


def metanmt_command(processes: int) -> list[str]:
    """``python -m metanmt``, or its ``accelerate launch`` on ``processes`` CPU processes (gloo)."""
    if processes <= 1:
        return [sys.executable, "-m", "metanmt"]
    return [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "metanmt"]


def run_one(name: str, args: argparse.Namespace) -> dict:
    out = args.runs / name
    cmd = [*metanmt_command(args.processes), "meta-train", str(ROOT / "configs" / f"l10n_{name}.yaml"), "--output-dir", str(out),
           "--set", f"data.root={args.data_root}", *[x for s in args.set for x in ("--set", s)]]
    if (out / "metanmt.yaml").is_file():
        cmd.append("--resume")
    threads = "1" if args.processes > 1 else str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    print("+", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    wall = time.perf_counter() - started

    from metanmt.engine.checkpoint import latest_trainer_state
    from metanmt.engine.trainer import read_history

    state = latest_trainer_state(out)
    curve = [{k: r[k] for k in ("step", "examples_seen", "tokens_seen", "seconds", "dev_bleu", "dev_chrf", "dev_loss",
                                "dev_loss_zero_shot") if k in r} for r in read_history(out, "validation")]
    train = read_history(out, "train")
    return {
        "command": " ".join(cmd),
        "steps": state["step"],
        "pairs_seen": state["examples_seen"],
        "tokens_seen": state["tokens_seen"],
        "train_seconds": round(state["seconds"], 1),
        "wall_seconds_this_invocation": round(wall, 1),
        "tokens_per_s": round(state["tokens_seen"] / max(state["seconds"], 1e-9), 1),
        "peak_rss_mb_main_process": round(state["peak_rss_mb"], 1),
        "final_train_loss": train[-1]["loss"] if train else None,
        "best_step": state["best_step"],
        "dev_curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--only", choices=["fomaml", "multitask"])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of a single process run")
    parser.add_argument("--set", action="append", default=[], help="override for both runs")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "l10n")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "l10n_meta_train.json")
    args = parser.parse_args()
    args.data_root = args.data_root.resolve()

    import torch
    import transformers

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    for name in [args.only] if args.only else ["fomaml", "multitask"]:
        results["runs"][name] = run_one(name, args)
        results["hardware"] = {"cpu_count": os.cpu_count(), "processes": args.processes, "machine": platform.machine(),
                               "processor": platform.processor() or platform.machine()}
        results["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in results["runs"][name].items() if k != "dev_curve"}, indent=2), flush=True)


if __name__ == "__main__":
    main()
