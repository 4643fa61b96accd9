"""Run by tests/test_distributed.py under ``accelerate launch`` (or plainly, for the 1-process run).

Trains each algorithm for a few steps and, on the main process, saves the first meta-gradient,
the final parameters and the world size it really ran with (docs/design.md, "Accelerate on several CPU processes").
"""

import sys
from pathlib import Path

import torch

from metanmt.config import load_config
from metanmt.engine.trainer import MetaTrainer


def main(out: Path, config: str, algos: list[str], extra: list[str]) -> None:
    results = {}
    for algo in algos:
        sets = [f"algorithm.name={algo}", "train.trackers=[]", *extra]
        trainer = MetaTrainer(load_config(config, sets), out / algo)
        first_grads: dict[str, torch.Tensor] = {}
        step = trainer.optimizer.step

        def recording_step(*args, _step=step, **kwargs):
            if not first_grads:
                for n, p in trainer.model.named_parameters():
                    if p.grad is not None:
                        first_grads[n] = p.grad.detach().clone()
            return _step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        trainer.train()
        results[algo] = {
            "world_size": trainer.accelerator.num_processes,
            "grads": first_grads,
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        }
    if trainer.accelerator.is_main_process:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4:])
