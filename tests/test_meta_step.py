"""The meta-step's logged inner-loop metrics, what non-logging steps skip, its buffer, its schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metanmt import registry
from metanmt.config import load_config
from metanmt.engine.algorithms.fomaml import FOMAML
from metanmt.engine.algorithms.maml import MAML
from metanmt.engine.run import load_run
from metanmt.engine.checkpoint import read_history
from metanmt.engine.trainer import MetaTrainer, make_scheduler
from metanmt.errors import ConfigError
from metanmt.tasks.sinusoid import SinusoidFamily

SINE = "configs/sinusoid_maml.yaml"
LR, STEPS = 0.05, 2


def sine_config(**extra):
    sets = ["train.task_batching=loop",  # the per-task path, whose forward passes are counted; vmap cases set it
            "train.steps=1", "train.meta_batch_size=3", "train.save_every=100", "train.log_every=1",
            "train.trackers=[]", "model.hidden=[8, 8]", "task.shots=4", "task.query=5",
            f"algorithm.inner_lr={LR}", f"algorithm.inner_steps={STEPS}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(SINE, sets)


def sgd(family, model, params, batch, steps):
    """``steps`` plain SGD steps from ``params`` on ``batch``, written out by hand."""
    current = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    for _ in range(steps):
        grads = torch.autograd.grad(family.loss(model, current, batch), list(current.values()))
        current = {n: (t - LR * g).detach().requires_grad_() for (n, t), g in zip(current.items(), grads)}
    return current


def hand_metrics(trainer, algo):
    """Mean over the meta-batch of the support loss, the query loss before and after adaptation."""
    family, model = trainer.family, trainer.model
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    for _, episode in trainer.sampler.local_episodes(0):
        train_batch = family.merge_batches(episode.support, episode.query) if algo == "reptile" else episode.support
        adapted = sgd(family, model, init, train_batch, STEPS)
        with torch.no_grad():
            rows.append([float(family.loss(model, init, train_batch)), float(family.loss(model, init, episode.query)),
                         float(family.loss(model, adapted, episode.query))])
    mean = [sum(col) / len(rows) for col in zip(*rows)]
    return {"support_loss": mean[0], "query_loss_before": mean[1], "query_loss_after": mean[2],
            "inner_gain": mean[1] - mean[2]}


@pytest.mark.parametrize("algo,extra", [
    ("maml", {}),
    ("fomaml", {}),
    ("reptile", {}),
    ("maml", {"algorithm.meta_sgd": "true"}),  # the learned rates start at inner_lr: the same adaptation
    ("fomaml", {"train.task_batching": "vmap"}),
    ("maml", {"train.task_batching": "vmap", "train.tasks_per_vmap": 2}),
])
def test_logged_inner_gain_equals_a_hand_computation(tmp_path, algo, extra):
    trainer = MetaTrainer(sine_config(**{"algorithm.name": algo, **extra}), tmp_path / "run")
    expected = hand_metrics(trainer, algo)
    tracked = []
    trainer.accelerator.log = lambda values, step=None, **kw: tracked.append((step, values))  # what TensorBoard gets
    trainer.train()
    record = read_history(tmp_path / "run", "train")[0]
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert tracked[0][1][f"train/{key}"] == record[key]
    assert tracked[0][0] == 1
    assert expected["inner_gain"] > 0, "the test needs an inner loop that helps"


def test_multitask_logs_no_inner_metrics(tmp_path):
    trainer = MetaTrainer(sine_config(**{"algorithm.name": "multitask"}), tmp_path / "run")
    trainer.train()
    record = read_history(tmp_path / "run", "train")[0]
    assert "loss" in record and not {"support_loss", "query_loss_before", "inner_gain"} & set(record)


class CountingSine(SinusoidFamily):
    """Counts forward passes, and whether each one built an autograd graph."""

    name = "counting_sine"
    calls: list[bool] = []

    def loss(self, model, params, batch):
        CountingSine.calls.append(torch.is_grad_enabled())
        return super().loss(model, params, batch)


@pytest.fixture
def counting():
    registry.register(registry.TASK_FAMILIES, "counting_sine", CountingSine)
    yield
    registry._extra[registry.TASK_FAMILIES].pop("counting_sine")


@pytest.mark.parametrize("algo,per_task", [("maml", STEPS + 1), ("fomaml", STEPS + 1), ("reptile", STEPS),
                                           ("multitask", 1)])
def test_a_step_that_does_not_log_pays_no_extra_forward_pass_and_logging_changes_nothing(tmp_path, counting, algo,
                                                                                          per_task):
    results = {}
    for log in (False, True):
        cfg = sine_config(**{"algorithm.name": algo})
        cfg.family = "counting_sine"
        trainer = MetaTrainer(cfg, tmp_path / str(log))
        CountingSine.calls.clear()
        torch.manual_seed(123)
        record = trainer.meta_step(0, log=log)
        results[log] = ({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, torch.get_rng_state(),
                        list(CountingSine.calls), record)
    params, rng, calls, record = results[False]
    assert len(calls) == 3 * per_task and all(calls)  # support steps + query (or the merged batch), nothing else
    assert "grad_norm" not in record and "query_loss_before" not in record
    logged_params, logged_rng, logged_calls, logged_record = results[True]
    assert [c for c in logged_calls if c] == calls  # the passes that build a graph are the same
    # the extra passes: the query loss before adaptation (Reptile: also after, and on all data), without a graph
    assert logged_calls.count(False) == {"multitask": 0, "reptile": 3 * 3}.get(algo, 3 * 1)
    assert "grad_norm" in logged_record and ("inner_gain" in logged_record) == (algo != "multitask")
    assert torch.equal(rng, logged_rng)
    for name in params:
        assert torch.equal(params[name], logged_params[name]), name


def test_the_optimizer_reads_views_of_the_one_buffer(tmp_path):
    trainer = MetaTrainer(sine_config(**{"algorithm.meta_sgd": "true"}), tmp_path / "run")
    seen = {}
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        for name, tensor in trainer.targets().items():
            seen[name] = tensor.grad
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.meta_step(0)
    flat = trainer.buffer.flat
    assert any(n.startswith("inner_lr:") for n in seen)
    for name, grad in seen.items():  # no copies: every .grad lives in the one flat buffer
        assert grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), name
    assert all(p.grad is None for p in trainer.model.parameters())  # and is released after the step


def test_meta_sgd_rates_take_their_own_outer_learning_rate(tmp_path):
    """Adam's first step moves every tensor element with a gradient by its group's lr (m / sqrt(v) = +-1)."""
    trainer = MetaTrainer(sine_config(**{"algorithm.meta_sgd": "true", "algorithm.meta_sgd_lr": "1e-5",
                                         "optim.name": "adam", "optim.lr": "1e-3"}), tmp_path / "run")
    before = {n: t.detach().clone() for n, t in trainer.targets().items()}
    trainer.meta_step(0)
    moved = {n: float((t.detach() - before[n]).abs().max()) for n, t in trainer.targets().items()}
    rates = [m for n, m in moved.items() if n.startswith("inner_lr:")]
    weights = [m for n, m in moved.items() if not n.startswith("inner_lr:")]
    assert rates and weights
    assert max(rates) == pytest.approx(1e-5, rel=1e-3) and max(weights) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ConfigError, match="meta_sgd_lr.*meta_sgd is false"):
        MetaTrainer(sine_config(**{"algorithm.meta_sgd_lr": "1e-5"}), tmp_path / "no_rates")


def test_inner_grad_clip_reaches_training_and_evaluation_inner_loops(tmp_path):
    trainer = MetaTrainer(sine_config(**{"algorithm.inner_grad_clip": "0.5"}), tmp_path / "run")
    assert trainer.inner_loop().grad_clip == 0.5 and trainer.inner_loop(tasks=3).grad_clip == 0.5
    trainer.train()
    assert load_run(tmp_path / "run").inner_loop().grad_clip == 0.5  # the adaptation a user evaluates
    assert MetaTrainer(sine_config(), tmp_path / "plain").inner_loop().grad_clip is None


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "inverse_sqrt"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_schedules_follow_their_formulas(schedule, warmup):
    """transformers' schedules where they are these schedules (no warmup), the hand-written ones elsewhere:
    every step's factor equals the formula the configs were written against."""
    total = 10

    def formula(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        if schedule == "inverse_sqrt":
            return math.sqrt(max(1, warmup) / max(1, step + 1))
        return 1.0

    cfg = load_config(SINE, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}", f"train.steps={total}",
                             "optim.lr=0.5"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    scheduler = make_scheduler(cfg, optimizer)
    if not warmup and schedule != "inverse_sqrt":
        assert "transformers" in getattr(scheduler.lr_lambdas[0], "func", scheduler.lr_lambdas[0]).__module__
    for step in range(total):
        assert scheduler.get_last_lr()[0] == 0.5 * formula(step), step
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("schedule", ["constant", "inverse_sqrt"])
def test_a_cooldown_falls_linearly_to_zero_and_leaves_the_rates_before_it_alone(schedule):
    """optim.cooldown_from: the rates before it are those of a run without it, whatever train.steps is (so a
    run stopped at the cooldown's first update and resumed computes what an uninterrupted one does); from it
    on the rate falls linearly from the one reached there to 0 at the last update."""

    def rates(total: int, cooldown: int) -> list[float]:
        cfg = load_config(SINE, [f"optim.schedule={schedule}", "optim.warmup_steps=3", f"train.steps={total}",
                                 "optim.lr=0.5", f"optim.cooldown_from={cooldown}"])
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        scheduler = make_scheduler(cfg, optimizer)
        out = []
        for _ in range(total):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    plain, cooled, stopped = rates(16, 0), rates(16, 8), rates(8, 8)
    assert cooled[:8] == plain[:8] == stopped
    reached = plain[8]
    assert cooled[8:] == pytest.approx([reached * (16 - step) / 8 for step in range(8, 16)], rel=1e-12)
    assert cooled[-1] == pytest.approx(reached / 8) and cooled[-1] < cooled[-2] < reached
    if schedule == "constant":
        assert reached == 0.5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_cooldown_after_a_decaying_schedule_is_an_error(schedule):
    cfg = load_config(SINE, [f"optim.schedule={schedule}", "train.steps=10", "optim.cooldown_from=5"])
    with pytest.raises(ConfigError, match=f"optim.cooldown_from: .*not {schedule}"):
        make_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5))


