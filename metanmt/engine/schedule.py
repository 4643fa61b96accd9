"""The outer learning-rate schedule's factor at an update, as plain arithmetic (no torch, no
transformers): the trainer's LambdaLR uses it, and a study computes from it the rate a warm start
continues at without importing the trainer."""

from __future__ import annotations

import dataclasses
import math

from ..config import OptimConfig


def schedule_factor(o: OptimConfig, total: int, step: int) -> float:
    """The factor of ``o.lr`` for update ``step`` (0-based) of a ``total``-update run: the rate a run
    warm-started after ``step`` updates continues from is ``o.lr * schedule_factor(o, total, step)``."""
    if o.cooldown_from and step >= o.cooldown_from:
        reached = schedule_factor(dataclasses.replace(o, cooldown_from=0), total, o.cooldown_from)
        return reached * max(0.0, (total - step) / max(1, total - o.cooldown_from))
    warmup = max(0, o.warmup_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if o.schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if o.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if o.schedule == "inverse_sqrt":
        return math.sqrt(max(1, warmup) / max(1, step + 1))
    return 1.0
