"""The outer loop: its update, checkpoints and resume, run directories, non-finite losses."""

import math

import pytest
import torch
from safetensors.torch import load_file

from metanmt import registry
from metanmt.config import load_config
from metanmt.engine import checkpoint as ckpt
from metanmt.engine.inner import InnerLoop
from metanmt.engine.sampler import TaskSampler, local_indices
from metanmt.engine.checkpoint import read_history
from metanmt.engine.trainer import MetaTrainer
from metanmt.errors import NonFiniteError, UserError
from metanmt.tasks.sinusoid import SinusoidFamily

SINE = "configs/sinusoid_maml.yaml"


def small(algo="maml", steps=4, **extra):
    sets = [
        f"algorithm.name={algo}",
        f"train.steps={steps}",
        "train.meta_batch_size=3",
        "train.save_every=2",
        "train.log_every=1",
        "train.trackers=[]",
        "model.hidden=[8, 8]",
        "task.shots=4",
        "task.query=4",
    ]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(SINE, sets)


def params_of(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_sampler_shares_a_meta_batch_between_processes():
    assert [list(local_indices(25, r, 2)) for r in range(2)] == [list(range(13)), list(range(13, 25))]
    assert sum(len(local_indices(7, r, 3)) for r in range(3)) == 7
    family = SinusoidFamily({}, {}, None)
    one = [e.task for _, e in TaskSampler(family, 0, 5).local_episodes(3)]
    two = [e.task for r in range(2) for _, e in TaskSampler(family, 0, 5, r, 2).local_episodes(3)]
    assert one == two and len(set(one)) == 5
    assert one != [e.task for _, e in TaskSampler(family, 0, 5).local_episodes(4)]


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "multitask"])
def test_meta_step_applies_the_mean_task_contribution(tmp_path, algo):
    cfg = small(algo, **{"optim.name": "sgd", "optim.lr": 0.5})
    trainer = MetaTrainer(cfg, tmp_path / "run")
    before = params_of(trainer)
    params = {n: p for n, p in trainer.model.named_parameters()}
    inner = InnerLoop(trainer.family, trainer.model, trainer.adapt_names, cfg.algorithm.inner_steps, cfg.algorithm.inner_lr)
    contributions = [
        trainer.algorithm.task_gradient(inner, params, episode, {}).grads for _, episode in trainer.sampler.local_episodes(0)
    ]
    trainer.meta_step(0)
    for name, p in trainer.model.named_parameters():
        mean = torch.stack([c[name] for c in contributions]).mean(0)
        assert torch.allclose(p.detach(), before[name] - 0.5 * mean, atol=1e-6)


def test_reptile_with_outer_sgd_interpolates_toward_the_mean_adapted_weights(tmp_path):
    cfg = small("reptile", **{"optim.name": "sgd", "optim.lr": 0.3, "algorithm.inner_steps": 3})
    trainer = MetaTrainer(cfg, tmp_path / "run")
    before = params_of(trainer)
    inner = trainer.inner_loop()
    adapted = []
    for _, episode in trainer.sampler.local_episodes(0):
        batch = trainer.family.merge_batches(episode.support, episode.query)
        start = {n: t.clone().requires_grad_() for n, t in before.items()}
        adapted.append({n: t.detach() for n, t in inner.adapt(start, batch, create_graph=False).params.items()})
    trainer.meta_step(0)
    for name, p in trainer.model.named_parameters():
        mean_adapted = torch.stack([a[name] for a in adapted]).mean(0)
        assert torch.allclose(p.detach(), before[name] + 0.3 * (mean_adapted - before[name]), atol=1e-6)


