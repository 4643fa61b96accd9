"""Meta-learning inside a ``transformers`` ``Seq2SeqTrainer``: a drop-in for translation pipelines.

A ``run_translation.py``-style script changes a few lines::

    from metanmt.hf import MetaSeq2SeqTrainer, MetaSeq2SeqTrainingArguments

    args = MetaSeq2SeqTrainingArguments(
        output_dir="runs/meta", max_steps=400, learning_rate=3e-4, predict_with_generate=True,
        meta_algorithm="fomaml", inner_steps=3, inner_lr=3e-4, inner_optimizer="adam", support_in_outer=True,
        meta_batch_size=4, support_tokens=500, query_tokens=500, task_column="lang",
    )
    trainer = MetaSeq2SeqTrainer(model=model, args=args, train_dataset=tokenized_train,  # has a "lang" column
                                 eval_dataset=tokenized_dev, processing_class=tokenizer,
                                 data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                                 compute_metrics=sacrebleu_metrics)
    trainer.train()            # or trainer.train(resume_from_checkpoint=True)

Each optimizer step of the Trainer is one meta-step of this project's engine: the episodes of step
``t`` are drawn from the streams ``(seed, t, j)`` by the engine's ``TaskSampler`` (so a resumed run
replays exactly), each episode goes through ``Algorithm.task_gradient`` with the engine's
``InnerLoop`` (MAML, first-order MAML, Reptile, multitask or a plugin algorithm), and the average
over the meta-batch is written into the parameters' ``.grad``. :meth:`MetaSeq2SeqTrainer.training_step`
returns the meta-batch's loss; everything after it is the Trainer's own: gradient clipping
(``max_grad_norm``), the optimizer and scheduler (``optim``, ``learning_rate``, ``lr_scheduler_type``,
warmup), logging, evaluation with ``predict_with_generate`` and ``compute_metrics``, checkpoints and
``resume_from_checkpoint``, callbacks, ``push_to_hub``. Evaluation is the plain Trainer's: the
initialization itself is scored, without adaptation.

What is different from a plain Seq2SeqTrainer, and what is refused (a ``ValueError`` at construction):

* ``max_steps`` must be set: training counts meta-steps, an epoch over episodes has no meaning.
  ``per_device_train_batch_size``, ``train_sampling_strategy`` / ``group_by_length`` and the
  dataloader worker options do not apply to training (the episode sizes set the batches);
  evaluation uses them as usual.
* ``gradient_accumulation_steps`` > 1 is refused: a meta-step already accumulates the meta-batch
  one episode at a time (memory of one episode); raise ``meta_batch_size`` instead.
* ``fp16`` is refused (a loss scale would have to reach inside the inner loop); ``bf16`` works
  (autocast, as the engine's ``mixed_precision``).
* DeepSpeed and FSDP are refused for every algorithm: the inner loop calls the whole module
  functionally (``torch.func.functional_call``) on unsharded parameters.
* ``torch_compile`` is refused: the inner loop calls the uncompiled module (second-order MAML
  needs double backward through it).
* Several GPUs in one process (``nn.DataParallel``, ``n_gpu`` > 1) are refused; launch one process
  per device (``torchrun`` / ``accelerate launch``). With several processes (DDP) each computes its
  share of the meta-batch and the meta-gradient is all-reduced once per step, as in the engine, for
  every algorithm (second-order MAML included: the DDP wrapper's hooks, which cannot do double
  backward, are bypassed; ``tests/test_hf_trainer.py`` checks 2 gloo processes against 1).
* ``compute_loss_func`` and an overridden ``compute_loss`` are not used for training: the episodes'
  loss is the model's own (``labels``), with the Trainer's label smoothing when
  ``label_smoothing_factor`` is set.
* Meta-SGD (learned inner rates) is not available here (the engine's CLI has it).
* A training "sample" is an episode: ``train_samples_per_second`` counts episodes per second.
* ``num_input_tokens_seen`` counts the source tokens of the episodes' batches (support and query,
  padding included with ``"all"``); ``total_flos`` estimates 6 x parameters x source tokens of every
  forward pass the inner and outer loops make.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Seq2SeqTrainer, Seq2SeqTrainingArguments

from .. import registry
from ..config import AlgorithmConfig
from ..engine.inner import InnerLoop, select_names
from ..engine.sampler import TaskSampler, episode_torch_seed
from ..errors import ConfigError, NonFiniteError
from ..tasks.base import Episode
from .episodes import DatasetTasks


class MetaArgumentsError(ConfigError, ValueError):
    """An argument (or Trainer feature) that meta-training cannot honour; the message says which and why."""


@dataclass
class MetaSeq2SeqTrainingArguments(Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus the meta-learning options (the engine's ``algorithm:`` keys and
    the episode sizes of a translation task suite). ``learning_rate``, ``optim``, ``lr_scheduler_type``,
    ``warmup_steps``, ``max_grad_norm`` and ``weight_decay`` configure the *outer* optimizer; for
    Reptile its step size is the outer learning rate (``optim="sgd"`` gives the original update)."""

    meta_algorithm: str = field(default="fomaml", metadata={"help": "maml (second order), fomaml, reptile, multitask, or a plugin algorithm"})
    inner_steps: int = field(default=1, metadata={"help": "Inner-loop steps per episode (ignored by multitask)."})
    inner_lr: float = field(default=0.01, metadata={"help": "Inner-loop learning rate."})
    inner_optimizer: str = field(default="sgd", metadata={"help": "Inner-loop optimizer: sgd or adam."})
    inner_grad_clip: Optional[float] = field(default=None, metadata={"help": "Scale each episode's inner gradient to at most this L2 norm (inside the graph, so MAML differentiates through it); unset: no clipping."})
    adapt: list[str] = field(default_factory=lambda: ["*"], metadata={"help": "fnmatch patterns of the parameters the inner loop adapts (the others are still meta-learned), e.g. 'model.shared.*' 'model.encoder.*'."})
    support_in_outer: bool = field(default=False, metadata={"help": "maml/fomaml: the support loss at the initialization joins the outer loss."})
    multi_step_loss: bool = field(default=False, metadata={"help": "maml/fomaml: MAML++ query loss after every inner step."})
    meta_batch_size: int = field(default=4, metadata={"help": "Episodes (tasks) per meta-step, over all processes."})
    support_tokens: int = field(default=1000, metadata={"help": "Target tokens (labels) per support batch."})
    query_tokens: int = field(default=1000, metadata={"help": "Target tokens (labels) per query batch."})
    support_examples: Optional[int] = field(default=None, metadata={"help": "Examples per support batch (with query_examples, instead of tokens)."})
    query_examples: Optional[int] = field(default=None, metadata={"help": "Examples per query batch (with support_examples, instead of tokens)."})
    task_column: str = field(default="lang", metadata={"help": "Dataset column naming each example's task (the source language)."})
    task_sampling: str = field(default="uniform", metadata={"help": "uniform, or temperature: p(task) ~ examples ** (1 / task_temperature)."})
    task_temperature: float = field(default=5.0, metadata={"help": "Temperature of task_sampling=temperature."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.meta_batch_size < 1:
            raise MetaArgumentsError(f"meta_batch_size: must be at least 1, got {self.meta_batch_size}")
        if self.inner_steps < 0:
            raise MetaArgumentsError(f"inner_steps: must be >= 0, got {self.inner_steps}")
        if self.inner_optimizer not in ("sgd", "adam"):
            raise MetaArgumentsError(f"inner_optimizer: {self.inner_optimizer!r}; allowed values: sgd, adam")
        if self.inner_grad_clip is not None and not self.inner_grad_clip > 0:
            raise MetaArgumentsError(f"inner_grad_clip: must be positive (or unset for no clipping), got {self.inner_grad_clip}")
        if self.task_temperature <= 0:
            raise MetaArgumentsError(f"task_temperature: must be positive, got {self.task_temperature}")

    def algorithm_config(self) -> AlgorithmConfig:
        """The engine's algorithm options from these arguments."""
        return AlgorithmConfig(name=self.meta_algorithm, inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                               inner_optimizer=self.inner_optimizer, adapt=list(self.adapt),
                               support_in_outer=self.support_in_outer, multi_step_loss=self.multi_step_loss,
                               inner_grad_clip=self.inner_grad_clip)


class _MetaSteps(Dataset):
    """The training "data": meta-step numbers. The Trainer's loop is the clock; the episodes of a step
    are drawn from ``(seed, step, index)`` in :meth:`MetaSeq2SeqTrainer.training_step`."""

    def __init__(self, steps: int):
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"meta_step": torch.tensor(index)}


class MetaSeq2SeqTrainer(Seq2SeqTrainer):
    """``Seq2SeqTrainer`` whose optimizer steps are meta-steps (see the module docstring).

    ``train_dataset``: a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``) with the task column
    (``args.task_column``); every task must hold enough examples for one episode. ``eval_dataset`` and
    everything else are as for ``Seq2SeqTrainer``. Without a ``data_collator`` and with a tokenizer as
    ``processing_class``, ``DataCollatorForSeq2Seq(tokenizer, model=model)`` is used.
    """

    def __init__(self, model: Any = None, args: Optional[MetaSeq2SeqTrainingArguments] = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None, **kwargs: Any):
        if not isinstance(args, MetaSeq2SeqTrainingArguments):
            raise MetaArgumentsError(f"args: a MetaSeq2SeqTrainingArguments is needed, got {type(args).__name__}")
        if data_collator is None and isinstance(processing_class, PreTrainedTokenizerBase):
            data_collator = DataCollatorForSeq2Seq(processing_class, model=model)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._check_supported()
        try:
            self.algorithm = registry.algorithm(args.meta_algorithm)(args.algorithm_config())
        except ConfigError as exc:
            raise MetaArgumentsError(f"meta_algorithm: {exc}") from None
        if self.model is not None:  # every pattern error now, not at the first step
            self._adapt_names(self.model)
        self.tasks: Optional[DatasetTasks] = self.make_tasks(train_dataset) if train_dataset is not None else None
        self._meta_logs: dict[str, list[float]] = {}
        self._step_flos = 0.0
        self._step_source_tokens = 0

    # -- what cannot work, said before anything runs ---------------------------------------------------
    def _check_supported(self) -> None:
        a = self.args
        refuse = [
            (a.max_steps <= 0, "max_steps: set a positive number of meta-steps; meta-training counts steps, and "
                               "num_train_epochs has no meaning for episodes"),
            (a.gradient_accumulation_steps != 1, f"gradient_accumulation_steps={a.gradient_accumulation_steps}: not "
             "supported; a meta-step already accumulates its meta-batch one episode at a time, raise meta_batch_size instead"),
            (bool(a.fp16), "fp16: not supported (a loss scale would have to reach inside the inner loop); use bf16"),
            (self.is_deepspeed_enabled, "deepspeed: not supported; the inner loop calls the whole module functionally "
                                        "on unsharded parameters"),
            (self.is_fsdp_enabled, "fsdp: not supported; the inner loop calls the whole module functionally on "
                                   "unsharded parameters"),
            (bool(a.torch_compile), "torch_compile: not supported; the inner loop calls the module functionally "
                                    "(second order needs double backward through it)"),
            (a.n_gpu > 1, f"{a.n_gpu} GPUs in one process (DataParallel): not supported; launch one process per GPU "
                          "(torchrun or accelerate launch)"),
            (self.compute_loss_func is not None, "compute_loss_func: not used by meta-training, whose episode loss is "
                                                 "the model's own (labels); remove it"),
        ]
        for bad, message in refuse:
            if bad:
                raise MetaArgumentsError(message)

    def make_tasks(self, dataset: Any) -> DatasetTasks:
        """The episode source for ``dataset`` (raises :class:`~metanmt.hf.episodes.DatasetError`)."""
        a = self.args
        self._set_signature_columns_if_needed()
        columns = [c for c in dataset.column_names
                   if not a.remove_unused_columns or c in (self._signature_columns or [])]
        pad = getattr(self.processing_class, "pad_token_id", None)
        if pad is None and self.model is not None:
            pad = getattr(self.model.config, "pad_token_id", None)
        return DatasetTasks(dataset, a.task_column, self.data_collator, columns,
                            support_tokens=a.support_tokens, query_tokens=a.query_tokens,
                            support_examples=a.support_examples, query_examples=a.query_examples,
                            task_sampling=a.task_sampling, temperature=a.task_temperature,
                            pad_token_id=0 if pad is None else int(pad), label_smoother=self.label_smoother)

    def _adapt_names(self, module: torch.nn.Module) -> list[str]:
        if not self.algorithm.uses_inner_loop:
            return []
        try:
            return select_names(module, list(self.args.adapt), key="adapt")
        except ConfigError as exc:
            raise MetaArgumentsError(str(exc)) from None

    # -- the Trainer's hooks ------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """One item per meta-step. Not prepared by Accelerate on purpose: every process runs every
        meta-step (on its share of the episodes), so the steps must not be sharded across processes."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if self.tasks is None or self.tasks.dataset is not self.train_dataset:
            self.tasks = self.make_tasks(self.train_dataset)
        return DataLoader(_MetaSteps(self.args.max_steps), batch_size=1)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Tensor | int] = None) -> Tensor:
        """Meta-step ``state.global_step``: the meta-batch's average contribution goes into ``.grad``
        (added to what is there), the meta-batch's mean loss is returned. ``inputs`` only ticks the clock:
        the step number is the Trainer's own counter, so ``ignore_data_skip`` cannot shift the episodes."""
        step = self.state.global_step
        module = self.accelerator.unwrap_model(model)
        module.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        totals, stats, losses = self.local_contribution(module, params, step)
        names = list(totals)
        flat = torch.cat([totals[n].reshape(-1) for n in names] + [stats.to(totals[names[0]].dtype)])
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum")  # one all-reduce per meta-step, as in the engine
        if not bool(torch.isfinite(flat).all()):  # every process sees the same sum, so all of them stop here
            bad = [f"{task!r} (episode {index})" for index, task, loss in losses if not math.isfinite(loss)]
            raise NonFiniteError(f"meta-step {step}: non-finite loss or meta-gradient on "
                                 f"{', '.join(bad) or 'a task of this meta-batch'}; no update was applied for this step")
        loss_sum, loss_count, tasks, source_tokens, flos_tokens = (float(v) for v in flat[-5:])
        offset = 0
        for name in names:
            size = totals[name].numel()
            grad = flat[offset: offset + size].view_as(totals[name]) / tasks
            offset += size
            param = params[name]
            param.grad = grad.to(param.dtype) if param.grad is None else param.grad + grad.to(param.dtype)
        self._step_source_tokens = int(source_tokens)
        self._step_flos = 6.0 * flos_tokens * _non_embedding_parameters(module)
        return torch.tensor(loss_sum / loss_count if loss_count else 0.0, device=self.args.device)

    def local_contribution(self, module: torch.nn.Module, params: dict[str, Tensor],
                           step: int) -> tuple[dict[str, Tensor], Tensor, list[tuple[int, str, float]]]:
        """This process's share of meta-step ``step``: the sum of its episodes' contributions
        (``Algorithm.task_gradient``), ``[loss sum, losses, episodes, source tokens, forward tokens]`` and
        ``(index, task, loss)`` of each episode that reports a loss."""
        a, tasks = self.args, self.tasks
        assert tasks is not None
        seed = a.seed if a.data_seed is None else a.data_seed
        sampler = TaskSampler(tasks, seed, a.meta_batch_size, a.process_index, a.world_size)
        # every step reports its loss and inner-loop metrics (log_metrics): the Trainer averages the loss
        # over all the steps of a logging window (engines that skip metric-only forward passes read it)
        inner = InnerLoop.for_algorithm(tasks, module, self._adapt_names(module), a, log_metrics=True)
        totals = {n: torch.zeros_like(p) for n, p in params.items()}
        losses: list[tuple[int, str, Tensor]] = []
        source_tokens = count = 0
        forward_before = tasks.forward_tokens
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        for index, episode in sampler.local_episodes(step):
            episode = Episode(episode.task, tasks.to_device(episode.support, a.device), tasks.to_device(episode.query, a.device))
            # the episode's own dropout stream (the engine's), without moving the Trainer's RNG state
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(episode_torch_seed(seed, step, index))
                with self.accelerator.autocast():
                    result = self.algorithm.task_gradient(inner, params, episode, {})
            for name, grad in result.grads.items():
                totals[name] += grad
            count += 1
            if result.loss is not None:  # an algorithm may leave it out (a plugin that only logs some steps)
                losses.append((index, episode.task, torch.as_tensor(result.loss, dtype=torch.float64)))
            for name, value in result.metrics.items():
                self._meta_logs.setdefault(name, []).append(value)
            for batch in (episode.support, episode.query):
                mask = batch.get("attention_mask")
                all_tokens = self.args.include_num_input_tokens_seen != "non_padding" or mask is None
                source_tokens += int(batch["input_ids"].numel() if all_tokens else mask.sum())
        values = torch.stack([loss.detach().cpu() for _, _, loss in losses]).tolist() if losses else []  # one host read
        stats = torch.tensor([sum(values), len(values), count, source_tokens, tasks.forward_tokens - forward_before],
                             dtype=torch.float64, device=a.device)
        return totals, stats, [(i, t, v) for (i, t, _), v in zip(losses, values)]

    def get_total_train_batch_size(self, args: Any) -> int:
        # a training "sample" is an episode: the Trainer's samples/s and totals count episodes
        return int(getattr(args, "meta_batch_size", 1))

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return int(self._step_flos)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # the step's episodes, not ``inputs`` (a step number); already summed over processes
        if self.args.include_num_input_tokens_seen != "no":
            self.state.num_input_tokens_seen += self._step_source_tokens

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Training logs also carry the algorithm's per-episode metrics (e.g. ``support_loss``,
        ``query_loss``), averaged over this process's episodes since the last log."""
        if "loss" in logs and self._meta_logs:
            means = {name: float(torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in values]).mean())
                     for name, values in self._meta_logs.items()}
            if "query_loss_before" in means and "query_loss_after" in means:
                means["inner_gain"] = means["query_loss_before"] - means["query_loss_after"]
            logs.update({name: round(value, 4) for name, value in means.items()})
            self._meta_logs = {}
        super().log(logs, start_time)


def _non_embedding_parameters(module: torch.nn.Module) -> int:
    counter = getattr(module, "num_parameters", None)
    if counter is not None:
        return int(counter(exclude_embeddings=True))
    return sum(p.numel() for p in module.parameters())
