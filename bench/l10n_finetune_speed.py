"""Fine-tuning and scoring speed on the CPU: whole batches against micro-batches, and file-order
scoring batches against sorted ones, measured side by side on the same init and data.

    OMP_NUM_THREADS=1 python bench/l10n_finetune_speed.py --init RUN --data-root ../shared/data/l10n \\
        [--langs fi tr ko lv] [--budget 4k] [--updates 20] [--rounds 2]

``RUN`` is any translation run of the shipped architecture (the speed does not depend on the
weights); the committed results used ``configs/l10n_frontier.yaml`` trained for 1,500 updates.
Per language, ``--rounds`` rounds alternate the two ways (so a drift of the machine's speed hits
both), each on a fresh copy of the init:

- **fine-tuning**: ``TrainingLoop`` updates (all parameters, Adam 3e-4, batches of 1,000 target
  tokens, the compare recipe's) with each batch at once (``micro_tokens=None``, the loop as it was)
  and as sorted micro-batches of 250 target tokens (the CPU default); seconds per update after
  ``--warmup`` untimed updates, the median over rounds;
- **scoring**: the teacher-forced NLL of the 500 test segments in file order and batches of 2,000
  target tokens (the scorer as it was) against :meth:`TranslationFamily.sentence_losses` (sorted
  batches of 500); both corpus NLLs and the largest per-sentence difference are recorded, since
  the scores must not change.

Results: ``bench/results/l10n_finetune_speed.json``. Needs an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from l10n_throughput import cpu  # noqa: E402 (bench/ is not a package)

OUT = ROOT / "bench" / "results" / "l10n_finetune_speed.json"


def file_order_losses(family, model, pairs, max_tokens: int = 2000) -> list[float]:
    """Per-sentence NLL the way the scorer batched before: file order, cut at ``max_tokens``."""
    import torch

    from metanmt.tasks.translation.batching import plan_batches
    from metanmt.tasks.translation.model import forward, restored_train_mode, token_cross_entropy

    encoded = family.encode(pairs)
    nats = [0.0] * len(encoded)
    with torch.no_grad(), restored_train_mode(model, False):
        for rows in plan_batches([len(t) for _, t in encoded], max_tokens, None):
            batch = family.collate([encoded[i] for i in rows])
            loss = token_cross_entropy(forward(model, None, batch), batch["labels"], reduction="none")
            for i, value in zip(rows, loss.view(len(rows), -1).sum(1).tolist()):
                nats[i] = value
    return nats


def seconds_per_update(loaded, pairs, micro_tokens, updates: int, warmup: int) -> float:
    from metanmt.tasks.base import select_names
    from metanmt.tasks.translation.training import LoopPosition, TrainingLoop

    model = copy.deepcopy(loaded.model).train()
    loop = TrainingLoop(loaded.family, model, pairs, select_names(model, ["*"]), 3e-4, 1000, seed=0, grad_clip=1.0,
                        micro_tokens=micro_tokens)
    at = LoopPosition()
    for _ in range(warmup):
        loop.update(at)
    started = time.perf_counter()
    for _ in range(updates):
        loop.update(at)
    return (time.perf_counter() - started) / updates


def measure(loaded, data_root: Path, lang: str, args) -> dict:
    from metanmt.data.corpus import read_pairs
    from metanmt.tasks.translation.training import CPU_MICRO_TOKENS

    train = read_pairs(data_root / "finetune" / f"{lang}.{args.budget}.tsv.gz")
    test = read_pairs(data_root / "test" / f"{lang}.tsv.gz")[:500]
    encoded = loaded.family.encode(train)
    whole, micro, old_scoring, new_scoring = [], [], [], []
    for _ in range(args.rounds):
        whole.append(seconds_per_update(loaded, train, None, args.updates, args.warmup))
        micro.append(seconds_per_update(loaded, train, CPU_MICRO_TOKENS, args.updates, args.warmup))
        started = time.perf_counter()
        old = file_order_losses(loaded.family, loaded.model, test)
        old_scoring.append(time.perf_counter() - started)
        started = time.perf_counter()
        new, tokens = loaded.family.sentence_losses(loaded.model, test)
        new_scoring.append(time.perf_counter() - started)
    row = {
        "lang": lang, "budget": args.budget, "train_pairs": len(train),
        "source_tokens_per_target_token": round(sum(len(s) for s, _ in encoded) / sum(len(t) for _, t in encoded), 3),
        "whole_batch_s_per_update": statistics.median(whole), "micro_batch_s_per_update": statistics.median(micro),
        "file_order_scoring_s": statistics.median(old_scoring), "sorted_scoring_s": statistics.median(new_scoring),
        "rounds": {"whole": whole, "micro": micro, "file_order_scoring": old_scoring, "sorted_scoring": new_scoring},
        "test_segments": len(test), "nll_file_order": sum(old) / sum(tokens), "nll_sorted": sum(new) / sum(tokens),
        "max_sentence_nll_difference": max(abs(a - b) for a, b in zip(old, new)),
    }
    row["fine_tune_speedup"] = row["whole_batch_s_per_update"] / row["micro_batch_s_per_update"]
    row["scoring_speedup"] = row["file_order_scoring_s"] / row["sorted_scoring_s"]
    print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True, type=Path, help="a translation run of the shipped architecture")
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--langs", nargs="+", default=["fi", "tr", "ko", "lv"])
    p.add_argument("--budget", default="4k")
    p.add_argument("--updates", type=int, default=20, help="timed updates per round and way")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates before them")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()

    import torch
    import transformers

    from metanmt.adaptation.loading import meta_training_state, open_translation_model
    from metanmt.tasks.translation.training import CPU_MICRO_TOKENS

    loaded = open_translation_model(args.init)
    rows = [measure(loaded, args.data_root.resolve(), lang, args) for lang in args.langs]
    info = {
        "init": str(args.init), "init_step": meta_training_state(args.init).get("step"),
        "micro_tokens": CPU_MICRO_TOKENS, "batch_target_tokens": 1000, "scoring_batch_tokens": {"file_order": 2000, "sorted": 500},
        "updates": args.updates, "warmup": args.warmup, "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        **cpu(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
