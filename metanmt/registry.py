"""Plugins by name: task families and algorithms are found through Python entry points.

A separate package adds its own in its ``pyproject.toml``::

    [project.entry-points."metanmt.task_families"]
    my_family = "my_pkg.family:MyFamily"

    [project.entry-points."metanmt.algorithms"]
    my_algo = "my_pkg.algo:MyAlgorithm"

The built-in ones are registered the same way by metanmt's own ``pyproject.toml``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .errors import ConfigError

TASK_FAMILIES = "metanmt.task_families"
ALGORITHMS = "metanmt.algorithms"

_extra: dict[str, dict[str, Any]] = {TASK_FAMILIES: {}, ALGORITHMS: {}}


def register(group: str, name: str, obj: Any) -> None:
    """Register without an entry point (for tests and notebooks)."""
    _extra[group][name] = obj


def available(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group=group)} | set(_extra[group]))


def _unknown(group: str, name: str) -> ConfigError:
    kind = "task family" if group == TASK_FAMILIES else "algorithm"
    return ConfigError(f"unknown {kind} {name!r}; available: {', '.join(available(group)) or '(none installed)'}")


def check(group: str, name: str) -> None:
    """The error :func:`load` would raise for an unknown name, without importing the plugin."""
    if name not in available(group):
        raise _unknown(group, name)


def load(group: str, name: str) -> Any:
    if name in _extra[group]:
        return _extra[group][name]
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        raise _unknown(group, name)
    return matches[0].load()


def task_family(name: str) -> Any:
    return load(TASK_FAMILIES, name)


def algorithm(name: str) -> Any:
    return load(ALGORITHMS, name)
