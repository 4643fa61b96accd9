"""Two CPU processes (gloo) give the same meta-gradients and parameters as one process."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ALGOS = "maml,fomaml,reptile,multitask"
SINE_SETS = [
    "train.steps=3",
    "train.meta_batch_size=5",  # uneven split: 3 tasks on one process, 2 on the other
    "train.save_every=100",
    "model.hidden=[8, 8]",
    "optim.name=sgd",
    "optim.lr=0.1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, processes: int, config: str, sets: list[str]) -> dict:
    script = str(ROOT / "tests" / "distributed_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if processes == 1:
        cmd = [sys.executable, script]
    else:
        launcher = shutil.which("accelerate")
        if launcher is None:
            pytest.skip("the accelerate launcher is not on PATH")
        # docs/design.md, "Accelerate on several CPU processes": --multi_gpu with Accelerator(cpu=True) is what gives MULTI_CPU on gloo
        cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), script]
    proc = subprocess.run([*cmd, str(out), config, ALGOS, *sets], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "results.pt")


@pytest.mark.slow
def test_two_processes_equal_one_on_the_sinusoid(tmp_path):
    config = str(ROOT / "configs" / "sinusoid_maml.yaml")
    single = run(tmp_path / "one", 1, config, SINE_SETS)
    double = run(tmp_path / "two", 2, config, SINE_SETS)
    for algo in ALGOS.split(","):
        assert single[algo]["world_size"] == 1
        assert double[algo]["world_size"] == 2, "accelerate did not start two processes"
        for name, g in single[algo]["grads"].items():
            assert torch.allclose(g, double[algo]["grads"][name], atol=1e-6, rtol=1e-5), (algo, name)
        for name, p in single[algo]["params"].items():
            assert torch.allclose(p, double[algo]["params"][name], atol=1e-6, rtol=1e-5), (algo, name)


@pytest.mark.slow
def test_two_processes_equal_one_on_a_tiny_translation_model(tmp_path, monkeypatch):
    from tests.test_translation_engine import TINY

    monkeypatch.setenv("METANMT_CACHE", str(tmp_path / "vocab-cache"))
    config = str(ROOT / "configs" / "quickstart.yaml")
    # dropout stays on: each episode's dropout stream is seeded by (seed, step, index) too
    sets = [*TINY, "model.dropout=0.1", "train.steps=2", "train.meta_batch_size=3", "train.save_every=100",
            "train.eval_every=0", "optim.name=sgd", "optim.lr=0.5", "optim.warmup_steps=0", "algorithm.inner_steps=2"]
    single = run(tmp_path / "one", 1, config, sets)
    double = run(tmp_path / "two", 2, config, sets)
    for algo in ALGOS.split(","):
        assert double[algo]["world_size"] == 2, "accelerate did not start two processes"
        for name, g in single[algo]["grads"].items():
            assert torch.allclose(g, double[algo]["grads"][name], atol=1e-6, rtol=1e-4), (algo, name)
        for name, p in single[algo]["params"].items():
            assert torch.allclose(p, double[algo]["params"][name], atol=1e-6, rtol=1e-4), (algo, name)
