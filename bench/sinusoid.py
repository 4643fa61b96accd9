"""Train MAML and the pretraining baseline on sinusoids to convergence; write the MSE table.

    python bench/sinusoid.py                       # paper settings: 70K meta-steps each
    python bench/sinusoid.py --steps 20000 --set algorithm.meta_sgd=true

Writes bench/results/sinusoid.json:
{"maml": {"5": {"1": mse, "5": mse, "10": mse}, "10": {...}, "20": {...}}, "pretrain": {...},
 "config": {...}, "seconds": t}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metanmt.config import load_config
from metanmt.engine.checkpoint import latest_checkpoint
from metanmt.engine.run import load_run
from metanmt.engine.trainer import MetaTrainer
from metanmt.evaluation.sinusoid import evaluate_sinusoid, format_sinusoid

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70000)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--set", action="append", default=[], help="override for the MAML run")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-sinusoid")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sinusoid.json")
    parser.add_argument("--only", choices=["maml", "pretrain"], help="train and evaluate one of the two")
    args = parser.parse_args()

    started = time.perf_counter()
    result: dict = {"config": {}}
    for name, config, extra in [
        ("maml", "configs/sinusoid_maml.yaml", args.set),
        ("pretrain", "configs/sinusoid_pretrain.yaml", []),
    ]:
        if args.only and name != args.only:
            continue
        sets = [f"train.steps={args.steps}", "train.trackers=[]", *extra]
        cfg = load_config(ROOT / config, sets)
        out = args.runs / name
        t0 = time.perf_counter()
        MetaTrainer(cfg, out, resume=latest_checkpoint(out) is not None).train()
        train_seconds = time.perf_counter() - t0
        table = evaluate_sinusoid(load_run(out), shots=[5, 10, 20], steps=[1, 5, 10], episodes=args.episodes)
        result[name] = {k: {s: v for s, v in row.items() if s != "0"} for k, row in table["mse"].items()}
        # half-widths of the 95% Student t interval over n = eval_episodes sines
        result[f"{name}_ci95"] = {k: {s: v for s, v in row.items() if s != "0"} for k, row in table["ci95"].items()}
        result["config"][name] = {"config": config, "overrides": sets, "train_seconds": round(train_seconds, 1),
                                  "eval_inner_lr": table["inner_lr"], "eval_episodes": args.episodes,
                                  "interval": "95% Student t, n = eval_episodes"}
        print(f"{name} (trained {train_seconds:.0f} s)\n{format_sinusoid(table)}", flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
