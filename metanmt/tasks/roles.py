"""Parameters by module role, found from a ``transformers`` model's structure, not from names.

    role_parameter_names(model, ["@embeddings", "@encoder"])   # MetaNMT's embeddings + encoder

Roles, as ``@role`` entries beside fnmatch patterns in any adaptation setting:

- ``@embeddings``: the input token embeddings (``get_input_embeddings()``, and the encoder's and the
  decoder's own ``get_input_embeddings()`` when untied);
- ``@encoder``: everything under ``get_encoder()`` (its embeddings included);
- ``@decoder``: everything under ``get_decoder()``;
- ``@lm_head``: the output projection (``get_output_embeddings()``).

A tied tensor belongs to every role that uses it and is listed once, under the name
``named_parameters()`` gives it (``model.shared.weight`` in Marian, ``shared.weight`` in T5), so the
same preset selects the same modules in Marian, mBART, M2M100/NLLB and T5/mT5.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import ConfigError

ROLES = ("embeddings", "encoder", "decoder", "lm_head")


def _call(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def _role_modules(model: nn.Module, role: str) -> list[nn.Module]:
    if role == "embeddings":
        found = [_call(model, "get_input_embeddings")]
        for part in (_call(model, "get_encoder"), _call(model, "get_decoder")):
            if part is not None:
                found.append(_call(part, "get_input_embeddings"))
        return [m for m in found if isinstance(m, nn.Module)]
    getter: dict[str, Callable[[nn.Module], Any]] = {
        "encoder": lambda m: _call(m, "get_encoder"),
        "decoder": lambda m: _call(m, "get_decoder"),
        "lm_head": lambda m: _call(m, "get_output_embeddings"),
    }
    module = getter[role](model)
    return [module] if isinstance(module, nn.Module) else []


def is_role(pattern: str) -> bool:
    return pattern.startswith("@")


def role_parameter_names(model: nn.Module, roles: list[str], key: str = "adapt") -> set[str]:
    """Names (as ``named_parameters()`` gives them) of the parameters of every ``@role`` in ``roles``."""
    wanted: set[int] = set()
    for entry in roles:
        role = entry[1:]
        if role not in ROLES:
            raise ConfigError(f"{key}: unknown role {entry!r}; roles are {', '.join('@' + r for r in ROLES)}")
        modules = _role_modules(model, role)
        if not modules:
            raise ConfigError(f"{key}: the model ({type(model).__name__}) has no {role} (role {entry!r})")
        for module in modules:
            wanted.update(id(p) for p in module.parameters())
    return {name for name, p in model.named_parameters() if id(p) in wanted}
