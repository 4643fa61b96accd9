"""Training throughput on the l10n corpus: metanmt's engine against a plain `transformers` loop.

    OMP_NUM_THREADS=2 python bench/l10n_throughput.py --data-root ../shared/data/l10n   # idle machine
    python bench/l10n_throughput.py --data-root ... --case fomaml      # one case, prints one JSON row

Every case runs in a fresh process on the same threads, model (configs/l10n_frontier.yaml: Marian
d256, 3+3 layers, 8,000-piece vocabulary, dropout 0.1, eager attention) and batches: the episodes
the engine's sampler draws for steps 0..N-1 with the config's seed (one language, ~400 + ~400
English tokens from its token-length order). Cases:

- ``plain``: a plain training loop on those batches, written as the `transformers` documentation
  shows it: ``loss = model(**batch).loss; loss.backward()``, gradient clipping at 1.0, AdamW, with
  support and query of each episode as one batch. The unit of the comparison.
- ``multitask``, ``fomaml``, ``reptile``: ``MetaTrainer.meta_step`` (sampling, the algorithm, the
  outer AdamW step): multitask trains on support + query; fomaml adapts on the support (one SGD
  step, lr 0.3, as configs/l10n_fomaml.yaml) and takes the outer gradient on the query; reptile
  adapts on support then query (one SGD step each) and moves towards the adapted weights.

- ``random``: the machine's reference, independent of the corpus and the engine: the plain step
  on random ids, 16, 32 and 64 pairs of 25 source and 25 target tokens (400, 800, 1,600 target
  tokens). 16 x 25 is the shape of the calibration pilot's plain-step timing (159 ms at 2 threads on
  a 2-core Intel Xeon with AVX-512); the ratio says how much of a per-minute gap to the pilot is the
  machine (``machine`` in the results names the CPU and its vector extension).

English tokens are the target tokens of support and query (``</s>`` included, padding not), the
unit ``train.*_tokens`` and ``tokens_seen`` count; every case sees the same ones. Timing: the
median and the sum of ``--steps`` steps after ``--warmup``; steps that log are excluded (the
engine's hot path). Writes ``bench/results/l10n_throughput.json`` with each engine case's
``cost_in_plain_steps`` (plain tokens/s over its own). Quality does not depend on this timing;
the numbers do: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "l10n_throughput.json"
CONFIG = ROOT / "configs" / "l10n_frontier.yaml"
CASES = ["plain", "multitask", "fomaml", "reptile", "random"]
RANDOM_SHAPES = [(16, 25), (32, 25), (64, 25)]  # (pairs, tokens per side)
ALGORITHMS = {
    "multitask": ["algorithm.name=multitask"],
    "fomaml": ["algorithm.name=fomaml", "algorithm.inner_steps=1", "algorithm.inner_optimizer=sgd", "algorithm.inner_lr=0.3"],
    "reptile": ["algorithm.name=reptile", "algorithm.inner_steps=1", "algorithm.inner_optimizer=sgd", "algorithm.inner_lr=0.3"],
}


def cpu() -> dict:
    """The CPU's model name and widest vector extension (step times move with both)."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    return {"cpu": name, "vector_isa": torch.backends.cpu.get_cpu_capability()}


def run_random(steps: int, warmup: int) -> dict:
    """The plain step (forward, backward, clipping, AdamW) on random ids of fixed shapes."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    from metanmt.config import load_config

    cfg = load_config(CONFIG, ["data.root=unused"]).model  # the family's model keys, as a dict
    torch.manual_seed(0)
    model = MarianMTModel(MarianConfig(vocab_size=8000, d_model=cfg["d_model"], encoder_layers=cfg["encoder_layers"],
                                       decoder_layers=cfg["decoder_layers"], encoder_attention_heads=cfg["attention_heads"],
                                       decoder_attention_heads=cfg["attention_heads"], encoder_ffn_dim=cfg["ffn_dim"],
                                       decoder_ffn_dim=cfg["ffn_dim"], dropout=cfg["dropout"], max_position_embeddings=256,
                                       pad_token_id=0, decoder_start_token_id=0, attn_implementation="eager"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    shapes = {}
    for pairs, length in RANDOM_SHAPES:
        times = []
        for _ in range(warmup + steps):
            src, tgt = torch.randint(4, 8000, (pairs, length)), torch.randint(4, 8000, (pairs, length))
            start = time.perf_counter()
            model(input_ids=src, attention_mask=torch.ones_like(src), labels=tgt).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        shapes[f"{pairs}x{length}"] = {"target_tokens": pairs * length, "median_step_ms": 1000 * statistics.median(times[warmup:])}
    return {"case": "random", "steps": steps, "shapes": shapes, "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_case(case: str, data_root: str, steps: int, warmup: int) -> dict:
    import torch

    if case == "random":
        return run_random(steps, warmup)

    from metanmt.config import load_config
    from metanmt.engine.trainer import MetaTrainer

    overrides = [f"data.root={data_root}", f"train.steps={warmup + steps}", "train.eval_every=0",
                 f"train.save_every={warmup + steps}", f"train.log_every={10 * (warmup + steps)}", "train.trackers=[]"]
    overrides += ALGORITHMS.get(case, ALGORITHMS["multitask"])
    cfg = load_config(CONFIG, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MetaTrainer(cfg, Path(tmp) / "run")
        family = trainer.family
        for lang in family.languages("train"):  # the one-off per-language sort, outside the timing
            family.length_order("train", lang)
        times, tokens = [], []
        if case == "plain":
            model = trainer.model
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
            for step in range(warmup + steps):
                start = time.perf_counter()
                (_, episode), = trainer.sampler.local_episodes(step)
                batch = family.merge_batches(episode.support, episode.query)
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
                tokens.append(family.token_count(batch))
        else:
            for step in range(warmup + steps):
                seen = trainer.state.tokens_seen
                start = time.perf_counter()
                trainer.meta_step(step, log=False)
                trainer.state.step = step + 1
                times.append(time.perf_counter() - start)
                tokens.append(trainer.state.tokens_seen - seen)
        del trainer
    times, tokens = times[warmup:], tokens[warmup:]
    return {"case": case, "steps": steps, "median_step_ms": 1000 * statistics.median(times),
            "updates_per_s": len(times) / sum(times), "english_tokens_per_s": sum(tokens) / sum(times),
            "english_tokens_per_update": sum(tokens) / len(tokens), "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--case", choices=CASES, help="run one case in this process and print its row")
    p.add_argument("--steps", type=int, default=40)
    # the first ~80 steps of a process run up to 3x slower on these variable-shape batches
    # (docs/design.md, "The first steps of a process"): time the steady state after them
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.data_root, args.steps, args.warmup)))
        return
    import torch
    import transformers

    rows = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--data-root", args.data_root, "--case", case, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    plain = next(r for r in rows if r["case"] == "plain")
    for row in rows:
        if row["case"] != "random":
            row["cost_in_plain_steps"] = plain["english_tokens_per_s"] / row["english_tokens_per_s"]
    result = {"config": str(CONFIG.relative_to(ROOT)), "steps": args.steps, "warmup": args.warmup, "rows": rows,
              "machine": {**cpu(), "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                          "transformers": transformers.__version__, "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
