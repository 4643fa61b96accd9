import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from metanmt.tasks.sinusoid import SinusoidFamily

torch.set_num_threads(1)


@pytest.fixture
def sine_family() -> SinusoidFamily:
    return SinusoidFamily({"shots": 5, "query": 7}, {"hidden": [6, 5]}, None)


def double_episode(family, seed: int = 0):
    """An episode with float64 tensors (finite differences need them)."""
    ep = family.sample_episode(np.random.default_rng(seed))
    as64 = lambda b: tuple(t.double() for t in b)  # noqa: E731
    return type(ep)(task=ep.task, support=as64(ep.support), query=as64(ep.query))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (pytest -m gpu on a GPU machine: bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
