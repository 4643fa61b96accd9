"""A separate package adds a task family and an algorithm through entry points, without editing metanmt."""

import json
import sys
import textwrap

import numpy as np
import pytest

from metanmt import registry
from metanmt.cli import main
from metanmt.config import load_config
from metanmt.errors import ConfigError
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


class CountedSine(SinusoidFamily):
    """A family with its own token unit and its own `metanmt evaluate`, named by a string like an entry point."""
    name = "counted_sine"
    evaluator = "my_plugin:evaluate_counted"

    def token_count(self, batch):
        return 3 * int(batch[0].shape[0])  # three "tokens" per point


def evaluate_counted(run, args):
    """The plugin's evaluator: the query loss of a few test episodes at the initialization."""
    params = dict(run.model.named_parameters())
    losses = [float(run.family.loss(run.model, params, run.family.sample_episode(np.random.default_rng(i), "test").query).detach())
              for i in range(args.episodes or 3)]
    return {"plugin_loss": sum(losses) / len(losses), "episodes": len(losses)}, f"plugin loss {sum(losses) / len(losses):.4f}"


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
        counted_sine = my_plugin:CountedSine

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


def test_an_unknown_name_is_refused_before_any_plugin_is_imported(plugin_package):
    """meta-train checks the names right after reading the config, before the trainer's imports: the
    check lists what is installed and imports none of it."""
    with pytest.raises(ConfigError, match=r"unknown algorithm 'mamll'; available: .*fomaml, maml, multitask, "
                                          r"query_only, reptile"):
        registry.check(registry.ALGORITHMS, "mamll")
    with pytest.raises(ConfigError, match="unknown task family 'sinusiod'"):
        registry.check(registry.TASK_FAMILIES, "sinusiod")
    registry.check(registry.TASK_FAMILIES, "shifted_sine")
    assert "my_plugin" not in sys.modules  # named, not loaded
    assert registry.task_family("shifted_sine").__module__ == "my_plugin"


def test_a_plugin_family_gets_token_counts_and_its_own_evaluate(plugin_package, tmp_path, capsys):
    cfg = load_config("configs/sinusoid_maml.yaml", ["family=counted_sine", "algorithm.name=multitask", "train.steps=2",
                                                     "train.trackers=[]", "train.meta_batch_size=2", "train.eval_every=0"])
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.train()
    shots, queries = trainer.family.task_cfg.shots, trainer.family.task_cfg.query
    # the engine counts the family's own unit through the contract: 2 steps x 2 tasks x (support + query) x 3
    assert trainer.state.tokens_seen == 2 * 2 * 3 * (shots + queries)
    assert main(["evaluate", str(tmp_path / "run"), "--episodes", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 4 and result["plugin_loss"] > 0
    # a family naming an evaluator that is not there: one line, exit status 2
    sys.modules["my_plugin"].CountedSine.evaluator = "my_plugin:missing"
    assert main(["evaluate", str(tmp_path / "run"), "--json"]) == 2
    assert "evaluator 'my_plugin:missing' cannot be loaded" in capsys.readouterr().err
