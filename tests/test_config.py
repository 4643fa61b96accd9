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
