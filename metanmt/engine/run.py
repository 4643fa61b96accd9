"""Load a finished (or in-progress) run directory for evaluation, adaptation or plotting.

    run = load_run("runs/sine-maml")
    run.family, run.model, run.cfg.algorithm.inner_lr
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..errors import UserError
from ..files import saved_model_problem
from ..tasks.base import TaskFamily
from . import checkpoint as ckpt
from .checkpoint import load_run_config
from .inner import InnerLoop, select_names
from .trainer import build_family, load_learned_lrs


@dataclass
class Run:
    directory: Path
    cfg: RunConfig
    family: TaskFamily
    model: nn.Module
    learned_lrs: dict[str, Tensor] | None

    def adapt_names(self, patterns: list[str] | None = None) -> list[str]:
        return select_names(self.model, patterns or self.cfg.algorithm.adapt or self.family.default_adapt)

    def inner_loop(self, steps: int | None = None, lr: float | None = None, patterns: list[str] | None = None) -> InnerLoop:
        """The evaluation-time inner loop: the config's eval steps and rate unless given."""
        a = self.cfg.algorithm
        rate: Any = a.lr_at_eval if lr is None else lr
        if self.learned_lrs is not None and lr is None:
            rate = self.learned_lrs
        return InnerLoop.for_algorithm(self.family, self.model, self.adapt_names(patterns), a,
                                       a.steps_at_eval if steps is None else steps, rate)


def load_run(directory: str | Path, device: str | torch.device = "cpu", model_dir: str | Path | None = None,
             double_backward: bool | None = None) -> Run:
    """``model_dir`` picks another saved model of the run (e.g. ``best/``); default the latest.
    ``double_backward=False``: the model is for fine-tuning or decoding (fast attention where the
    family has one); None: the family's default (ready for second-order MAML)."""
    directory = Path(directory)
    cfg = load_run_config(directory)
    family = build_family(cfg)
    if double_backward is not None:
        family.use_double_backward(double_backward)
    source = Path(model_dir) if model_dir else directory
    problem = saved_model_problem(source)
    if problem:
        raise UserError(f"{problem}; the saved model is damaged (another saved model of the run, e.g. "
                        f"{directory / 'best'}, or `meta-train --resume` from a checkpoint can replace it)")
    try:
        model = family.load_model(source)
    except (OSError, FileNotFoundError) as exc:
        raise UserError(f"{source}: no saved model could be loaded ({exc})") from None
    model.to(device).eval()
    return Run(directory=directory, cfg=cfg, family=family, model=model, learned_lrs=load_learned_lrs(source))


def export_checkpoint(directory: str | Path, step: int, dest: str | Path) -> Path:
    """The run's model at its checkpoint ``step`` as a ``save_pretrained`` folder ``dest`` (tokenizer
    included) with that checkpoint's ``trainer_state.json``: a warm start (``model.pretrained``) from
    a run that has trained past that step, whose compute ``compare`` then counts. ``dest`` is replaced."""
    checkpoint = Path(directory) / ckpt.CHECKPOINTS / f"step_{step:08d}"
    problem = ckpt.checkpoint_problem(checkpoint) if checkpoint.is_dir() else "no such checkpoint"
    if problem:
        raise UserError(f"{checkpoint}: {problem}")
    run = load_run(directory, double_backward=False)
    run.model.load_state_dict(ckpt.model_state(checkpoint))
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    run.family.save_model(run.model, dest)
    shutil.copy2(checkpoint / "trainer_state.json", dest / "trainer_state.json")
    return dest
