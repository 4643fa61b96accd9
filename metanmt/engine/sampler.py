"""The task sampler: which episodes a meta-step uses, and which process computes which.

Episode ``j`` of step ``t`` is drawn from its own random stream, seeded by ``(seed, t, j)``. So:

- a meta-batch is the same whatever the number of processes (process ``r`` of ``w`` takes a
  contiguous share of ``j``), which makes N-process training equal to 1-process training;
- no two processes (and no two steps) draw from the same stream, so tasks do not repeat by accident;
- the sampler's position is just the step number: resuming at step ``t`` replays exactly.

    sampler = TaskSampler(family, seed=0, meta_batch_size=25, rank=0, world_size=2)
    for index, episode in sampler.local_episodes(step=7):   # indices 0..12 on rank 0
        ...
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def episode_rng(seed: int, step: int, index: int, split: str = "train") -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES.get(split, 3), step, index])


def episode_torch_seed(seed: int, step: int, index: int) -> int:
    """Seed for torch's RNG (dropout) while computing episode ``index`` of ``step``."""
    return int(np.random.SeedSequence([seed, 9, step, index]).generate_state(1, dtype=np.uint32)[0])


def local_indices(meta_batch_size: int, rank: int, world_size: int) -> range:
    """Contiguous share of ``range(meta_batch_size)`` for ``rank``; sizes differ by at most one."""
    base, extra = divmod(meta_batch_size, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


class TaskSampler:
    def __init__(self, family: Any, seed: int, meta_batch_size: int, rank: int = 0, world_size: int = 1):
        self.family = family
        self.seed = seed
        self.meta_batch_size = meta_batch_size
        self.rank = rank
        self.world_size = world_size

    def indices(self) -> range:
        return local_indices(self.meta_batch_size, self.rank, self.world_size)

    def episode(self, step: int, index: int, split: str = "train") -> Any:
        return self.family.sample_episode(episode_rng(self.seed, step, index, split), split=split)

    def local_episodes(self, step: int, split: str = "train") -> Iterator[tuple[int, Any]]:
        for index in self.indices():
            yield index, self.episode(step, index, split)
