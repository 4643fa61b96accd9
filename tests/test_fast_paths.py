"""Fast paths change how a meta-step is computed, never what: each is checked against the plain path.

- ``InnerLoop(tasks=T)`` (``train.task_batching: vmap``) against the per-task loop,
- ``InnerLoop(checkpoint=True)`` (``train.checkpoint_inner``) against keeping every inner step,
- the fused batch norm of the Omniglot net against the primitive-op one (and, in test_omniglot.py,
  against finite differences).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metanmt.config import AlgorithmConfig, load_config
from metanmt.engine.algorithms.fomaml import FOMAML
from metanmt.engine.algorithms.maml import MAML
from metanmt.engine.inner import InnerLoop
from metanmt.engine.trainer import MetaTrainer
from metanmt.errors import ConfigError
from metanmt.tasks.base import Episode
from metanmt.tasks.omniglot import OmniglotConvNet, TaskBatchNorm
from metanmt.tasks.sinusoid import SinusoidFamily

from .test_omniglot import family as omniglot_family
from .test_omniglot import omni_root  # noqa: F401  (fixture)


def sine_episodes(family: SinusoidFamily, count: int) -> list[Episode]:
    out = []
    for i in range(count):
        ep = family.sample_episode(np.random.default_rng([7, i]))
        as64 = lambda b: tuple(t.double() for t in b)  # noqa: E731
        out.append(Episode(ep.task, as64(ep.support), as64(ep.query)))
    return out


def loop_and_batched(algorithm, family, model, episodes, inner_kwargs, learned_lrs=None):
    """The sum of the per-task contributions, and the same from one task-batched computation."""
    params = {n: p for n, p in model.named_parameters()}
    learned = learned_lrs or {}
    lr = learned if learned else inner_kwargs.pop("lr")
    names = [n for n in params]
    loop_inner = InnerLoop(family, model, names, lr=lr, **inner_kwargs)
    total: dict[str, torch.Tensor] = {}
    loss = 0.0
    for ep in episodes:
        r = algorithm.task_gradient(loop_inner, params, ep, learned)
        loss += r.loss
        for n, g in r.grads.items():
            total[n] = total.get(n, 0) + g
    stacked = Episode("all", family.stack_batches([e.support for e in episodes]),
                      family.stack_batches([e.query for e in episodes]))
    batched_inner = InnerLoop(family, model, names, lr=lr, tasks=len(episodes), **inner_kwargs)
    b = algorithm.task_gradient(batched_inner, params, stacked, learned)
    return total, loss, b.grads, b.loss


@pytest.mark.parametrize(
    "algo,cfg,inner",
    [
        (MAML, {}, {"steps": 1, "lr": 0.05}),
        (MAML, {}, {"steps": 3, "lr": 0.01, "optimizer": "adam"}),
        (MAML, {"multi_step_loss": True, "support_in_outer": True}, {"steps": 2, "lr": 0.05}),
        (FOMAML, {"support_in_outer": True}, {"steps": 2, "lr": 0.05}),
        (MAML, {"multi_step_loss": True}, {"steps": 2, "lr": 0.05, "grad_clip": 1.0}),  # each task's own norm
    ],
)
def test_task_batched_inner_loop_equals_the_per_task_loop(algo, cfg, inner, sine_family) -> None:
    torch.manual_seed(0)
    model = sine_family.build_model().double()
    episodes = sine_episodes(sine_family, 4)
    loop, loop_loss, batched, batched_loss = loop_and_batched(algo(AlgorithmConfig(**cfg)), sine_family, model, episodes,
                                                              dict(inner))
    assert float(batched_loss) == pytest.approx(float(loop_loss), rel=1e-12)  # floats: pytest 9's approx refuses 0-d tensors
    for name in loop:
        torch.testing.assert_close(batched[name], loop[name], rtol=1e-10, atol=1e-12, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in loop.values())


@pytest.mark.parametrize("multi_step_loss", [False, True])  # True: configs/sinusoid_metasgd_multistep.yaml's recipe
def test_task_batched_meta_sgd_rates_get_the_loop_gradient(sine_family, multi_step_loss) -> None:
    torch.manual_seed(0)
    model = sine_family.build_model().double()
    rates = {n: torch.full_like(p, 0.03, requires_grad=True) for n, p in model.named_parameters()}
    loop, _, batched, _ = loop_and_batched(MAML(AlgorithmConfig(meta_sgd=True, multi_step_loss=multi_step_loss)),
                                           sine_family, model,
                                           sine_episodes(sine_family, 3), {"steps": 2}, learned_lrs=rates)
    assert any(n.startswith("inner_lr:") for n in loop)
    for name in loop:
        torch.testing.assert_close(batched[name], loop[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("steps", [1, 4])
def test_task_batched_omniglot_meta_gradient_equals_the_loop(omni_root: Path, steps: int) -> None:
    """vmap runs the primitive-op batch norm, the loop the fused kernel: both give one meta-gradient
    (in float64; in float32 their rounding differs, and several steps of a large α amplify it)."""
    fam = omniglot_family(omni_root)
    torch.manual_seed(0)
    model = fam.build_model().double()
    episodes = []
    for i in range(3):
        ep = fam.sample_episode(np.random.default_rng([3, i]))
        d = lambda b: {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}  # noqa: E731
        episodes.append(Episode(ep.task, d(ep.support), d(ep.query)))
    loop, _, batched, _ = loop_and_batched(MAML(AlgorithmConfig()), fam, model, episodes, {"steps": steps, "lr": 0.4})
    for name in loop:
        torch.testing.assert_close(batched[name], loop[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpointed_inner_loop_gives_the_same_meta_gradient(optimizer, sine_family) -> None:
    torch.manual_seed(0)
    model = sine_family.build_model().double()
    params = {n: p for n, p in model.named_parameters()}
    ep = sine_episodes(sine_family, 1)[0]
    results = []
    for checkpoint in (False, True):
        inner = InnerLoop(sine_family, model, list(params), steps=4, lr=0.02, optimizer=optimizer, checkpoint=checkpoint)
        results.append(MAML(AlgorithmConfig(multi_step_loss=True)).task_gradient(inner, params, ep, {}).grads)
    for name in params:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-12, atol=1e-14, msg=name)


def test_fused_and_primitive_batch_norm_give_the_same_meta_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = OmniglotConvNet(ways=3, hidden=4, blocks=2).double()
    with torch.no_grad():
        for block in model.blocks:
            block.norm.weight.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    sx, qx = (torch.rand(6, 1, 12, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    y = torch.arange(3).repeat(2)
    from torch.func import functional_call
    import torch.nn.functional as F

    def meta_gradient() -> list[torch.Tensor]:
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        loss = lambda p, x: F.cross_entropy(functional_call(model, p, (x,)), y)  # noqa: E731
        grads = torch.autograd.grad(loss(params, sx), list(params.values()), create_graph=True)
        adapted = {n: p - 0.4 * g for (n, p), g in zip(params.items(), grads)}
        return list(torch.autograd.grad(loss(adapted, qx), list(params.values())))

    fused = meta_gradient()
    monkeypatch.setattr(TaskBatchNorm, "use_fused", False)
    primitive = meta_gradient()
    for a, b in zip(fused, primitive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def sine_config(**extra):
    sets = ["train.task_batching=loop", "train.steps=2", "train.meta_batch_size=5", "train.save_every=2", "train.trackers=[]",
            "model.hidden=[8, 8]", "task.shots=4", "task.query=4"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config("configs/sinusoid_maml.yaml", sets)


@pytest.mark.parametrize("algo,per_vmap", [("maml", 0), ("maml", 2), ("fomaml", 0)])
def test_trainer_with_vmap_matches_the_loop(tmp_path: Path, algo: str, per_vmap: int) -> None:
    weights = []
    for mode in ("loop", "vmap"):
        trainer = MetaTrainer(sine_config(**{"algorithm.name": algo, "train.task_batching": mode,
                                             "train.tasks_per_vmap": per_vmap}), tmp_path / mode)
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        history = (tmp_path / mode / "history.jsonl").read_text()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6, msg=name)
    assert "loss" in history


def test_vmap_group_with_a_non_finite_task_is_redone_per_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One bad task in a vmapped group: the group is redone task by task, so only that task is skipped."""
    original = SinusoidFamily.loss

    def loss(self, model, params, batch):  # a task whose first point lies beyond 4 gets an infinite target
        x, y = batch
        return original(self, model, params, (x, torch.where(x[:1, :1] > 4.0, torch.full_like(y, float("inf")), y)))

    monkeypatch.setattr(SinusoidFamily, "loss", loss)
    trainer = MetaTrainer(sine_config(**{"train.task_batching": "vmap", "train.on_nonfinite": "skip",
                                         "train.meta_batch_size": 25, "train.steps": 1}), tmp_path / "run")
    trainer.train()
    assert 0 < trainer.state.skipped_tasks < 25
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_vmap_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="maml and fomaml, not reptile"):
        MetaTrainer(sine_config(**{"algorithm.name": "reptile", "train.task_batching": "vmap"}), tmp_path / "a")
    with pytest.raises(ConfigError, match="tasks_per_vmap"):
        MetaTrainer(sine_config(**{"train.tasks_per_vmap": -1}), tmp_path / "b")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("algo,expected", [("maml", "vmap"), ("fomaml", "vmap"), ("reptile", "loop"), ("multitask", "loop")])
def test_auto_task_batching_takes_vmap_where_it_applies_and_the_loop_elsewhere(tmp_path: Path, algo: str,
                                                                               expected: str) -> None:
    trainer = MetaTrainer(sine_config(**{"algorithm.name": algo, "train.task_batching": "auto"}), tmp_path / "run")
    assert trainer.task_batching == expected
    groups = trainer._task_groups(list(range(5)))
    assert groups == ([[0, 1, 2, 3, 4]] if expected == "vmap" else [[i] for i in range(5)])
    trainer.train()  # and it trains
    assert trainer.state.step == 2
