"""LoRA adapters through ``peft`` as the meta-learned and adapted parameters; the base model stays frozen.

    model = apply_lora(base, LoraSettings(r=8, alpha=16), base_reference="path/to/opus-mt")  # or None
    trainable_names(model)       # the adapters' lora_A / lora_B (and ``modules_to_save``) only
    save_adapter(model, Path("runs/x"))          # peft's save_pretrained + where the base is
    model = load_adapter(base_loader, Path("runs/x"))

The engine needs nothing special: a ``peft`` model is an ``nn.Module`` whose trainable parameters are
the adapters, and ``torch.func.functional_call`` replaces ``lora_A.default.weight`` and friends like
any other tensor, so the inner loop, MAML's second-order meta-gradient (tests/test_adapters.py checks
it against finite differences in float64), the outer optimizer and the fine-tuning loop all work on
the adapters alone. The meta-learned initialization is the adapters' initialization.

Where the base is, in a saved folder (``adapter_config.json``'s ``base_model_name_or_path``):

- a base loaded from ``model.pretrained`` is *referenced* by its absolute path (peft's convention):
  it is large, never changes, and a run writes several folders (the latest, ``best/``, each
  fine-tune), which would each hold a copy; ``AutoModelForSeq2SeqLM.from_pretrained(folder)`` and
  ``AutoPeftModelForSeq2SeqLM`` load base + adapter from the reference;
- a base built from the config (random, seeded) exists nowhere else, so it is *saved alongside* in
  ``base/`` (a ``save_pretrained`` folder) and the reference reads ``base``, relative to the folder:
  metanmt resolves it; with peft directly,
  ``PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained("RUN/base"), "RUN")``.
  Such bases are small (they come from the sizes in the config), so every folder is self-contained.

``save_merged`` writes a plain ``transformers`` model with the adapters merged into the base
(``merge_and_unload``), for users who want no ``peft`` at inference.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from ...errors import ConfigError, DataError
from .config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"  # a base saved alongside the adapter, and the reference that names it


def is_adapter_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (adapters around a base)."""
    try:
        from peft import PeftModel
    except ImportError:  # no peft, so no peft model: plain models save and load without it
        return False

    return isinstance(getattr(model, "module", model), PeftModel)


def is_adapter_folder(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def check_settings(settings: LoraSettings) -> None:
    if settings.r < 1:
        raise ConfigError(f"model.lora.r: must be at least 1, got {settings.r}")
    if settings.alpha <= 0:
        raise ConfigError(f"model.lora.alpha: must be positive, got {settings.alpha}")
    if not 0 <= settings.dropout < 1:
        raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {settings.dropout}")
    if settings.target_modules is not None and not settings.target_modules:
        raise ConfigError("model.lora.target_modules: empty; give module names (e.g. [q_proj, v_proj]) or null for peft's default")


def apply_lora(model: nn.Module, settings: LoraSettings, base_reference: Optional[str | Path]) -> nn.Module:
    """``peft.get_peft_model`` with LoRA adapters on ``settings.target_modules``: the base's parameters
    are frozen, the adapters' are trainable (B starts at zero: the model is the base at first).
    ``base_reference``: the base's folder when it came from one, None when it was built from a config."""
    from peft import LoraConfig, get_peft_model

    check_settings(settings)
    config = LoraConfig(
        task_type="SEQ_2_SEQ_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if settings.target_modules else default_targets(model),
        modules_to_save=list(settings.modules_to_save) or None,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:  # peft: no module matches target_modules, or no default for the architecture
        raise ConfigError(f"model.lora: {exc}") from None
    wrapped.peft_config["default"].base_model_name_or_path = _reference(base_reference)
    return wrapped


def default_targets(model: nn.Module) -> Optional[list[str]]:
    """None (peft's own default) where peft knows the architecture (BART, T5/mT5, ...); the attention
    query and value projections, peft's choice for BART, for the BART-like models it has no entry for
    (Marian, mBART, M2M100 and NLLB name them ``q_proj`` / ``v_proj`` too)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    if getattr(getattr(model, "config", None), "model_type", None) in KNOWN:
        return None
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= leaves else None


def _reference(base: Optional[str | Path]) -> Optional[str]:
    """An absolute path for a local folder (the adapter then loads from any working directory)."""
    if base is None:
        return None
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else str(base)


def save_adapter(model: nn.Module, directory: Path) -> None:
    """peft's ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``), and the
    base in ``directory/base`` when it exists nowhere else (see the module docstring)."""
    model = getattr(model, "module", model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    if config.base_model_name_or_path in (None, BASE_DIR):
        # a copy without the adapter layers (``unload`` restores the base modules, merging nothing)
        base = copy.deepcopy(model).unload()
        base.save_pretrained(str(directory / BASE_DIR))
        reference: Optional[str] = BASE_DIR
    else:
        reference = config.base_model_name_or_path
    previous = config.base_model_name_or_path
    config.base_model_name_or_path = reference
    try:
        # embeddings are never resized here; "auto" would look the base up on the Hub to find out
        model.save_pretrained(str(directory), save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = previous


def base_folder(directory: Path) -> Path:
    """Where the base of a saved adapter is: ``base/`` alongside, else the folder it references."""
    directory = Path(directory)
    alongside = directory / BASE_DIR
    if (alongside / "config.json").is_file():
        return alongside
    try:
        reference = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise DataError(f"{directory / ADAPTER_CONFIG}: not a readable adapter config ({exc})") from None
    if reference and reference != BASE_DIR and (Path(reference).expanduser() / "config.json").is_file():
        return Path(reference).expanduser()
    raise DataError(f"{directory / ADAPTER_CONFIG}: base_model_name_or_path {reference!r} is not a saved model folder here "
                    f"(and there is no {BASE_DIR}/ alongside); put the base model back there or edit the reference")


def load_adapter(load_base: Callable[[Path], nn.Module], directory: Path) -> nn.Module:
    """Base (``load_base(base_folder)``) + the saved adapter, trainable (``is_trainable=True``) so that
    a fine-tune can continue from it; the base reference is kept for the next save."""
    from peft import PeftModel

    directory = Path(directory)
    base_dir = base_folder(directory)
    model = PeftModel.from_pretrained(load_base(base_dir), str(directory), is_trainable=True)
    alongside = base_dir == directory / BASE_DIR
    model.peft_config["default"].base_model_name_or_path = None if alongside else str(base_dir.resolve())
    return model


def save_merged(model: nn.Module, directory: Path, save: Callable[[nn.Module, Path], Any]) -> nn.Module:
    """A plain ``transformers`` model with the adapters merged into a copy of the base
    (``merge_and_unload``), written by ``save(model, directory)``; returns the merged model."""
    merged = copy.deepcopy(getattr(model, "module", model)).merge_and_unload()
    save(merged, Path(directory))
    return merged
