"""Typed run configs: YAML files validated against dataclasses, with ``--set key=value`` overrides.

A run config (``configs/*.yaml``: how to learn) names a task suite (``tasks/*.yaml``: what to
learn from). The suite's keys fill the ``task`` section; the run config may override any of them.
The ``task`` and ``model`` sections are validated against the schemas of the chosen task family.

    cfg = load_config("configs/sinusoid_maml.yaml", overrides=["algorithm.inner_steps=5"])
    cfg.algorithm.inner_steps  # 5
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError


def at_least(low: float) -> dict[str, Any]:
    """Field metadata: a number >= ``low`` (checked by :func:`from_dict`, naming the key)."""
    return {"range": (low, None, False, False)}


def above(low: float) -> dict[str, Any]:
    """Field metadata: a number > ``low``."""
    return {"range": (low, None, True, False)}


def fraction(length: Optional[int] = None) -> dict[str, Any]:
    """Field metadata: a number (or ``length`` numbers) in [0, 1)."""
    return {"range": (0, 1, False, True), "length": length}


def interval(low: Optional[float] = None, strict: bool = False) -> dict[str, Any]:
    """Field metadata: a ``[low, high]`` pair of finite numbers with low <= high (low < high when
    ``strict``), each >= ``low`` when given (a sampling range such as the sinusoid's amplitudes)."""
    return {"range": (low, None, False, False) if low is not None else None, "length": 2, "finite": True,
            "ordered": "<" if strict else "<="}


def _describe(spec: Any) -> str:
    if spec is None:
        return ""
    low, high, low_open, high_open = spec
    if high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return f"{'>' if low_open else '>='} {low}"


def check_range(value: Any, meta: Any, key: str) -> None:
    """Raise ConfigError when ``value`` (a number or a list of numbers) is outside ``meta``'s range."""
    if not meta or value is None or not any(k in meta for k in ("range", "length", "finite", "ordered")):
        return
    spec, finite, ordered = meta.get("range"), meta.get("finite", False), meta.get("ordered")
    desc = _describe(spec)
    desc = f" {desc}" if desc else ""
    kind = "finite " if finite else ""
    values = value if isinstance(value, list) else [value]
    length = meta.get("length")
    if length is not None and len(values) != length:
        raise ConfigError(f"{key}: expected {length} {kind}values{desc}, got {value!r}")
    for v in values:
        bad = v != v or (finite and v in (float("inf"), float("-inf")))  # NaN compares false with everything
        if spec is not None:
            low, high, low_open, high_open = spec
            bad = bad or (v < low or (low_open and v == low)) or (high is not None and (v > high or (high_open and v == high)))
        if bad:
            noun = f"{kind}values" if isinstance(value, list) else f"a {kind}value"
            raise ConfigError(f"{key}: expected {noun}{desc}, got {value!r}")
    if ordered and len(values) == 2 and not (values[0] < values[1] if ordered == "<" else values[0] <= values[1]):
        raise ConfigError(f"{key}: expected [low, high] with low {ordered} high, got {value!r}")


@dataclass
class AlgorithmConfig:
    name: str = "maml"
    inner_steps: int = field(default=1, metadata=at_least(1))
    inner_lr: float = field(default=0.01, metadata=above(0))
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    eval_inner_steps: Optional[int] = field(default=None, metadata=at_least(0))  # None: same as inner_steps
    eval_inner_lr: Optional[float] = field(default=None, metadata=above(0))  # None: same as inner_lr
    adapt: Optional[list[str]] = None  # fnmatch patterns over parameter names; None: the family's default
    meta_sgd: bool = False  # learn a per-parameter inner learning rate (Meta-SGD)
    # the outer (Adam) learning rate of the Meta-SGD rates; None: optim.lr. Adam moves every tensor by
    # about its lr per step, so at optim.lr=1e-3 a rate that starts at 0.01 can change 10% a step
    meta_sgd_lr: Optional[float] = field(default=None, metadata=above(0))
    # the largest L2 norm of a task's inner gradient (over the adapted tensors) in each inner step; a
    # larger one is scaled down to it, differentiably (None: off). It keeps a diverging inner loop
    # finite, so that the meta-gradient can see the divergence instead of a non-finite loss
    inner_grad_clip: Optional[float] = field(default=None, metadata=above(0))
    support_in_outer: bool = False  # fomaml/maml: add the support loss at the initialization to the outer loss
    multi_step_loss: bool = False  # MAML++: average the query loss over every inner step

    @property
    def steps_at_eval(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    @property
    def lr_at_eval(self) -> float:
        return self.inner_lr if self.eval_inner_lr is None else self.eval_inner_lr


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = field(default=1e-3, metadata=above(0))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=fraction(length=2))
    momentum: float = field(default=0.0, metadata=fraction())
    schedule: Literal["constant", "linear", "cosine", "inverse_sqrt"] = "constant"
    warmup_steps: int = field(default=0, metadata=at_least(0))
    # constant / inverse_sqrt only: from this update on the rate falls linearly to 0 at the last update
    # (a warmup-stable-decay cooldown); the rates before it do not depend on train.steps. 0: none
    cooldown_from: int = field(default=0, metadata=at_least(0))
    grad_clip: Optional[float] = field(default=None, metadata=at_least(0))  # max gradient norm; null or 0 = no clipping


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata=at_least(1))
    meta_batch_size: int = field(default=4, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))
    log_every: int = field(default=50, metadata=at_least(1))
    save_every: int = field(default=500, metadata=at_least(1))
    keep_checkpoints: int = field(default=2, metadata=at_least(0))  # 0: keep all
    eval_every: int = field(default=0, metadata=at_least(0))  # 0: no validation during training
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    on_nonfinite: Literal["stop", "skip"] = "stop"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # execution only, never the gradients: run a process's tasks as one torch.vmap computation
    # (fixed-shape families; maml and fomaml), in groups of `tasks_per_vmap` (0 = all at once);
    # auto: vmap where the family and the algorithm allow it, else the loop
    task_batching: Literal["loop", "vmap", "auto"] = "loop"
    tasks_per_vmap: int = field(default=0, metadata=at_least(0))
    checkpoint_inner: bool = False  # recompute second-order inner steps in backward: memory for time
    # at the end of training, show this many held-out examples from the family (translation: source,
    # reference, zero-shot output and the output after the dev fine-tune); 0 = none
    show_examples: int = field(default=0, metadata=at_least(0))
    # several processes: how long one may wait for the others at a collective (validation runs on the
    # main process alone while the others wait); torch's default is 10 minutes for NCCL
    collective_timeout_minutes: int = 120


