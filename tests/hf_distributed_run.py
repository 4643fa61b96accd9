"""Run by tests/test_hf_trainer.py under ``accelerate launch`` (or plainly, for the 1-process run).

Trains MetaSeq2SeqTrainer with each algorithm for 2 meta-steps on the tiny synthetic corpus and,
on the main process, saves the first meta-gradient, the final parameters and the world size.
"""

import sys
from pathlib import Path

import torch

from metanmt.data.vocab import train_vocab
from metanmt.hf import MetaSeq2SeqTrainer, MetaSeq2SeqTrainingArguments
from tests.test_hf_trainer import LANGS, GradCapture, synthetic_pairs, tiny_model, tokenized


def main(out: Path, algos: list[str]) -> None:
    texts = [t for lang in LANGS for row in synthetic_pairs(lang, 60, 0) for t in (row["src"], row["en"])]
    tok = train_vocab(texts, vocab_size=320)
    train = tokenized(tok, [row for i, lang in enumerate(LANGS) for row in synthetic_pairs(lang, 40, 10 + i)])
    results = {}
    for algo in algos:
        args = MetaSeq2SeqTrainingArguments(
            output_dir=str(out / algo), max_steps=2, meta_algorithm=algo, meta_batch_size=3, inner_steps=2,
            inner_lr=0.1, inner_optimizer="adam" if algo == "reptile" else "sgd", support_tokens=40, query_tokens=40,
            report_to=[], save_strategy="no", seed=0, use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
        capture = GradCapture()
        trainer = MetaSeq2SeqTrainer(model=tiny_model(tok), args=args, train_dataset=train, processing_class=tok,
                                     callbacks=[capture])
        trainer.train()
        results[algo] = {
            "world_size": trainer.accelerator.num_processes,
            "grads": capture.grads,
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "loss": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        }
    if trainer.is_world_process_zero():
        torch.save(results, out / "results.pt")
    if torch.distributed.is_initialized():
        # leave together and take gloo down before the interpreter does: without it a rank now and
        # then died at exit with SIGABRT ("terminate called without an active exception"), 2 runs in 13
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