def test_fomaml_is_maml_with_the_order_flag_off():
    assert issubclass(FOMAML, MAML) and MAML.second_order and not FOMAML.second_order
    assert FOMAML.task_gradient is MAML.task_gradient
    assert registry.algorithm("maml") is MAML and registry.algorithm("fomaml") is FOMAML


def _bench_meta_step():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_meta_step", Path(__file__).resolve().parents[1] / "bench" / "meta_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_cost_is_the_median_ratio_of_back_to_back_steps(monkeypatch):
    """bench/meta_step.py's paired timing: a meta-step then a plain step, the median of their ratios;
    the machine's speed drifting between pairs (here x1, x3, x1, x1, x2) leaves the ratio alone."""
    bench = _bench_meta_step()
    clock = {"t": 0.0, "speed": 1.0}
    drift = iter([1.0, 3.0, 1.0, 1.0, 2.0])  # the machine's speed during each pair
    calls = []

    def meta(step):
        clock["speed"] = next(drift)
        calls.append(("meta", step))
        clock["t"] += 0.3 * clock["speed"]

    def plain(step):
        calls.append(("plain", step))
        clock["t"] += 0.2 * clock["speed"]

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    out = bench.paired_with_plain(meta, plain, first=7, pairs=5)
    # the plain step's own warm-up first, then meta/plain pairs on the steps after it
    assert calls == [("plain", 7)] + [(kind, s) for s in range(8, 13) for kind in ("meta", "plain")]
    assert out["cost_in_plain_steps_paired"] == pytest.approx(1.5)
    assert out["cost_in_plain_steps_paired_range"] == pytest.approx([1.5, 1.5])
    assert out["paired_steps"] == 5
    assert out["paired_meta_ms"] == pytest.approx(300.0) and out["paired_plain_ms"] == pytest.approx(200.0)
