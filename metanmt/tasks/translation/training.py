"""The fine-tuning loop, the one every fine-tune runs: validation during meta-training
(:meth:`TranslationFamily.finetune`), ``metanmt finetune`` and ``compare``
(:class:`metanmt.adaptation.finetune.Finetuner`, which adds budgets, evaluation, early stopping and
resumable checkpoints on top of it).

    loop = TrainingLoop(family, model, pairs, names=select_names(model, ["*"]), lr=3e-4, max_tokens=1000, seed=0)
    position = LoopPosition()
    for _ in range(100):
        loss, rows = loop.update(position)        # one Adam update; position moves to the next batch

Adam (constant learning rate) on the named parameters; batches of ``max_tokens`` target tokens from
seeded, length-bucketed epochs over the pairs (:func:`~.batching.plan_batches`, a fresh generator per
epoch), so a run continues exactly from any ``(epoch, position)`` and two initializations see the
same data in the same order.

On the CPU an update runs its batch as micro-batches of similar source length (``micro_tokens``
target tokens each, gradients summed), the same gradient as the whole batch at a fraction of the
cost: a batch is planned by its English tokens, so its sources (1.8-3.2x longer in the l10n
languages) were padded to the longest one, and the 8,000-way logits of a 1,000-token batch
take 32 MB (docs/design.md, "Fine-tuning and scoring on a CPU").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...data.corpus import Pair
from ..base import select_names
from .batching import Encoded, epoch_rng, micro_batches, plan_batches
from .model import forward, token_cross_entropy


#: micro-batch size on the CPU, in target tokens: fi / ko 4k updates 1.3x / 2.1x faster than whole
#: 1,000-token batches, 125 about as fast as 250 (docs/design.md, "Fine-tuning and scoring on a CPU")
CPU_MICRO_TOKENS = 250


@dataclass
class LoopPosition:
    """Where the loop is in its seeded data order: the epoch and the next batch of its plan."""

    epoch: int = 0
    position: int = 0


class TrainingLoop:
    """Adam on ``names`` over seeded epochs of ``pairs`` (see the module docstring)."""

    def __init__(self, family: Any, model: nn.Module, pairs: list[Pair], names: list[str], lr: float, max_tokens: int,
                 seed: int = 0, grad_clip: Optional[float] = None, device: str | torch.device | None = None,
                 micro_tokens: Optional[int] | str = "auto"):
        self.family, self.model = family, model
        self.max_tokens, self.seed, self.grad_clip = max_tokens, seed, grad_clip
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # None: the whole batch at once (an accelerator's choice, and the loop before micro-batches)
        self.micro_tokens = (CPU_MICRO_TOKENS if self.device.type == "cpu" else None) if micro_tokens == "auto" else micro_tokens
        self.encoded = family.encode(pairs)
        self.lengths = [len(t) for _, t in self.encoded]
        self.batches_per_epoch = len(plan_batches(self.lengths, max_tokens, None))
        chosen = set(names)
        self.optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if n in chosen], lr=lr)
        self._plan: Optional[tuple[int, list[list[int]]]] = None  # (epoch, its batches)

    def plan(self, epoch: int) -> list[list[int]]:
        """The batches (index lists) of ``epoch``, in their seeded order."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_batches(self.lengths, self.max_tokens, epoch_rng(self.seed, epoch)))
        return self._plan[1]

    def next_rows(self, at: LoopPosition) -> list[tuple[list[int], list[int]]]:
        """The encoded pairs of the next batch; moves ``at`` past it (into the next epoch when one ends)."""
        if at.position >= len(self.plan(at.epoch)):
            at.epoch, at.position = at.epoch + 1, 0
        rows = [self.encoded[i] for i in self.plan(at.epoch)[at.position]]
        at.position += 1
        return rows

    def update(self, at: LoopPosition, nonfinite: Optional[Callable[[], Exception]] = None
               ) -> tuple[torch.Tensor, Encoded]:
        """One update on the next batch: token-mean cross-entropy, backward, clip, Adam step.
        Returns the loss (before the step) and the batch's rows. ``nonfinite`` builds the error
        raised, before any weight changes, when the loss is not finite (None: no check)."""
        rows = self.next_rows(at)
        tokens = sum(len(target) for _, target in rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for part in micro_batches(rows, self.micro_tokens):
            batch = self.family.to_device(self.family.collate(part), self.device)
            # each part's token sum over the batch's tokens: the parts add up to the batch's token mean
            part_loss = token_cross_entropy(forward(self.model, None, batch), batch["labels"], reduction="sum") / tokens
            if nonfinite is not None and not torch.isfinite(part_loss):
                raise nonfinite()
            part_loss.backward()
            loss = loss + part_loss.detach()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.grad_clip)
        self.optimizer.step()
        return loss, rows


def train_updates(family: Any, model: nn.Module, pairs: list[Pair], steps: int, lr: float, max_tokens: int,
                  adapt: list[str], seed: int = 0, key: str = "adapt") -> nn.Module:
    """``steps`` updates of :class:`TrainingLoop` on the parameters matching ``adapt`` (in place), no
    evaluation, no checkpoints; the model is left in eval mode. ``key`` names the setting of
    ``adapt`` in errors."""
    loop = TrainingLoop(family, model, pairs, select_names(model, adapt, key), lr, max_tokens, seed)
    model.train()
    at = LoopPosition()
    for _ in range(steps):
        loop.update(at)
    model.eval()
    return model
