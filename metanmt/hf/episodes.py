"""Episodes from a tokenized ``datasets.Dataset`` with a task column, for the engine's algorithms.

:class:`DatasetTasks` plays the part of a task family for the engine (``InnerLoop`` and the
algorithms call ``loss``, ``merge_batches``; the engine's ``TaskSampler`` calls ``sample_episode``)
without being one: the data is the user's tokenized dataset, the batches are made by the user's
data collator (``DataCollatorForSeq2Seq``), and the loss is the model's own loss (its ``labels``
argument), computed functionally so that the inner loop can differentiate through it::

    tasks = DatasetTasks(tokenized, "lang", DataCollatorForSeq2Seq(tokenizer, model=model),
                         ["input_ids", "attention_mask", "labels"], support_tokens=1000, query_tokens=1000)
    sampler = TaskSampler(tasks, seed=42, meta_batch_size=4)      # metanmt.engine.sampler
    for index, episode in sampler.local_episodes(step=7): ...

An episode is one task (one value of the task column): a random start in the task's examples sorted
by length, then a support batch and the disjoint query batch that follows it, sized in target tokens
(``support_tokens`` / ``query_tokens``, the ``labels`` ids, ``</s>`` included) or in examples
(``support_examples`` / ``query_examples``). Similar lengths share a batch, as in the engine's
translation family, because padding costs as much compute as real tokens.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..tasks.base import Episode, TaskFamily, temperature_weights

IGNORE = -100  # the label value that transformers' losses ignore (padding)


class DatasetError(DataError, ValueError):
    """The training dataset cannot give episodes (a missing column, a task too small for an episode).

    A ``ValueError`` for transformers users, a metanmt ``DataError`` for the CLI (exit status 2)."""


class DatasetTasks:
    """The tasks of a tokenized dataset, one per value of ``task_column`` (see the module docstring)."""

    name = "datasets"

    def __init__(
        self,
        dataset: Any,
        task_column: str,
        collator: Any,
        model_columns: Sequence[str],
        support_tokens: int = 1000,
        query_tokens: int = 1000,
        support_examples: Optional[int] = None,
        query_examples: Optional[int] = None,
        task_sampling: str = "uniform",
        temperature: float = 5.0,
        pad_token_id: int = 0,
        label_smoother: Any = None,
    ):
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise DatasetError(f"train_dataset: a datasets.Dataset is needed to build episodes per task, got {type(dataset).__name__}")
        columns = list(dataset.column_names)
        if task_column not in columns:
            raise DatasetError(
                f"train_dataset: no column {task_column!r} (task_column) to group examples into tasks; its columns are "
                f"{', '.join(columns)}. Add the source language as a column, or set task_column to the column that holds it"
            )
        for needed in ("input_ids", "labels"):
            if needed not in columns:
                raise DatasetError(f"train_dataset: no column {needed!r}; episodes need a tokenized dataset "
                                   f"(input_ids and labels, e.g. tokenizer(src, text_target=tgt)); its columns are {', '.join(columns)}")
        if (support_examples is None) != (query_examples is None):
            raise ConfigError("support_examples / query_examples: set both (episode sizes in examples) or neither (sizes in tokens)")
        by_examples = support_examples is not None
        sizes = (support_examples, query_examples) if by_examples else (support_tokens, query_tokens)
        for key, value in zip(("support", "query"), sizes):
            if value is None or value < 1:
                raise ConfigError(f"{key}_{'examples' if by_examples else 'tokens'}: must be at least 1, got {value}")
        if task_sampling not in ("uniform", "temperature"):
            raise ConfigError(f"task_sampling: {task_sampling!r}; allowed values: uniform, temperature")
        self.dataset = dataset
        self._python_rows = dataset.with_format(None)  # lists for the collator, whatever format the user set
        self.task_column = task_column
        self.collator = collator
        self.model_columns = [c for c in model_columns if c in columns and c != task_column]
        self.by_examples = by_examples
        self.support_size, self.query_size = sizes
        self.pad_token_id = pad_token_id
        self.label_smoother = label_smoother
        self.forward_tokens = 0  # input tokens of every forward pass so far (the Trainer's flos estimate)

        import pyarrow.compute as pc

        table = dataset.with_format("arrow")
        names = table[task_column].to_pylist()
        label_lengths = pc.list_value_length(table["labels"]).to_numpy(zero_copy_only=False).astype(np.int64)
        input_lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(str(name), []).append(row)
        if not groups:
            raise DatasetError("train_dataset: no examples")
        self.tasks = sorted(groups)  # a fixed order, whatever the row order: episodes depend on (seed, step, index) only
        self.rows = {t: np.asarray(groups[t], dtype=np.int64) for t in self.tasks}
        self.label_lengths = {t: label_lengths[self.rows[t]] for t in self.tasks}
        self._orders = {}
        for t in self.tasks:
            ties = np.random.default_rng([zlib.crc32(t.encode()), 5]).random(len(self.rows[t]))
            self._orders[t] = np.lexsort((ties, input_lengths[self.rows[t]] + self.label_lengths[t]))
        self._check_sizes()
        counts = [len(self.rows[t]) for t in self.tasks]
        self.probabilities = temperature_weights(counts, temperature if task_sampling == "temperature" else float("inf"))

    def _check_sizes(self) -> None:
        """Every task must fill a whole episode; one error lists every task that cannot."""
        small = []
        for t in self.tasks:
            n, tokens = len(self.rows[t]), int(self.label_lengths[t].sum())
            if self.by_examples and n < self.support_size + self.query_size:
                small.append(f"{t!r} ({n} examples)")
            elif not self.by_examples and (n < 2 or tokens < self.support_size + self.query_size):
                small.append(f"{t!r} ({n} examples, {tokens} target tokens)")
        if small:
            need = (f"support_examples + query_examples = {self.support_size + self.query_size} examples" if self.by_examples
                    else f"support_tokens + query_tokens = {self.support_size + self.query_size} target tokens (labels)")
            raise DatasetError(f"train_dataset: task column {self.task_column!r}: {len(small)} task(s) too small for one "
                               f"episode, which needs {need}: {', '.join(small)}; drop those tasks or make episodes smaller")

    # -- episodes (TaskSampler calls sample_episode with the rng of (seed, step, index)) ------------
    def sample_episode(self, rng: np.random.Generator, split: str = "train") -> Episode:
        if split != "train":
            raise ConfigError(f"split {split!r}: a training dataset gives training episodes only")
        task = self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]
        order = np.roll(self._orders[task], -int(rng.integers(len(self._orders[task]))))
        if self.by_examples:
            support = order[: self.support_size]
            query = order[self.support_size : self.support_size + self.query_size]
        else:
            lengths = self.label_lengths[task]
            support, pos = _fill(lengths, order, 0, self.support_size)
            query, _ = _fill(lengths, order, pos, self.query_size)
        rows = self.rows[task]
        return Episode(task=task, support=self.collate(rows[support]), query=self.collate(rows[query]))

    def collate(self, rows: np.ndarray) -> dict[str, Tensor]:
        """The collator's batch of these dataset rows (model columns only), as a dict of tensors."""
        batch = self._python_rows[[int(r) for r in rows]]
        features = [{c: batch[c][i] for c in self.model_columns} for i in range(len(rows))]
        return {k: v for k, v in self.collator(features).items() if isinstance(v, Tensor)}

    # -- what InnerLoop and the algorithms call -------------------------------------------------------
    def loss(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """The model's own loss on ``batch`` (token-mean cross-entropy of ``labels`` for seq2seq models; the
        Trainer's label smoothing when ``label_smoothing_factor`` is set), with its tensors replaced by ``params``."""
        self.forward_tokens += int(batch["input_ids"].numel())
        inputs = dict(batch)
        labels = inputs.pop("labels") if self.label_smoother is not None else None
        # tie_weights: one entry for a shared embedding also replaces its tied copies (output projection)
        out = torch.func.functional_call(model, params, args=(), kwargs={**inputs, "use_cache": False, "return_dict": True},
                                         tie_weights=True, strict=False)
        if self.label_smoother is not None:
            return self.label_smoother(out, labels)
        return out.loss

    def merge_batches(self, first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
        """One batch holding both (multitask and Reptile train on support + query): padded to the longer width."""
        out = {}
        for key in first:
            a, b = first[key], second[key]
            if a.dim() >= 2 and a.shape[1] != b.shape[1]:
                value = IGNORE if key == "labels" else 0 if key.endswith("attention_mask") else self.pad_token_id
                width = max(a.shape[1], b.shape[1])
                a = F.pad(a, (0, width - a.shape[1]), value=value)
                b = F.pad(b, (0, width - b.shape[1]), value=value)
            out[key] = torch.cat([a, b])
        return out

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return TaskFamily.to_device(self, batch, device)  # type: ignore[arg-type]

    def batch_size(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def token_count(self, batch: dict[str, Tensor]) -> int:
        """Target tokens of a batch (the unit of ``support_tokens``)."""
        return int((batch["labels"] != IGNORE).sum())


def _fill(lengths: np.ndarray, order: np.ndarray, pos: int, budget: int) -> tuple[np.ndarray, int]:
    """Positions from ``pos`` in ``order`` while their target tokens fit ``budget`` (at least one)."""
    start, tokens = pos, 0
    while pos < len(order):
        n = int(lengths[order[pos]])
        if pos > start and tokens + n > budget:
            break
        tokens += n
        pos += 1
    return order[start:pos], pos
