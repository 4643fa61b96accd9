"""Config loading: suites, overrides, and one clear message per mistake."""

from pathlib import Path

import pytest

from metanmt.config import RunConfig, from_dict, load_config, parse_overrides
from metanmt.engine.trainer import build_family
from metanmt.errors import ConfigError


def test_suite_fills_family_and_task_and_overrides_win():
    cfg = load_config("configs/sinusoid_maml.yaml", ["task.shots=5", "algorithm.inner_steps=3", "optim.lr=1e-4"])
    assert cfg.family == "sinusoid" and cfg.task["shots"] == 5 and cfg.task["query"] == 10
    assert cfg.algorithm.inner_steps == 3 and cfg.optim.lr == pytest.approx(1e-4)
    assert build_family(cfg).task_cfg.shots == 5


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=true", "e=0.5"]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": True, "e": 0.5}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["algorithm.inner_steps"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.inner_stepz=3", r"algorithm.inner_stepz: unknown key; allowed keys in algorithm: name, inner_steps"),
        ("algorithm.inner_steps=many", r"algorithm.inner_steps: expected an integer, got 'many'"),
        ("algorithm.inner_steps=1.5", r"algorithm.inner_steps: expected an integer"),
        ("optim.name=rmsprop", r"optim.name: 'rmsprop' is not allowed; allowed values: adam, adamw, sgd"),
        ("train.mixed_precision=fp8", r"allowed values: no, fp16, bf16"),
        ("algorithm.meta_sgd=yes please", r"algorithm.meta_sgd: expected true or false"),
        ("trainn.steps=3", r"trainn: unknown key; allowed keys in config: suite, family, task, model"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/sinusoid_maml.yaml", [override])


def test_family_sections_are_validated_against_the_family_schema():
    with pytest.raises(ConfigError, match=r"task.shotz: unknown key; allowed keys in task: shots, query"):
        build_family(load_config("configs/sinusoid_maml.yaml", ["task.shotz=3"]))
    with pytest.raises(ConfigError, match=r"model.hidden\[1\]: expected an integer"):
        build_family(load_config("configs/sinusoid_maml.yaml", ["model.hidden=[4, x]"]))


def test_unknown_names_list_what_is_installed():
    from metanmt import registry

    with pytest.raises(ConfigError, match=r"unknown algorithm 'mamll'; available: fomaml, maml, multitask, reptile"):
        registry.algorithm("mamll")
    with pytest.raises(ConfigError, match=r"unknown task family 'sine'; available: .*sinusoid"):
        registry.task_family("sine")


def test_missing_suite_and_missing_family():
    with pytest.raises(ConfigError, match="suite: task suite 'nope.yaml' not found"):
        load_config(None, ["suite=nope.yaml"])
    with pytest.raises(ConfigError, match="no task family given"):
        load_config(None, [])


def test_from_dict_accepts_ints_for_floats_and_yaml_exponents():
    cfg = from_dict(RunConfig, {"family": "x", "optim": {"lr": "1e-3", "grad_clip": 1}})
    assert cfg.optim.lr == 1e-3 and cfg.optim.grad_clip == 1.0


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if not p.name.startswith("accelerate")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    """A typo in a shipped config (a renamed key, a bad value) fails here, not in a user's run."""
    cfg = load_config(path, ["data.root=/data"])
    assert cfg.family and cfg.train.steps > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", r"optim.lr: expected a value > 0, got -1"),
        ("optim.lr=0", r"optim.lr: expected a value > 0"),
        ("optim.betas=[0.9]", r"optim.betas: expected 2 values in \[0, 1\)"),
        ("optim.betas=[0.9, 1.5]", r"optim.betas: expected values in \[0, 1\)"),
        ("optim.momentum=-0.1", r"optim.momentum: expected a value in \[0, 1\)"),
        ("optim.weight_decay=-1", r"optim.weight_decay: expected a value >= 0"),
        ("optim.grad_clip=-1", r"optim.grad_clip: expected a value >= 0"),
        ("optim.warmup_steps=-3", r"optim.warmup_steps: expected a value >= 0"),
        ("train.steps=0", r"train.steps: expected a value >= 1, got 0"),
        ("train.steps=-5", r"train.steps: expected a value >= 1, got -5"),
        ("train.meta_batch_size=0", r"train.meta_batch_size: expected a value >= 1"),
        ("train.save_every=0", r"train.save_every: expected a value >= 1"),
        ("train.seed=-1", r"train.seed: expected a value >= 0"),
        ("algorithm.inner_steps=0", r"algorithm.inner_steps: expected a value >= 1"),
        ("algorithm.inner_lr=-0.01", r"algorithm.inner_lr: expected a value > 0"),
        ("algorithm.eval_inner_lr=0", r"algorithm.eval_inner_lr: expected a value > 0"),
        ("optim.lr=.nan", r"optim.lr: expected a value > 0, got nan"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/sinusoid_maml.yaml", [override])


def test_range_edges_that_mean_something_are_accepted():
    cfg = load_config("configs/sinusoid_maml.yaml", ["optim.grad_clip=0", "optim.betas=[0, 0.999]", "train.eval_every=0",
                                                     "algorithm.eval_inner_steps=0", "optim.grad_clip=null"])
    assert cfg.optim.grad_clip is None and cfg.optim.betas == [0.0, 0.999]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dropout=1.5", r"model.dropout: expected a value in \[0, 1\), got 1.5"),
        ("model.attention_dropout=-0.1", r"model.attention_dropout: expected a value in \[0, 1\)"),
        ("model.encoder_layers=0", r"model.encoder_layers: expected a value >= 1"),
        ("task.dev_finetune_lr=0", r"task.dev_finetune_lr: expected a value > 0"),
        ("task.support_tokens=0", r"task.support_tokens: must be at least 1"),
    ],
)
def test_translation_family_ranges(override, message):
    with pytest.raises(ConfigError, match=message):
        build_family(load_config("configs/quickstart.yaml", [override]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.shots=0", r"task.shots: expected a value >= 1, got 0"),
        ("task.query=-1", r"task.query: expected a value >= 1, got -1"),
        ("task.eval_query=0", r"task.eval_query: expected a value >= 1"),
        ("task.amplitude=[5, 0.1]", r"task.amplitude: expected \[low, high\] with low <= high, got \[5.0, 0.1\]"),
        ("task.amplitude=[-1, 2]", r"task.amplitude: expected finite values >= 0, got \[-1.0, 2.0\]"),
        ("task.amplitude=[1]", r"task.amplitude: expected 2 finite values >= 0, got \[1.0\]"),
        ("task.phase=[0, .inf]", r"task.phase: expected finite values, got \[0.0, inf\]"),
        ("task.phase=[3, 1]", r"task.phase: expected \[low, high\] with low <= high"),
        ("task.x_range=[2, 2]", r"task.x_range: expected \[low, high\] with low < high, got \[2.0, 2.0\]"),
        ("task.x_range=[-5, .nan]", r"task.x_range: expected finite values, got \[-5.0, nan\]"),
        ("model.hidden=[8, 0]", r"model.hidden: expected values >= 1, got \[8, 0\]"),
    ],
)
def test_sinusoid_family_ranges(override, message):
    with pytest.raises(ConfigError, match=message):
        build_family(load_config("configs/sinusoid_maml.yaml", [override]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.ways=1", r"task.ways: expected a value >= 2, got 1"),
        ("task.shots=0", r"task.shots: expected a value >= 1, got 0"),
        ("task.query=0", r"task.query: expected a value >= 1"),
        ("task.image_size=0", r"task.image_size: expected a value >= 1, got 0"),
        ("task.image_size=8", r"task.image_size: 8px is too small for 4 blocks with max pooling"),
        ("task.shift=-1", r"task.shift: expected a value >= 0, got -1"),
        ("task.shift=28", r"task.shift: expected a value in \[0, task.image_size=28\), got 28"),
        ("task.val_characters=-2", r"task.val_characters: expected a value >= 0"),
        ("task.split_seed=-1", r"task.split_seed: expected a value >= 0"),
        ("task.maml_train_characters=0", r"task.maml_train_characters: expected a value >= 1"),
        ("model.blocks=0", r"model.blocks: expected a value >= 1"),
        ("model.bn_eps=0", r"model.bn_eps: expected a value > 0, got 0.0"),
    ],
)
def test_omniglot_family_ranges(override, message):
    """Checked when the family is built, before any data is read (data.root does not exist)."""
    with pytest.raises(ConfigError, match=message):
        build_family(load_config("configs/omniglot_maml_5w1s.yaml", ["data.root=/nonexistent/omniglot", override]))


def test_family_range_edges_that_mean_something_are_accepted():
    sine = build_family(load_config("configs/sinusoid_maml.yaml", ["task.amplitude=[1, 1]", "task.phase=[-3, 3]",
                                                                   "task.shots=1", "model.hidden=[]"]))
    assert sine.task_cfg.amplitude == [1.0, 1.0] and sine.task_cfg.phase == [-3.0, 3.0]
    omni = build_family(load_config("configs/omniglot_maml_5w1s.yaml", ["data.root=/nonexistent/omniglot", "task.ways=2",
                                                                       "task.shift=27", "task.val_characters=0"]))
    assert omni.task_cfg.ways == 2 and omni.task_cfg.shift == 27