@dataclass
class DataConfig:
    root: Optional[str] = None


@dataclass
class RunConfig:
    suite: str = ""
    family: str = ""
    task: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single pattern is a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming the offending key and the allowed ones."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{full}: unknown key; allowed keys in {where}: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], full)
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}
    for key, value in kwargs.items():
        check_range(value, metadata[key], f"{prefix}.{key}" if prefix else str(key))
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. algorithm.inner_steps=5")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def resolve_suite(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Fill ``family`` and the ``task`` section from the suite file the config names."""
    suite = raw.get("suite")
    if not suite:
        return raw
    path = Path(suite)
    candidates = [path] if path.is_absolute() else [base_dir / path, Path.cwd() / path, _package_root() / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"suite: task suite {suite!r} not found (looked in {', '.join(str(c) for c in candidates)})")
    suite_data = read_yaml(found)
    # a config's own `family` wins: a plugin family may reuse a suite (its schema still checks the keys)
    family = suite_data.pop("family", None)
    out = dict(raw)
    out["suite"] = str(found.resolve())
    out["family"] = raw.get("family") or family or ""
    out["task"] = deep_merge(suite_data.get("task", suite_data), raw.get("task") or {})
    return out


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None) -> RunConfig:
    """Read a run config, apply ``--set`` overrides, resolve its suite, and validate every section."""
    raw: dict[str, Any] = dict(base or {})
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        raw = deep_merge(raw, read_yaml(path))
        base_dir = path.resolve().parent
    raw = deep_merge(raw, parse_overrides(overrides or []))
    raw = resolve_suite(raw, base_dir)
    cfg = from_dict(RunConfig, raw)
    if not cfg.family:
        raise ConfigError("family: no task family given (set `suite:` to a tasks/*.yaml file or `family:`)")
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