def test_run_directory_is_loadable_and_refuses_a_second_run(tmp_path):
    out = tmp_path / "run"
    MetaTrainer(small(), out).train()
    assert (out / "metanmt.yaml").is_file() and (out / "model.safetensors").is_file()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_00000002", "step_00000004"]
    with pytest.raises(UserError, match="already holds a run"):
        MetaTrainer(small(), out)
    with pytest.raises(UserError, match="holds a different run"):
        MetaTrainer(small(**{"algorithm.inner_lr": 0.5}), out, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a metanmt run"):
        MetaTrainer(small(), tmp_path / "other")
    MetaTrainer(small(), out, overwrite=True)  # allowed


def test_a_cooldown_branched_on_resume_ends_where_an_uninterrupted_run_with_it_ends(tmp_path):
    """Warmup-stable-decay: a run stopped before its cooldown may be resumed with the cooldown added or
    moved (its rates so far do not depend on it), and ends with exactly the weights of one run with that
    cooldown; once a checkpoint is inside a cooldown, moving it is refused."""
    import shutil

    stable = tmp_path / "stable"
    MetaTrainer(small(steps=4, **{"optim.cooldown_from": 4}), stable).train()
    branch = tmp_path / "branch"
    shutil.copytree(stable, branch)
    MetaTrainer(small(steps=8, **{"optim.cooldown_from": 6}), branch, resume=True).train()
    whole = MetaTrainer(small(steps=8, **{"optim.cooldown_from": 6}), tmp_path / "whole")
    whole.train()
    branched = load_file(str(branch / "model.safetensors"))
    assert branched.keys() == dict(whole.model.named_parameters()).keys()
    for name, p in whole.model.named_parameters():
        assert torch.equal(branched[name], p.detach()), name
    plain = MetaTrainer(small(steps=8), tmp_path / "plain")
    plain.train()
    assert not all(torch.equal(branched[n], p.detach()) for n, p in plain.model.named_parameters())

    with pytest.raises(UserError, match=r"optim.cooldown_from 4 -> 2: .* update 4, inside the cooldown already"):
        MetaTrainer(small(steps=8, **{"optim.cooldown_from": 2}), stable, resume=True)
    with pytest.raises(UserError, match=r"optim.cooldown_from 6 -> none: .* update 8, inside the cooldown"):
        MetaTrainer(small(steps=10), branch, resume=True)


def test_resume_accepts_a_run_saved_before_newer_keys_and_from_a_moved_checkout(tmp_path):
    """A config saved by an older metanmt lacks keys added since (they default to the old behaviour)
    and names the suite file by the absolute path of the checkout it came from."""
    import yaml

    out = tmp_path / "run"
    MetaTrainer(small(steps=2), out).train()
    saved = yaml.safe_load((out / "metanmt.yaml").read_text())
    del saved["train"]["show_examples"], saved["train"]["collective_timeout_minutes"]
    saved["suite"] = "/elsewhere/an-older-checkout/tasks/sinusoid.yaml"
    (out / "metanmt.yaml").write_text(yaml.safe_dump(saved))
    trainer = MetaTrainer(small(steps=4), out, resume=True)  # accepted
    assert trainer.state.step == 2
    del trainer
    # a key the old run lacks, set now to something other than its default, is a change
    with pytest.raises(UserError, match=r"train.show_examples: 0 -> 3"):
        MetaTrainer(small(steps=4, **{"train.show_examples": 3}), out, resume=True)
    # and so is a task key that differs (the suite's contents are compared, not its path)
    with pytest.raises(UserError, match=r"task.shots: 4 -> 5"):
        MetaTrainer(small(steps=4, **{"task.shots": 5}), out, resume=True)


def test_export_checkpoint_gives_the_weights_and_compute_of_that_step(tmp_path):
    """A warm start from a run that trained past the step: that checkpoint's weights, saved like a
    model folder, with its trainer state (which compare counts)."""
    import json

    from metanmt.engine.run import export_checkpoint

    out = tmp_path / "run"
    MetaTrainer(small(steps=4, **{"train.keep_checkpoints": 0}), out).train()
    step2 = ckpt.list_checkpoints(out)[0]
    dest = export_checkpoint(out, 2, tmp_path / "at2")
    family = registry.task_family("sinusoid")({"shots": 4, "query": 4}, {"hidden": [8, 8]}, None)
    exported = family.load_model(dest).state_dict()
    saved = ckpt.model_state(step2)
    assert set(exported) == set(saved) and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert not all(torch.equal(exported[k], v) for k, v in load_file(out / "model.safetensors").items())  # not step 4's
    assert json.loads((dest / "trainer_state.json").read_text())["step"] == 2
    with pytest.raises(UserError, match="step_00000003: no such checkpoint"):
        export_checkpoint(out, 3, tmp_path / "at3")


def test_run_finished_reads_the_latest_checkpoint_against_the_config(tmp_path):
    """What a benchmark's rerun asks before training again: nothing before the first checkpoint, the
    latest checkpoint's state after, finished once that reaches train.steps (a resume may raise it)."""
    out = tmp_path / "run"
    assert ckpt.latest_trainer_state(out) == {}
    MetaTrainer(small(steps=2), out).train()
    assert ckpt.latest_trainer_state(out)["step"] == 2 and ckpt.run_finished(out)
    resumed = MetaTrainer(small(steps=4), out, resume=True)  # train.steps raised on resume, not trained yet
    assert resumed.state.step == 2 and not ckpt.run_finished(out)
    resumed.train()
    assert ckpt.latest_trainer_state(out)["step"] == 4 and ckpt.run_finished(out)


class Crash(Exception):
    pass


@pytest.mark.parametrize("algo,rates_lr", [("maml", None), ("maml", 1e-4), ("reptile", None)])
def test_resume_after_a_crash_gives_bitwise_the_same_parameters(tmp_path, monkeypatch, algo, rates_lr):
    extra = {"optim.schedule": "linear", "optim.warmup_steps": 2, "algorithm.meta_sgd": algo == "maml"}
    if rates_lr is not None:  # the Meta-SGD rates in their own optimizer group
        extra["algorithm.meta_sgd_lr"] = rates_lr
    whole = MetaTrainer(small(algo, steps=6, **extra), tmp_path / "whole")
    whole.train()

    crashing = MetaTrainer(small(algo, steps=6, **extra), tmp_path / "crash")
    original = MetaTrainer.meta_step

    def crash_at_5(self, step):
        if step == 4:
            raise Crash()
        return original(self, step)

    monkeypatch.setattr(MetaTrainer, "meta_step", crash_at_5)
    with pytest.raises(Crash):
        crashing.train()
    monkeypatch.setattr(MetaTrainer, "meta_step", original)
    assert ckpt.latest_checkpoint(tmp_path / "crash").name == "step_00000004"  # saved after step 4 of 6
    resumed = MetaTrainer(small(algo, steps=6, **extra), tmp_path / "crash", resume=True)
    assert resumed.state.step == 4
    resumed.train()
    for name, p in whole.model.named_parameters():
        assert torch.equal(p, dict(resumed.model.named_parameters())[name]), name
    if algo == "maml":
        assert all(torch.equal(a, b) for a, b in zip(whole.learned_lrs.rates, resumed.learned_lrs.rates))
    whole_log, resumed_log = read_history(tmp_path / "whole", "train"), read_history(tmp_path / "crash", "train")
    assert [r["step"] for r in resumed_log] == [r["step"] for r in whole_log] == list(range(1, 7))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in whole_log]
    for name, t in load_file(str(tmp_path / "whole" / "model.safetensors")).items():
        assert torch.equal(t, load_file(str(tmp_path / "crash" / "model.safetensors"))[name])


