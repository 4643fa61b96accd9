"""A separate package adds a task family and an algorithm through entry points, without editing metanmt."""

import sys
import textwrap

import numpy as np
import pytest

from metanmt import registry
from metanmt.config import load_config
from metanmt.engine.trainer import MetaTrainer

PLUGIN = '''
import numpy as np
import torch
from metanmt.engine.algorithms.base import Algorithm, TaskResult, grads_of
from metanmt.tasks.sinusoid import SinusoidFamily


class ShiftedSine(SinusoidFamily):
    """Sines with every target shifted up by 10: a family that lives outside metanmt."""
    name = "shifted_sine"

    def sample_episode(self, rng, split="train", shots=None):
        episode = super().sample_episode(rng, split, shots)
        episode.support[1].add_(10.0)
        episode.query[1].add_(10.0)
        return episode


class QueryOnly(Algorithm):
    """Plain training on the query set only: an algorithm that lives outside metanmt."""
    name = "query_only"
    uses_inner_loop = False

    def task_gradient(self, inner, params, episode, learned_lrs):
        loss = inner.loss(params, episode.query)
        return TaskResult(grads=grads_of(loss, params), loss=float(loss.detach()))
'''


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "my_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [metanmt.task_families]
        shifted_sine = my_plugin:ShiftedSine

        [metanmt.algorithms]
        query_only = my_plugin:QueryOnly
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_plugin", None)


def test_entry_points_register_a_family_and_an_algorithm(plugin_package, tmp_path):
    assert "shifted_sine" in registry.available(registry.TASK_FAMILIES)
    assert "query_only" in registry.available(registry.ALGORITHMS)
    family = registry.task_family("shifted_sine")({}, {}, None)
    episode = family.sample_episode(np.random.default_rng(0))
    assert float(episode.support[1].mean()) > 5.0
    cfg = load_config("configs/sinusoid_maml.yaml", ["family=shifted_sine", "algorithm.name=query_only", "train.steps=30",
                                                     "train.trackers=[]", "optim.lr=0.01", "train.meta_batch_size=4"])
    summary = MetaTrainer(cfg, tmp_path / "run").train()
    first = MetaTrainer(cfg, tmp_path / "run0", overwrite=True)
    assert summary["loss"] < first.meta_step(0)["loss"]  # it learned the shift


def test_builtins_are_entry_points_too():
    from importlib.metadata import entry_points

    assert {"sinusoid", "omniglot", "translation"} <= {ep.name for ep in entry_points(group=registry.TASK_FAMILIES)}
    assert {"maml", "fomaml", "reptile", "multitask"} <= {ep.name for ep in entry_points(group=registry.ALGORITHMS)}
