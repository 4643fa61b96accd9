"""Training a study's initializations: ``metanmt meta-train`` runs in the study folder, resumed where
they stopped, and the warm starts exported at their named update.

A warm-start source is trained to the warm-start update first and its model exported
(``inits/NAME@UPDATE``, with the trainer state, so that ``compare`` counts the compute of both
stages), then resumed to its own end: the shared updates are trained once. The study file's
check (:mod:`.spec`) allows this only for schedules whose rate does not depend on ``train.steps``,
so the resumed run computes exactly what one uninterrupted run would (resume is exact).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

from ..engine.checkpoint import CONFIG_FILE, latest_trainer_state
from .folder import init_dir, inner_file, read_json, warm_dir
from .spec import Study


def train_command(study: Study, out: Path, name: str, steps: Optional[int] = None) -> list[str]:
    """meta-train's command line for init ``name`` (to ``steps`` updates, default its own end)."""
    init = study.inits[name]
    run = init_dir(out, name)
    sets = [f"data.root={study.data_root}", *init.overrides]
    if init.warm_start is not None:
        warm = init.warm_start
        sets.append(f"model.pretrained={warm_dir(out, warm.init, warm.update)}")
        if init.lr_from_warm_start:
            sets.append(f"optim.lr={study.lr_at_warm_start(name):.6g}")
        if init.inner == "chosen":
            chosen = read_json(inner_file(out, name))["choice"]
            sets += [f"algorithm.inner_lr={chosen['lr']}", f"algorithm.inner_steps={chosen['steps']}"]
    sets.append(f"train.steps={steps or init.steps}")
    command = [sys.executable, "-m", "metanmt", "meta-train", str(init.config), "--output-dir", str(run)]
    command += [x for s in sets for x in ("--set", s)]
    if (run / CONFIG_FILE).is_file():
        command.append("--resume")
    return command


def trained_to(out: Path, name: str) -> int:
    """The update of the init's latest checkpoint (0 before the first)."""
    return int(latest_trainer_state(init_dir(out, name)).get("step", 0)) if init_dir(out, name).is_dir() else 0


def export_warm_start(out: Path, name: str, update: int) -> Path:
    """``inits/NAME@UPDATE`` from the run's checkpoint at that update (written once)."""
    from ..engine.run import export_checkpoint  # the trainer's imports only in the process that exports

    dest = warm_dir(out, name, update)
    if not (dest / "trainer_state.json").is_file():
        tmp = dest.with_name(".tmp-" + dest.name)  # a killed export leaves no half-written warm start
        export_checkpoint(init_dir(out, name), update, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
    return dest