def test_same_seed_same_checkpoint(tmp_path):
    a = MetaTrainer(small("fomaml"), tmp_path / "a")
    a.train()
    b = MetaTrainer(small("fomaml"), tmp_path / "b")
    b.train()
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    c = MetaTrainer(small("fomaml", **{"train.seed": 1}), tmp_path / "c")
    c.train()
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


class PoisonedSine(SinusoidFamily):
    """Tasks with a large amplitude yield NaN targets."""

    name = "poisoned_sine"

    def sample_episode(self, rng, split="train", shots=None):
        episode = super().sample_episode(rng, split, shots)
        if float(episode.task.split(",")[0].split("=")[1]) > 4.7:
            episode.query[1][0] = math.nan
        return episode


@pytest.fixture
def poisoned():
    registry.register(registry.TASK_FAMILIES, "poisoned_sine", PoisonedSine)
    yield
    registry._extra[registry.TASK_FAMILIES].pop("poisoned_sine")


def test_nonfinite_loss_stops_naming_step_task_and_checkpoint(tmp_path, poisoned):
    cfg = small(steps=50)
    cfg.family = "poisoned_sine"
    trainer = MetaTrainer(cfg, tmp_path / "run")
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .* on A=") as info:
        trainer.train()
    step = int(str(info.value).split()[1].rstrip(":"))
    assert step > 0, "the test needs a few good steps first"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    if step >= 2:
        assert "last good checkpoint" in str(info.value) and "step_0000" in str(info.value)


def test_nonfinite_tasks_can_be_skipped_and_counted(tmp_path, poisoned):
    cfg = small(steps=20, **{"train.on_nonfinite": "skip"})
    cfg.family = "poisoned_sine"
    trainer = MetaTrainer(cfg, tmp_path / "run")
    summary = trainer.train()
    assert summary["skipped_tasks"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_run_stopped_on_nonfinite_resumes_with_skip(tmp_path, poisoned):
    """The stop error's advice works: the same run continues from its last good checkpoint with skip."""
    cfg = small(steps=50)
    cfg.family = "poisoned_sine"
    with pytest.raises(NonFiniteError) as info:
        MetaTrainer(cfg, tmp_path / "run").train()
    assert "step_0000" in str(info.value), "the test needs a checkpoint before the bad step"
    cfg = small(steps=50, **{"train.on_nonfinite": "skip"})
    cfg.family = "poisoned_sine"
    trainer = MetaTrainer(cfg, tmp_path / "run", resume=True)
    assert trainer.state.step > 0
    summary = trainer.train()
    assert trainer.state.step == 50 and summary["skipped_tasks"] > 0
    cfg = small(steps=50, **{"train.on_nonfinite": "skip", "algorithm.inner_lr": 0.5})
    cfg.family = "poisoned_sine"
    with pytest.raises(UserError, match="different run.*inner_lr"):  # other changes are still refused
        MetaTrainer(cfg, tmp_path / "run", resume=True)


def test_grad_clip_zero_means_no_clipping(tmp_path):
    """0 is "off", as in the fine-tuning recipe; clip_grad_norm_(..., 0) would zero every gradient."""
    moved = []
    for clip in ("null", "0"):
        trainer = MetaTrainer(small("maml", steps=1, **{"optim.grad_clip": clip}), tmp_path / clip)
        before = params_of(trainer)
        trainer.train()
        moved.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    assert any(float(d.abs().max()) > 0 for d in moved[1].values())
    for name in moved[0]:
        torch.testing.assert_close(moved[1][name], moved[0][name], rtol=0, atol=0)
