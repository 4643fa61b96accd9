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


def check_directional_derivatives(loss_fn, params, grads, names, directions=3, eps=1e-5, seed=1):
    """Central finite differences of ``loss_fn()`` along random directions over the float64 tensors
    ``params[n]`` for ``n`` in ``names`` (moved in place and put back) against ``grads``: the exact
    check of a meta-gradient (second-order terms included) that no autograd shortcut can pass."""
    gen = torch.Generator().manual_seed(seed)

    def shift(direction, scale):
        with torch.no_grad():
            for n in names:
                params[n].add_(scale * direction[n])

    for _ in range(directions):
        direction = {n: torch.randn(params[n].shape, generator=gen, dtype=torch.float64) for n in names}
        analytic = sum(float((grads[n] * direction[n]).sum()) for n in names)
        shift(direction, eps)
        up = loss_fn()
        shift(direction, -2 * eps)
        down = loss_fn()
        shift(direction, eps)
        assert analytic == pytest.approx(float(up - down) / (2 * eps), rel=1e-5, abs=1e-8)  # floats: approx refuses 0-d tensors


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (pytest -m gpu on a GPU machine: bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: the libraries whose versions a test run reports (pyproject.toml bounds them; constraints.txt pins the tested set)
REPORTED_VERSIONS = ("torch", "transformers", "accelerate", "peft", "datasets", "sacrebleu", "sentencepiece",
                     "huggingface_hub", "safetensors", "numpy", "scipy", "pytest")


def pytest_terminal_summary(terminalreporter):
    """Every test run ends by saying which versions it ran with (shown with -q too; CI's log keeps it)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "missing"

    import platform

    terminalreporter.write_line(f"ran with: python {platform.python_version()}, " + ", ".join(f"{name} {of(name)}" for name in REPORTED_VERSIONS))
