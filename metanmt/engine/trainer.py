"""The outer loop: meta-train a model's initialization with any algorithm on any task family.

One meta-step, the whole story, in three parts (``MetaTrainer.meta_step``)::

    # 1. this process's contribution (_local_contribution)
    for index, episode in sampler.local_episodes(step):          # this process's share of the tasks
        result = algorithm.task_gradient(inner, params, episode, learned_lrs)
        buffer.grads += result.grads                               # straight into preallocated storage
    # 2. the all-reduce: one per outer step, of the gradient and the step's counts together
    all_reduce(buffer.flat)
    # 3. the update (_update): non-finite policy, mean over the good tasks, outer optimizer
    param.grad = buffer.grads / good; optimizer.step(); scheduler.step()

DDP is not used on purpose: its hooks do not support double backward, and the explicit reduce is
all a meta-step needs. With ``train.task_batching: vmap`` the loop over tasks becomes one
task-batched call of the same ``task_gradient`` (``InnerLoop(tasks=T)``), which returns the sum
of the tasks' contributions.

What the hot path does not do (each was a measured cost; bench/meta_step.py --profile): no dict of
zero gradients per task or step, no flatten-and-copy of the gradients (``MetaGradientBuffer``'s
views are the ``.grad`` the optimizer reads), no finiteness check per tensor and task (one check of
the step's sum; only a non-finite sum recomputes the step task by task to name and drop the bad
ones), no host read of a loss per task (losses stay tensors until the step's one read of its
counts), and no forward pass that only feeds a log line on a step that does not log. Use::

    trainer = MetaTrainer(load_config("configs/sinusoid_maml.yaml"), "runs/sine")
    trainer.train()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import files, registry
from ..config import RunConfig
from ..errors import ConfigError, NonFiniteError, UserError
from ..tasks.base import Episode, TaskFamily
from . import checkpoint as ckpt
from .checkpoint import HISTORY_FILE
from .schedule import schedule_factor
from .algorithms.base import LOGGED_METRICS, TaskResult
from .inner import InnerLoop, select_names, trainable_names
from .sampler import TaskSampler, episode_torch_seed

log = logging.getLogger(__name__)
LEARNED_LRS_FILE = "inner_lrs.safetensors"


class LearnedLearningRates(nn.Module):
    """Meta-SGD: one learned inner learning rate per element of every adapted parameter."""

    def __init__(self, model: nn.Module, names: list[str], init: float):
        super().__init__()
        self.names = list(names)
        shapes = dict(model.named_parameters())
        self.rates = nn.ParameterList(
            [nn.Parameter(torch.full_like(shapes[n].detach(), init)) for n in self.names]
        )

    def as_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.rates))

    def save(self, path: Path) -> None:
        save_file({n: r.detach().contiguous().cpu() for n, r in self.as_dict().items()}, str(path))

    def load(self, path: Path) -> None:
        tensors = load_file(str(path))
        with torch.no_grad():
            for name, rate in self.as_dict().items():
                rate.copy_(tensors[name])


@dataclass
class TrainState:
    """Counters that a resumed run must continue from (saved with every checkpoint)."""

    step: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    skipped_tasks: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float = 0.0  # torch.cuda.max_memory_allocated on this process's device; 0 without CUDA

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def build_family(cfg: RunConfig) -> TaskFamily:
    family_cls = registry.task_family(cfg.family)
    return family_cls(cfg.task, cfg.model, cfg.data.root)


def make_optimizer(cfg: RunConfig, params: list) -> torch.optim.Optimizer:
    """The outer optimizer over ``params`` (tensors, or param groups that may set their own ``lr``)."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The outer learning-rate schedule, stepped once per meta-step.

    Without warmup, constant / linear / cosine are transformers' schedules (``get_scheduler``, the
    same factors; tests/test_meta_step.py compares every step with the formulas). Warmup and
    inverse_sqrt stay written here because no library has these two schedules: transformers' warmup
    factor is ``step / warmup`` (0 on the first step, a step that updates nothing) where this one is
    ``(step + 1) / warmup``, and its inverse_sqrt decays as ``sqrt(warmup / step)`` where this one
    uses ``step + 1``; switching would change every run with warmup.
    """
    o, total = cfg.optim, max(1, cfg.train.steps)
    warmup = max(0, o.warmup_steps)
    if o.cooldown_from and o.schedule not in ("constant", "inverse_sqrt"):
        raise ConfigError(f"optim.cooldown_from: a cooldown follows a constant or inverse_sqrt rate, not {o.schedule} "
                          "(which already decays to the last update)")
    if not warmup and not o.cooldown_from and o.schedule in ("constant", "linear", "cosine"):
        return get_scheduler(o.schedule, optimizer, num_warmup_steps=0, num_training_steps=total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(o, total, step))


def check_task_batching(cfg: RunConfig, family: TaskFamily, algorithm: Any) -> str:
    """The task batching a run uses (``auto`` resolved: vmap where the family and algorithm allow it);
    an explicit ``vmap`` they do not allow is an error."""
    t = cfg.train
    if t.tasks_per_vmap < 0:
        raise ConfigError(f"train.tasks_per_vmap: must be >= 0 (0 = all of a process's tasks), got {t.tasks_per_vmap}")
    if t.task_batching == "auto":
        return "vmap" if family.supports_vmap and algorithm.supports_task_batching else "loop"
    if t.task_batching == "vmap":
        if not family.supports_vmap:
            raise ConfigError(f"train.task_batching: vmap needs episodes of fixed shapes; the {family.name} family has "
                              "variable-size batches, use loop")
        if not algorithm.supports_task_batching:
            raise ConfigError(f"train.task_batching: vmap is implemented for maml and fomaml, not {algorithm.name}; "
                              "use loop or auto")
    return t.task_batching


def _finite(result: TaskResult) -> bool:
    """One task's (or vmap group's) loss and every gradient entry finite: the checked path only."""
    if result.loss is not None and not bool(torch.isfinite(torch.as_tensor(result.loss))):
        return False
    return all(bool(torch.isfinite(g).all()) for g in result.grads.values())


def _episode_size(family: TaskFamily, episode: Episode) -> tuple[int, int]:
    """An episode's examples and tokens (support and query), counted on the host before it moves."""
    examples = tokens = 0
    for batch in (episode.support, episode.query):
        examples += family.batch_size(batch)
        tokens += _token_count(family, batch)
    return examples, tokens


