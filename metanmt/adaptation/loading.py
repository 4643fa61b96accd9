"""Opening a translation initialization: a metanmt run, one of its saved models, any seq2seq
``save_pretrained`` folder, or a freshly initialized model of the same architecture; and the compute
that went into it (warm starts included), for ``compare``'s equal-compute table.

    loaded = open_translation_model("runs/meta")
    loaded.family.translate(loaded.model, ["Bună ziua"])
    meta_training_state(Path("runs/meta"))["examples_seen"]
    floor = scratch_model(loaded, seed=0)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..engine import checkpoint as ckpt
from ..errors import UserError


@dataclass
class LoadedModel:
    """A translation model with its family (tokenizer, batching) and where it came from."""

    family: Any
    model: nn.Module
    source: str
    run_config: dict[str, Any]  # a RunConfig as a dict, written as the fine-tune's metanmt.yaml
    meta_training: dict[str, Any] = field(default_factory=dict)  # trainer_state.json of the run


COMPUTE_KEYS = ("step", "examples_seen", "tokens_seen", "seconds")


def meta_training_state(run_dir: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """``trainer_state.json`` of the run's latest checkpoint (steps, examples and tokens seen,
    seconds): the compute that went into an initialization; ``{}`` when there is none.

    A run warm-started from another one (``model.pretrained`` naming a metanmt run, or a folder
    with its own ``trainer_state.json``) counts that run's compute too, so a pretrain-then-meta-train
    initialization is compared at its whole cost; ``own`` and ``warm_start`` keep the two parts.
    """
    run_dir = Path(run_dir)
    candidates = [d / "trainer_state.json" for d in reversed(ckpt.list_checkpoints(run_dir))]
    candidates.append(run_dir / "trainer_state.json")
    state: dict[str, Any] = {}
    for path in candidates:
        if path.is_file():
            try:
                state = dict(json.loads(path.read_text(encoding="utf-8")))
                break
            except (OSError, ValueError):
                continue
    pretrained = _pretrained_of(run_dir)
    seen = _seen | {run_dir.resolve()}
    if state and pretrained is not None:
        # a chain of warm starts is summed; a folder met twice (a cycle) is not counted again
        base = meta_training_state(pretrained, seen) if pretrained.is_dir() and pretrained.resolve() not in seen else {}
        own = {k: state[k] for k in COMPUTE_KEYS if k in state}
        state["own"] = own
        state["warm_start"] = {"path": str(pretrained), **{k: base[k] for k in COMPUTE_KEYS if k in base}}
        if not base:
            state["warm_start"]["missing"] = "no trainer state found: its compute is not counted"
        for key in COMPUTE_KEYS:
            if key in own and key in base:
                state[key] = own[key] + base[key]
    return state


def _pretrained_of(run_dir: Path) -> Optional[Path]:
    """The ``model.pretrained`` folder a run started from, if any (relative paths as the run saw them)."""
    config = run_dir / ckpt.CONFIG_FILE
    if not config.is_file():
        return None
    from ..config import read_yaml

    pretrained = (read_yaml(config).get("model") or {}).get("pretrained")
    return Path(pretrained).expanduser() if pretrained else None


def plain_run_config() -> dict[str, Any]:
    """The run config written for a model that did not come from ``metanmt meta-train``."""
    from ..config import RunConfig

    cfg = RunConfig(family="translation", task={"source": "files", "test_languages": ["und"]})
    return cfg.to_dict()


def open_translation_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A metanmt run folder, one of its saved models (``RUN/best``), or any seq2seq
    ``save_pretrained`` folder with its tokenizer.

        loaded = open_translation_model("runs/meta")
        loaded.family.translate(loaded.model, ["Bună ziua"])
    """
    from ..config import RunConfig, from_dict, read_yaml
    from ..engine.run import load_run
    from ..tasks.translation import TranslationFamily

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run or model folder")
    run_dir = path if (path / ckpt.CONFIG_FILE).is_file() else path.parent if (path.parent / ckpt.CONFIG_FILE).is_file() else None
    if run_dir is not None:
        cfg_dict = from_dict(RunConfig, read_yaml(run_dir / ckpt.CONFIG_FILE)).to_dict()
        if cfg_dict["family"] != "translation":
            raise UserError(f"{run_dir}: a {cfg_dict['family']!r} run, not a translation run")
        # fine-tuning and decoding never differentiate through gradients: fast attention (sdpa) where there is one
        run = load_run(run_dir, device=device, model_dir=None if run_dir == path else path, double_backward=False)
        return LoadedModel(run.family, run.model, str(path.resolve()), cfg_dict, meta_training_state(run_dir))
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: neither a metanmt run ({ckpt.CONFIG_FILE}) nor a saved model (config.json, "
                        "or a LoRA adapter's adapter_config.json)")
    from ..files import saved_model_problem

    problem = saved_model_problem(path)
    if problem:
        raise UserError(f"{problem}; the saved model is damaged")
    cfg_dict = plain_run_config()
    family = TranslationFamily(cfg_dict["task"], cfg_dict["model"])
    family.use_double_backward(False)
    try:
        model = family.load_model(path)
    except OSError as exc:
        raise UserError(f"{path}: no saved model could be loaded ({exc})") from None
    return LoadedModel(family, model.to(device).eval(), str(path.resolve()), cfg_dict, {})


def scratch_model(like: LoadedModel, seed: int = 0) -> LoadedModel:
    """A freshly initialized model of ``like``'s architecture and tokenizer (the from-scratch floor)."""
    from transformers import AutoModelForSeq2SeqLM

    family = copy.copy(like.family)  # shares the tokenizer and data caches
    config = copy.deepcopy(like.model.config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config = copy.deepcopy(like.model.generation_config)
    model = family.prepare_model(model.to(next(like.model.parameters()).dtype))
    return LoadedModel(family, model.eval(), f"scratch(seed={seed}, like={like.source})", like.run_config, {})


