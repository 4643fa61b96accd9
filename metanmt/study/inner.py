"""The meta inits' inner loop, chosen on the dev language at the warm start before they train.

At a converged warm start a few Adam steps on a ~400-token support batch can over-fit it and raise
the query loss (a negative inner gain: the meta-gradient then works against adaptation). So the
study measures, for every candidate (rate, steps), the inner gain on the dev language with the
meta init's own episode shapes and inner-loop settings: the init's run config with the dev language
as its only training language, reading the dev language's ``search.budget`` fine-tuning file (never
its dev or test set), episodes from the config's own sampler (same token sizes, same length order),
the model in eval mode (no dropout: the gain of the weights, not of a dropout draw), the same
episodes for every candidate. The candidate with the largest mean gain wins; a study whose best gain
is not positive stops, saying so. ::

    result = choose_inner(study, out, "meta")   # {"choice": {"lr": 1e-4, "steps": 1, "gain": 0.021}, ...}
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import load_config
from ..engine.inner import InnerLoop, full_state
from ..engine.trainer import build_family
from ..errors import UserError
from ..evaluation.few_shot import mean_ci95
from ..tasks.base import select_names, trainable_names
from .folder import inner_file, warm_dir, write_json
from .spec import Study


def measure_inner_gains(study: Study, out: Path, name: str) -> dict[str, Any]:
    """Mean query-loss gain of every candidate inner loop for init ``name`` at its warm start."""
    init, search = study.inits[name], study.file.inner
    assert init.warm_start is not None and search is not None
    warm = warm_dir(out, init.warm_start.init, init.warm_start.update)
    dev = study.file.data.dev_lang
    finetune = study.file.data.finetune.replace("{budget}", search.budget)
    cfg = load_config(init.config, [f"data.root={study.data_root}", *init.overrides, f"model.pretrained={warm}",
                                    f"task.train_languages=[{dev}]", f"task.train_path={finetune}",
                                    "task.dev_languages=[]", "task.test_languages=[]"])
    family = build_family(cfg)
    family.use_double_backward(False)
    family.prepare()
    torch.manual_seed(search.seed)
    model = family.build_model().eval()
    names = select_names(model, cfg.algorithm.adapt or family.default_adapt)
    episode_only = family.episode_only_names(model)  # language tables reset every episode: not meta-parameters
    params = {n: p for n, p in model.named_parameters() if n in set(trainable_names(model)) - episode_only}
    rng = np.random.default_rng([search.seed, 17])
    episodes = [family.sample_episode(rng) for _ in range(search.episodes)]
    started = time.perf_counter()
    rows = []
    for lr in search.lrs:
        for steps in search.steps:
            inner = InnerLoop(family, model, names, steps, lr, cfg.algorithm.inner_optimizer,
                              grad_clip=cfg.algorithm.inner_grad_clip, log_metrics=False)
            gains = []
            for episode in episodes:
                with torch.no_grad():
                    before = float(family.loss(model, full_state(model, params), episode.query))
                adapted = inner.adapt(dict(params), episode.support, create_graph=False).params
                with torch.no_grad():
                    after = float(family.loss(model, full_state(model, {k: v.detach() for k, v in adapted.items()}),
                                              episode.query))
                gains.append(before - after)
            mean, half = mean_ci95(gains)
            rows.append({"lr": lr, "steps": steps, "gain": mean, "ci95": half, "n": len(gains),
                         "positive_episodes": sum(g > 0 for g in gains)})
    best = max(rows, key=lambda r: (r["gain"], -r["steps"], -r["lr"]))
    return {"init": name, "warm_start": f"{init.warm_start.init}@{init.warm_start.update}", "dev_lang": dev,
            "episodes_from": finetune.replace("{lang}", dev), "optimizer": cfg.algorithm.inner_optimizer,
            "adapt": cfg.algorithm.adapt, "candidates": rows, "choice": best, "seconds": time.perf_counter() - started,
            "rule": "largest mean query-loss gain over the same dev-language episodes (eval mode); ties: fewer "
                    "steps, then the smaller rate; stop if not positive"}


def choose_inner(study: Study, out: Path, name: str) -> dict[str, Any]:
    """Measure (or read) the inner-loop choice at ``name``'s warm start; stop if its gain is not positive."""
    path = inner_file(out, name)
    from .folder import read_json

    result = read_json(path) if path.is_file() else None
    if result is None:
        result = measure_inner_gains(study, out, name)
        write_json(path, result)
    best = result["choice"]
    if not (best["gain"] > 0 and math.isfinite(best["gain"])):
        raise UserError(f"{path}: no candidate inner loop lowers the dev-language query loss at {result['warm_start']} "
                        f"(best: rate {best['lr']}, {best['steps']} steps, gain {best['gain']:+.4f} nats); widen "
                        "`inner.lrs` / `inner.steps` (smaller rates, fewer steps) and delete the file to measure again")
    return result