def check_run_inputs(cfg: RunConfig, output_dir: Path) -> None:
    """The output folder is none of the run's inputs, holds none, and is not inside a model it reads."""
    from ..files import refuse_overlap

    def paths(items: list[tuple[str, Any]]) -> list[tuple[str, Path]]:
        return [(k, Path(v).expanduser()) for k, v in items if isinstance(v, str) and v]

    # a run folder may live under the data root, never inside a model or tokenizer it reads
    refuse_overlap(output_dir, paths([("data.root", cfg.data.root), ("suite", cfg.suite)]), "--output-dir", inside_ok=True)
    refuse_overlap(output_dir, paths([("model.pretrained", cfg.model.get("pretrained")), ("task.vocab", cfg.task.get("vocab"))]),
                   "--output-dir")


class MetaGradientBuffer:
    """Preallocated storage of one meta-step: every meta-tensor's gradient in one flat tensor.

    ``grads[name]`` are views of ``flat``: tasks add their contributions into them in place, the
    all-reduce runs on ``flat`` as it is, and after the division by the number of good tasks the
    views are handed to the optimizer as the ``.grad`` of their tensors. ``flat`` ends with the
    step's statistics (``STATS``), so the same all-reduce sums them over processes.
    """

    STATS = ("loss", "loss_tasks", "good", "examples", "tokens", "bad",
             *(f"{m}{suffix}" for m in LOGGED_METRICS for suffix in ("", "_tasks")))

    def __init__(self, targets: dict[str, Tensor]):
        tensors = list(targets.values())
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        size = sum(t.numel() for t in tensors)
        self.flat = torch.zeros(size + len(self.STATS), dtype=dtype, device=tensors[0].device)
        self.gradient = self.flat[:size]
        self.stats = self.flat[size:]
        self.grads: dict[str, Tensor] = {}
        offset = 0
        for name, t in targets.items():
            self.grads[name] = self.flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
        self.layout = self._layout(targets)

    @staticmethod
    def _layout(targets: dict[str, Tensor]) -> list[tuple[str, torch.Size, torch.dtype, torch.device]]:
        return [(name, t.shape, t.dtype, t.device) for name, t in targets.items()]

    def fits(self, targets: dict[str, Tensor]) -> bool:
        """Whether the buffer still has one view per target (a family may add parameters after the start)."""
        return self._layout(targets) == self.layout

    def add(self, grads: dict[str, Tensor]) -> None:
        names = list(grads)
        torch._foreach_add_([self.grads[n] for n in names], [grads[n] for n in names])


