"""LoRA as the meta-parameters: meta-step cost against full-parameter MAML, and dev quality of
LoRA-meta against LoRA-multitask at equal compute.

    python bench/lora_meta_step.py timing                 # each case in its own process
    python bench/lora_meta_step.py quality --base runs/multi --data-root ../shared/data/l10n
    python bench/lora_meta_step.py timing --tiny --out /tmp/x.json      # plumbing only, seconds

``timing``: bench/meta_step.py's translation setting (Marian from config, d_model 256, 3+3 layers,
4 heads, ffn 1024, vocab 8000, eager attention, dropout off; 16 support + 16 query random pairs of
length 20 per task, meta-batch 4, one inner SGD step, outer Adam 1e-3), timed through the real
``MetaTrainer.meta_step``, for second-order MAML on every parameter ("full") and on LoRA adapters
only ("lora": ``model.lora`` r 8, alpha 16, dropout 0, peft's default target modules q_proj and
v_proj; the base frozen). Per case: the median of ``--steps`` steps after ``--warmup``, the peak
host memory (VmHWM, each case in a fresh process) with the peak already reached before the first
step, on CUDA ``torch.cuda.max_memory_allocated``, and the number of meta-learned elements.
Writes ``bench/results/lora_meta_step.json``. Run it on an idle machine: timings on a shared one
are not comparable.

``quality``: from one pretrained base (``--base``: a ``save_pretrained`` folder with its tokenizer,
e.g. the l10n multi-task run), meta-train LoRA adapters with second-order MAML and with the
multi-task objective on the l10n suite (configs/l10n_multitask.yaml's optimizer and episodes), then
score both on the dev language the way meta-training validation does (fine-tune the adapters on
``ro.4k``, translate and score ``dev/ro``: ``TranslationFamily.validate``). Equal compute:
``--match pairs`` (default) gives both the same steps, i.e. the same languages and sentence pairs
seen; ``--match seconds`` gives the multi-task run as many steps as fit in the MAML run's measured
wall time (its seconds per step from a ``--calibration``-step run). Writes
``bench/results/lora_quality.json`` with each run's steps, pairs, tokens and seconds. Runs are
resumed when their folder exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TIMING_OUT = ROOT / "bench" / "results" / "lora_meta_step.json"
QUALITY_OUT = ROOT / "bench" / "results" / "lora_quality.json"
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None}
CASES = [("full", "maml"), ("lora", "maml")]
TINY_MODEL = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2, "ffn_dim": 64}
TINY_DATA = {"pairs": 4, "length": 8, "vocab": 200}


def meta_step_module() -> Any:
    """bench/meta_step.py (its synthetic translation family and run config), imported by path."""
    spec = importlib.util.spec_from_file_location("bench_meta_step", ROOT / "bench" / "meta_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# -- timing -----------------------------------------------------------------------------------------------
def measure(kind: str, algo: str, steps: int, warmup: int, tiny: bool, lora: dict[str, Any]) -> dict[str, Any]:
    import torch

    from metanmt import registry
    from metanmt.engine.trainer import MetaTrainer, peak_rss_mb

    bench = meta_step_module()
    if tiny:
        bench.SETTINGS["translation"].update(TINY_DATA)
    registry.register("metanmt.task_families", "bench-translation", bench.synthetic_families()["translation"])
    cfg = bench.run_config("translation", algo, "loop")
    if tiny:
        cfg.model.update(TINY_MODEL)
    if kind == "lora":
        cfg.model["lora"] = dict(lora)
    with tempfile.TemporaryDirectory(prefix="lora_meta_step_") as work:
        trainer = MetaTrainer(cfg, Path(work) / "run")
        device = trainer.accelerator.device
        cuda = device.type == "cuda"
        meta_elements = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total_elements = sum(p.numel() for p in trainer.model.parameters())
        before_steps_mb = peak_rss_mb()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def step(k: int) -> float:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            trainer.meta_step(k)
            if cuda:
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        for k in range(warmup):
            step(k)
        times = [step(k) for k in range(warmup, warmup + steps)]
        row = {"kind": kind, "algo": algo, "device": str(device), "ms_per_step": 1000.0 * statistics.median(times),
               "timed_steps": steps, "peak_mb": peak_rss_mb(), "peak_mb_before_steps": before_steps_mb,
               "meta_elements": meta_elements, "model_elements": total_elements, "threads": torch.get_num_threads()}
        if cuda:
            row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if kind == "lora":
            row["lora"] = dict(lora)
        return row


def timing(args: argparse.Namespace) -> dict[str, Any]:
    lora = {**LORA, "r": args.lora_r}
    rows = []
    for kind, algo in CASES:
        if args.in_process:  # the plumbing test: no fresh process per case, so peak memory is shared
            rows.append(measure(kind, algo, args.steps, args.warmup, args.tiny, lora))
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "case", kind, algo, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--lora-r", str(args.lora_r), *(["--tiny"] if args.tiny else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not lines:
            error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"kind": kind, "algo": algo, "error": error})
            print(f"{kind:>5} {algo}: FAILED {error}", flush=True)
            continue
        row = json.loads(lines[-1][4:])
        rows.append(row)
        print(f"{kind:>5} {algo}: {row['ms_per_step']:9.1f} ms/step, peak {row['peak_mb']:.0f} MB "
              f"({row['peak_mb_before_steps']:.0f} MB before the first step), {row['meta_elements']} meta-parameters",
              flush=True)
    by = {(r["kind"], r["algo"]): r for r in rows if "ms_per_step" in r}
    comparison = {}
    if ("full", "maml") in by and ("lora", "maml") in by:
        full, lora_row = by[("full", "maml")], by[("lora", "maml")]
        comparison = {
            "lora_speedup": full["ms_per_step"] / lora_row["ms_per_step"],
            "lora_peak_mb_ratio": lora_row["peak_mb"] / full["peak_mb"],
            "lora_step_memory_ratio": (lora_row["peak_mb"] - lora_row["peak_mb_before_steps"])
            / max(1e-9, full["peak_mb"] - full["peak_mb_before_steps"]),
            "lora_meta_elements_fraction": lora_row["meta_elements"] / full["meta_elements"],
        }
        if "peak_cuda_mb" in full and "peak_cuda_mb" in lora_row:
            comparison["lora_peak_cuda_ratio"] = lora_row["peak_cuda_mb"] / full["peak_cuda_mb"]
        print(json.dumps(comparison), flush=True)
    import torch

    return {"setting": "tiny (plumbing only)" if args.tiny or args.in_process else "bench/meta_step.py translation, d_model 256, 3+3",
            "lora": lora, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
            "torch": torch.__version__, "rows": rows, "comparison": comparison}


# -- quality ----------------------------------------------------------------------------------------------
def quality_config(args: argparse.Namespace, algo: str, steps: int) -> Any:
    from metanmt.config import load_config

    lora = {**LORA, "r": args.lora_r}
    overrides = [f"data.root={args.data_root}", f"model.pretrained={args.base}", f"model.lora={json.dumps(lora)}",
                 f"algorithm.name={algo}", f"train.steps={steps}", "train.trackers=[]", *args.set]
    if algo == "maml":
        overrides += ["algorithm.inner_steps=1", f"algorithm.inner_lr={args.inner_lr}", "algorithm.adapt=['*']"]
    return load_config(ROOT / "configs" / "l10n_multitask.yaml", overrides)


def train_run(cfg: Any, out: Path) -> dict[str, Any]:
    from metanmt.engine.trainer import MetaTrainer

    resume = (out / "metanmt.yaml").is_file()
    started = time.perf_counter()
    MetaTrainer(cfg, out, resume=resume).train()
    from metanmt.adaptation.loading import meta_training_state

    state = meta_training_state(out)
    own = state.get("own", state)  # this run's counters; state's own totals add the base's compute when it was a run
    info = {"run": str(out), "wall_s": time.perf_counter() - started,
            **{k: own.get(k) for k in ("step", "examples_seen", "tokens_seen", "seconds")}, "peak_rss_mb": state.get("peak_rss_mb")}
    if "warm_start" in state:
        info["base_compute"] = state["warm_start"]
    return info


def dev_quality(run_dir: Path) -> dict[str, float]:
    """Fine-tune the adapters on the dev language's budget and score its dev set (validation's protocol)."""
    from metanmt.engine.run import load_run

    run = load_run(run_dir)
    return run.family.validate(run.model)


def quality(args: argparse.Namespace) -> dict[str, Any]:
    if not args.base or not (Path(args.base) / "config.json").is_file():
        raise SystemExit(f"--base {args.base}: not a save_pretrained folder (no config.json)")
    runs = Path(args.runs)
    meta = train_run(quality_config(args, "maml", args.steps), runs / "lora_maml")
    match: dict[str, Any] = {"by": args.match}
    multi_steps = args.steps
    if args.match == "seconds":
        probe = train_run(quality_config(args, "multitask", args.calibration), runs / "lora_multitask_calibration")
        per_step = probe["seconds"] / max(1, probe["step"])
        multi_steps = max(1, round(meta["seconds"] / per_step))
        match.update({"calibration": probe, "multitask_seconds_per_step": per_step})
    multi = train_run(quality_config(args, "multitask", multi_steps), runs / "lora_multitask")
    result = {"base": str(Path(args.base).resolve()), "lora": {**LORA, "r": args.lora_r}, "equal_compute": match,
              "runs": {"lora_maml": meta, "lora_multitask": multi}}
    for name, info in result["runs"].items():
        info["dev"] = dev_quality(Path(info["run"]))
        print(f"{name}: {json.dumps(info)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("timing", help="step time and peak memory, LoRA vs full-parameter MAML")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=LORA["r"])
    p.add_argument("--tiny", action="store_true", help="a tiny model and batches: checks the plumbing in seconds")
    p.add_argument("--in-process", action="store_true", help="all cases in this process (peak memory not per case)")
    p.add_argument("--out", type=Path, default=TIMING_OUT)
    p = sub.add_parser("case", help="(internal) one timing case in this process; prints one ROW line")
    p.add_argument("kind", choices=["full", "lora"])
    p.add_argument("algo", choices=["maml", "fomaml", "reptile", "multitask"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=LORA["r"])
    p.add_argument("--tiny", action="store_true")
    p = sub.add_parser("quality", help="dev quality, LoRA-meta vs LoRA-multitask at equal compute")
    p.add_argument("--base", required=True, type=Path, help="the pretrained base (save_pretrained folder + tokenizer)")
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--steps", type=int, default=400, help="MAML meta-steps (l10n configs: 400)")
    p.add_argument("--inner-lr", type=float, default=0.3)
    p.add_argument("--lora-r", type=int, default=LORA["r"])
    p.add_argument("--match", choices=["pairs", "seconds"], default="pairs")
    p.add_argument("--calibration", type=int, default=10, help="--match seconds: multi-task steps timed first")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "lora_quality")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key of both runs")
    p.add_argument("--out", type=Path, default=QUALITY_OUT)
    args = parser.parse_args(argv)

    if args.command == "case":
        import torch

        torch.set_num_threads(args.threads)
        row = measure(args.kind, args.algo, args.steps, args.warmup, args.tiny, {**LORA, "r": args.lora_r})
        print("ROW " + json.dumps(row), flush=True)
        return 0
    result = timing(args) if args.command == "timing" else quality(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    failed = [r for r in result.get("rows", []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