class _Tally:
    """This process's counts of one meta-step. Losses and metrics stay tensors (float64, as the
    Python sums they replace) until ``write`` puts them into the buffer's statistics."""

    def __init__(self, device: torch.device):
        wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.sums = {k: torch.zeros((), dtype=wide, device=device) for k in ("loss", *LOGGED_METRICS)}
        self.counts = dict.fromkeys(("loss_tasks", "good", "examples", "tokens", *(f"{m}_tasks" for m in LOGGED_METRICS)), 0)
        self.bad: list[str] = []

    def add(self, result: TaskResult, tasks: int, sizes: list[tuple[int, int]]) -> None:
        if result.loss is not None:
            self.sums["loss"] += result.loss
            self.counts["loss_tasks"] += tasks
        for name in LOGGED_METRICS:
            if name in result.metrics:
                self.sums[name] += result.metrics[name]
                self.counts[f"{name}_tasks"] += tasks
        self.counts["good"] += tasks
        for examples, tokens in sizes:
            self.counts["examples"] += examples
            self.counts["tokens"] += tokens

    def write(self, stats: Tensor) -> None:
        counts = {**self.counts, "bad": len(self.bad)}
        for i, key in enumerate(MetaGradientBuffer.STATS):
            if key in self.sums:
                stats[i].copy_(self.sums[key])  # stays on the device: no host read
            else:
                stats[i] = counts[key]


def make_accelerator(cfg: RunConfig, output_dir: Path) -> Accelerator:
    # validation runs on the main process while the others wait at a barrier: the process group's
    # timeout must outlast it (train.collective_timeout_minutes; README, "Several processes and machines")
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.collective_timeout_minutes))
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.train.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[timeout],
    )


class MetaTrainer:
    def __init__(
        self,
        cfg: RunConfig,
        output_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        accelerator: Accelerator | None = None,
    ):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator or make_accelerator(cfg, self.output_dir)
        acc = self.accelerator
        launched = int(os.environ.get("WORLD_SIZE", acc.num_processes))
        if launched != acc.num_processes:
            raise UserError(
                f"the launcher started {launched} processes but each sees a group of {acc.num_processes}; on CPUs use "
                "`accelerate launch --multi_gpu --num_processes N` (or configs/accelerate_cpu2.yaml)"
            )
        if acc.is_main_process:
            log.info("meta-training on %d process(es), %s, device %s", acc.num_processes, acc.distributed_type, acc.device)
        if acc.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ and acc.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))  # docs/design.md, "Threads"
        # everything that can be checked is checked before the output directory is touched: the
        # config, the folder itself, the data, the validation data, the vocabulary and the model
        self.family = build_family(cfg)
        self.algorithm = registry.algorithm(cfg.algorithm.name)(cfg.algorithm)
        self.task_batching = check_task_batching(cfg, self.family, self.algorithm)  # "loop" or "vmap"
        self._fresh = True
        self.family.use_double_backward(self.algorithm.double_backward)
        if acc.is_main_process:
            check_run_inputs(cfg, self.output_dir)
            self._fresh = not ckpt.inspect_output_dir(self.output_dir, cfg, resume=resume, overwrite=overwrite)
        self.family.prepare()
        if cfg.train.eval_every or cfg.train.show_examples:
            self.family.prepare_validation()
        if resume and self.output_dir.is_dir():
            self.family.on_resume(self.output_dir)
        torch.manual_seed(cfg.train.seed)
        with acc.main_process_first():  # the main process trains (and caches) the vocabulary; the others read it
            self.model = self.family.build_model().to(acc.device)
        # tensors the inner loop adapts from a fresh start every episode are not meta-parameters
        self.episode_only = self.family.episode_only_names(self.model)
        self.meta_names = [n for n in trainable_names(self.model) if n not in self.episode_only]
        self.adapt_names = select_names(self.model, cfg.algorithm.adapt or self.family.default_adapt) if self.algorithm.uses_inner_loop else []
        self.learned_lrs = (
            LearnedLearningRates(self.model, self.adapt_names, cfg.algorithm.inner_lr).to(acc.device)
            if cfg.algorithm.meta_sgd
            else None
        )
        tensors: list = [p for n, p in self.model.named_parameters() if p.requires_grad and n not in self.episode_only]
        if self.learned_lrs is not None:
            rates, rates_lr = list(self.learned_lrs.parameters()), cfg.algorithm.meta_sgd_lr
            # with their own lr the rates are a second param group; else they join the weights' one
            tensors = tensors + rates if rates_lr is None else [{"params": tensors}, {"params": rates, "lr": rates_lr}]
        self.optimizer = make_optimizer(cfg, tensors)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.buffer = MetaGradientBuffer(self.targets())
        self.state = TrainState()
        self.sampler = TaskSampler(
            self.family, cfg.train.seed, cfg.train.meta_batch_size, acc.process_index, acc.num_processes
        )
        for obj in (self.model, self.optimizer, self.scheduler, self.state):
            acc.register_for_checkpointing(obj)
        if self.learned_lrs is not None:
            acc.register_for_checkpointing(self.learned_lrs)
        self._created = False
        if acc.is_main_process:
            self._created = ckpt.prepare_output_dir(self.output_dir, cfg, resume=resume, overwrite=overwrite)
        acc.wait_for_everyone()
        if resume:
            with self._undo_on_failure():
                self._load_latest()

    @contextlib.contextmanager
    def _undo_on_failure(self) -> Iterator[None]:
        """A fresh run that fails before its first checkpoint gives its folder back (and its lock),
        so that the corrected rerun is not refused as "already holds a run"; one that replaces a run
        (``--overwrite``) puts the previous run back whole, on any exception, Ctrl-C included."""
        try:
            yield
        except BaseException as exc:
            if self.accelerator.is_main_process:
                if ckpt.replacing(self.output_dir):
                    ckpt.restore_replaced(self.output_dir)
                elif isinstance(exc, Exception) and self._fresh and not ckpt.list_checkpoints(self.output_dir):
                    ckpt.undo_claim(self.output_dir, "run", self._created)
            raise

    # -- one meta-step -------------------------------------------------------------------------
    def meta_params(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in self.episode_only}

    def targets(self) -> dict[str, Tensor]:
        """Every tensor the outer step updates: the meta-parameters and the Meta-SGD rates (``inner_lr:``)."""
        learned = self.learned_lrs.as_dict() if self.learned_lrs is not None else {}
        return {**self.meta_params(), **{f"inner_lr:{n}": t for n, t in learned.items()}}

    def inner_loop(self, steps: int | None = None, lr: float | None = None, tasks: int = 0,
                   log_metrics: bool = True) -> InnerLoop:
        if self.learned_lrs is not None and lr is None:
            lr = self.learned_lrs.as_dict()
        return InnerLoop.for_algorithm(self.family, self.model, self.adapt_names, self.cfg.algorithm, steps, lr,
                                       tasks=tasks, checkpoint=self.cfg.train.checkpoint_inner, log_metrics=log_metrics)

    def is_log_step(self, completed: int) -> bool:
        """Whether the step after which ``completed`` steps are done writes a log record."""
        return completed % max(1, self.cfg.train.log_every) == 0 or completed == self.cfg.train.steps

    def _task_groups(self, episodes: list[Any]) -> list[list[Any]]:
        """Which of this process's tasks run together: all (or ``tasks_per_vmap``) with vmap, else one each."""
        if self.task_batching != "vmap":
            return [[item] for item in episodes]
        size = self.cfg.train.tasks_per_vmap or len(episodes) or 1
        return [episodes[i : i + size] for i in range(0, len(episodes), size)]

    def meta_step(self, step: int, log: bool | None = None) -> dict[str, float]:
        """Compute this step's meta-gradient over all processes and apply the outer update.

        Three parts: this process's contribution, the all-reduce, the update. ``log`` (default: whether
        ``train.log_every`` logs after this step) adds the gradient norm and the inner loop's per-task
        metrics, averaged over the meta-batch, to the returned record: ``support_loss``,
        ``query_loss_before``, ``query_loss_after`` and ``inner_gain`` (before - after). The query
        loss before adaptation costs one forward pass per task without a graph, so only logging
        steps pay for it; gradients and RNG streams are the same either way.
        """
        if log is None:
            log = self.is_log_step(step + 1)
        self.model.train()
        bad_tasks = self._local_contribution(step, log)
        if self.accelerator.num_processes > 1:
            # in place on the preallocated buffer: accelerate's reduce() would clone it first
            torch.distributed.all_reduce(self.buffer.flat)
        return self._update(step, bad_tasks, log)

    def _local_contribution(self, step: int, log: bool) -> list[str]:
        """Sum this process's task contributions and counts into ``self.buffer``; return the bad tasks.

        Every task is added without a check, then the sum is checked once: a sum is finite only if
        every term was. A non-finite sum recomputes the step's tasks (same per-episode RNG seeds, so
        the same results) with a check per vmap group and per task, which names the bad tasks and
        leaves them out: the guarantees of a check per task, paid only on a step that needs it.
        """
        family, device = self.family, self.accelerator.device
        episodes = [(index, Episode(e.task, family.to_device(e.support, device), family.to_device(e.query, device)),
                     _episode_size(family, e))
                    for index, e in self.sampler.local_episodes(step)]
        targets = self.targets()
        if not self.buffer.fits(targets):
            self.buffer = MetaGradientBuffer(targets)
        tally = self._run_tasks(step, episodes, log, check=False)
        if not bool(torch.isfinite(self.buffer.gradient.sum() + tally.sums["loss"])):
            tally = self._run_tasks(step, episodes, log, check=True)
        tally.write(self.buffer.stats)
        return tally.bad

    def _run_tasks(self, step: int, episodes: list[tuple[int, Episode, tuple[int, int]]], log: bool,
                   check: bool) -> _Tally:
        acc, family, seed = self.accelerator, self.family, self.cfg.train.seed
        params = self.meta_params()
        learned = self.learned_lrs.as_dict() if self.learned_lrs is not None else {}
        inner = self.inner_loop(log_metrics=log)
        tally = _Tally(acc.device)
        self.buffer.flat.zero_()
        for group in self._task_groups(episodes):
            if len(group) > 1:  # the vmap fast path: the group's summed contribution in one computation
                stacked = Episode("+".join(e.task for _, e, _ in group), family.stack_batches([e.support for _, e, _ in group]),
                                  family.stack_batches([e.query for _, e, _ in group]))
                torch.manual_seed(episode_torch_seed(seed, step, group[0][0]))
                with acc.autocast():
                    result = self.algorithm.task_gradient(self.inner_loop(tasks=len(group), log_metrics=log), params,
                                                          stacked, learned)
                if not check or _finite(result):
                    self.buffer.add(result.grads)
                    tally.add(result, len(group), [size for _, _, size in group])
                    continue
                # non-finite: redo the group task by task, which names (and may skip) the bad ones
            for index, episode, size in group:
                torch.manual_seed(episode_torch_seed(seed, step, index))
                with acc.autocast():
                    result = self.algorithm.task_gradient(inner, params, episode, learned)
                if check and not _finite(result):
                    tally.bad.append(f"{episode.task} (episode {index})")
                    continue
                self.buffer.add(result.grads)
                tally.add(result, 1, [size])
        return tally

    def _update(self, step: int, bad_tasks: list[str], log: bool) -> dict[str, float]:
        """The non-finite policy, then the mean contribution of the good tasks as the outer gradient."""
        stats = dict(zip(MetaGradientBuffer.STATS, self.buffer.stats.tolist()))  # the step's one host read
        n_bad, good = stats["bad"], stats["good"]
        if n_bad and self.cfg.train.on_nonfinite == "stop":
            last = ckpt.latest_checkpoint(self.output_dir)
            where = ", ".join(bad_tasks) if bad_tasks else "a task on another process"
            raise NonFiniteError(
                f"step {step}: non-finite loss or meta-gradient on {where}; no weights were written; "
                f"last good checkpoint: {last or 'none (resume would restart from step 0)'}; "
                "set train.on_nonfinite=skip to skip such tasks"
            )
        self.state.skipped_tasks += int(n_bad)
        if good == 0:
            raise NonFiniteError(f"step {step}: every task of the meta-batch was non-finite; no weights were written")
        self.buffer.gradient.div_(good)
        targets = self.targets()
        for name, tensor in targets.items():
            tensor.grad = self.buffer.grads[name]
        grad_norm = _clip(list(targets.values()), self.cfg.optim.grad_clip, need_norm=log)
        self.optimizer.step()
        self.family.after_outer_step(self.model)  # e.g. zero the language tables reset every step
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.examples_seen += int(stats["examples"])
        self.state.tokens_seen += int(stats["tokens"])
        record: dict[str, float] = {}
        if stats["loss_tasks"]:
            record["loss"] = stats["loss"] / stats["loss_tasks"]
        if log:
            record["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
            for name in LOGGED_METRICS:
                if stats[f"{name}_tasks"]:
                    record[name] = stats[name] / stats[f"{name}_tasks"]
            if "query_loss_before" in record and "query_loss_after" in record:
                record["inner_gain"] = record["query_loss_before"] - record["query_loss_after"]
        record["lr"] = self.scheduler.get_last_lr()[0]
        return record

    # -- the loop --------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> dict[str, Any]:
        """Meta-train to ``train.steps``; ``until`` stops (and checkpoints) earlier, at that step, so a
        caller can score the model in between and call ``train`` again (the schedule stays the one of
        ``train.steps``)."""
        acc, cfg = self.accelerator, self.cfg
        stop = cfg.train.steps if until is None else min(until, cfg.train.steps)
        if cfg.train.trackers:
            with self._undo_on_failure():
                acc.init_trackers("metanmt", config=_tracker_config(cfg))
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.state.step,
            disable=not acc.is_main_process,
            desc=cfg.algorithm.name,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        last: dict[str, float] = {}
        started = time.perf_counter() - self.state.seconds
        if self.state.step >= stop and acc.is_main_process:
            log.info("%s: already at step %d of train.steps=%d; nothing to train (raise train.steps to continue)",
                     self.output_dir, self.state.step, stop)
        finished = stop == cfg.train.steps
        try:
            with self._undo_on_failure():
                last = self._loop(bar, started, stop)
            examples = self.show_examples() if cfg.train.show_examples and finished else None
        finally:
            bar.close()
            if acc.is_main_process and finished:
                ckpt.release_directory(self.output_dir)
        if cfg.train.trackers:
            acc.end_training()
        return {**last, **self.state.state_dict(), **({"examples": examples} if examples else {})}

    def _loop(self, bar: Any, started: float, stop: int) -> dict[str, float]:
        acc, cfg = self.accelerator, self.cfg
        last: dict[str, float] = {}
        while self.state.step < stop:
            step = self.state.step
            last = self.meta_step(step)  # logs (and computes the logged metrics) when is_log_step(step + 1)
            self.state.step = step + 1
            self.state.seconds = time.perf_counter() - started
            self.state.peak_rss_mb = max(self.state.peak_rss_mb, peak_rss_mb())
            self.state.peak_cuda_mb = max(self.state.peak_cuda_mb, peak_cuda_mb(acc.device))
            bar.update(1)
            if self.is_log_step(self.state.step):
                if "loss" in last:
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                record = {**last, "examples_seen": self.state.examples_seen, "tokens_seen": self.state.tokens_seen,
                          "seconds": round(self.state.seconds, 3), "peak_rss_mb": round(self.state.peak_rss_mb, 1)}
                if acc.device.type == "cuda":
                    record["peak_cuda_mb"] = round(self.state.peak_cuda_mb, 1)
                acc.log({f"train/{k}": v for k, v in record.items()}, step=self.state.step)
                self._append_history("train", record)
            if cfg.train.eval_every and self.state.step % cfg.train.eval_every == 0:
                self.validate()
            if self.state.step % max(1, cfg.train.save_every) == 0 or self.state.step in (cfg.train.steps, stop):
                self.save()
        return last

    def show_examples(self) -> list[dict[str, str]] | None:
        """``train.show_examples`` held-out examples from the family (translation: source, reference,
        zero-shot output and the output after the short dev fine-tune), logged for the user; families
        without such examples return None and nothing is shown."""
        rows = None
        if self.accelerator.is_main_process:
            rows = self.family.examples(self.accelerator.unwrap_model(self.model), self.cfg.train.show_examples)
            for i, row in enumerate(rows or [], 1):
                log.info("example %d:\n%s", i, "\n".join(f"  {key:>11}: {value}" for key, value in row.items()))
        self.accelerator.wait_for_everyone()
        return rows

    def validate(self) -> dict[str, float] | None:
        acc = self.accelerator
        metrics = None
        if acc.is_main_process:
            metrics = self.family.validate(self.model, self)
            if metrics:
                acc.log({f"val/{k}": v for k, v in metrics.items()}, step=self.state.step)
                self._append_history("validation", {**metrics, "examples_seen": self.state.examples_seen,
                                                    "tokens_seen": self.state.tokens_seen,
                                                    "seconds": round(self.state.seconds, 3)})
                if "score" in metrics and metrics["score"] > self.state.best_score:
                    self.state.best_score, self.state.best_step = float(metrics["score"]), self.state.step
                    ckpt.export_files(self.output_dir / "best", self._write_model)
        acc.wait_for_everyone()
        return metrics

    def _append_history(self, kind: str, record: dict[str, Any]) -> None:
        """One JSON line per log/validation in ``{output_dir}/history.jsonl`` (main process only).

        A resumed run appends again from its checkpoint's step: readers keep the last line per
        (kind, step) — see :func:`.checkpoint.read_history`.
        """
        if self.accelerator.is_main_process:
            with open(self.output_dir / HISTORY_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": kind, "step": self.state.step, **record}) + "\n")

    # -- checkpoints ---------------------------------------------------------------------------
    def _write_model(self, directory: Path) -> None:
        self.family.save_model(self.accelerator.unwrap_model(self.model), directory)
        if self.learned_lrs is not None:
            self.learned_lrs.save(directory / LEARNED_LRS_FILE)

    def save(self) -> Path:
        """Write the Accelerate state to checkpoints/step_N (atomically) and export the model."""
        acc = self.accelerator
        root = self.output_dir / ckpt.CHECKPOINTS
        final = root / f"step_{self.state.step:08d}"
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        try:
            with files.library_write(tmp):  # torch.save's RuntimeError on a full disk: the OSError it is
                acc.save_state(str(tmp))
        except Exception:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written .tmp-step_N
            raise
        acc.wait_for_everyone()
        if acc.is_main_process:
            try:
                ckpt.atomic_write_text(tmp / "trainer_state.json", json.dumps(self.state.state_dict(), indent=2))
                ckpt.write_manifest(tmp)  # last: a checkpoint without it (or not matching it) is incomplete
            except Exception:
                shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written .tmp-step_N
                raise
            ckpt.commit_directory(tmp, final)
            ckpt.prune_checkpoints(self.output_dir, self.cfg.train.keep_checkpoints)
            ckpt.export_files(self.output_dir, self._write_model)
            ckpt.confirm_replacement(self.output_dir)  # --overwrite: the previous run is deleted only now
        acc.wait_for_everyone()
        return final

    def _load_latest(self) -> None:
        """Resume from the newest complete checkpoint; damaged ones (a file missing or cut short,
        e.g. a disk that filled up or a copy that stopped) are skipped and named."""
        found = ckpt.list_checkpoints(self.output_dir)
        if not found:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", self.output_dir)
            return
        skipped = []
        for candidate in reversed(found):
            problem = ckpt.checkpoint_problem(candidate)
            if problem is None:
                self.accelerator.load_state(str(candidate))
                self._rate_from_schedule()
                log.info("resumed from %s at step %d", candidate, self.state.step)
                return
            skipped.append(f"{candidate.name} ({problem})")
            log.warning("--resume: skipping %s: %s", candidate, problem)
        raise UserError(f"{self.output_dir}: no complete checkpoint to resume from (damaged: {'; '.join(skipped)}); "
                        "start again with --overwrite")

    def _rate_from_schedule(self) -> None:
        """The next update's rate from this run's schedule, not the one saved in the optimizer state: that
        was computed for the saved run's ``train.steps`` and cooldown, which a resume may change (the rates
        of a linear or cosine schedule, or of a cooldown, depend on them)."""
        sched = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports


_PEAK_RSS_SEEN_MB = 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB; never below a value it returned before.

    Linux: VmHWM of /proc/self/status, this program's own high-water mark. ``ru_maxrss`` is not
    used there because it survives exec: a process started by a large parent reports at least the
    parent's size at the fork. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS). VmHWM has
    been seen to read lower than a value it gave earlier in the same process (the kernel reports the
    larger of a high-water mark it updates only on some paths and the current RSS), so the running
    maximum of what was read keeps a peak a peak.
    """
    import resource
    import sys

    global _PEAK_RSS_SEEN_MB
    peak = None
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
                    break
    except OSError:
        pass
    if peak is None:
        rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rusage / 2**20 if sys.platform == "darwin" else rusage / 1024
    _PEAK_RSS_SEEN_MB = max(_PEAK_RSS_SEEN_MB, peak)
    return _PEAK_RSS_SEEN_MB


def peak_cuda_mb(device: torch.device) -> float:
    """Peak memory allocated by tensors on a CUDA ``device`` so far, in MiB (0 elsewhere)."""
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**20


def _token_count(family: TaskFamily, batch: Any) -> int:
    return int(family.token_count(batch))


def _clip(tensors: Any, max_norm: float | None, need_norm: bool = True) -> Tensor | None:
    """Clip the gradients' total norm to ``max_norm`` and return the norm before clipping (a tensor,
    read by the caller only when it logs). Without clipping the norm is computed only if ``need_norm``."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return None
    if not max_norm:  # None or 0: no clipping (clip_grad_norm_ with 0 would zero every gradient)
        if not need_norm:
            return None
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.nn.utils.clip_grad_norm_([t for t in tensors if t.grad is not None], max_norm)


def _tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    flat = ckpt.flatten(cfg.to_dict())
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


def load_learned_lrs(run_dir: Path) -> dict[str, Tensor] | None:
    path = Path(run_dir) / LEARNED_LRS_FILE
    return load_file(str(path)) if path.is_file() else None
