"""The inner loop: adapt a dict of named tensors to one task's support data.

Everything is functional (``torch.func.functional_call`` over a dict of tensors), so the same
code gives exact second-order MAML (``create_graph=True``: the adapted tensors stay functions of
the initialization through every step) and first-order MAML / Reptile (``create_graph=False``:
each inner gradient is a constant, so d(adapted)/d(init) is the identity)::

    inner = InnerLoop(family, model, adapt_names=select_names(model, ["*"]), steps=5, lr=0.01)
    adapted = inner.adapt(params, episode.support, create_graph=True).params
    query_loss = inner.loss(adapted, episode.query)      # differentiable w.r.t. params

Two execution options leave every gradient unchanged (tests/test_fast_paths.py):

* ``tasks=T``: the batches carry a leading task dimension (``family.stack_batches``); the adapted
  tensors get one copy per task and the loss is the sum of the T task losses under ``torch.vmap``,
  so all tasks of a meta-batch run as one batched computation.
* ``checkpoint=True``: each second-order inner step is recomputed during the backward pass
  instead of kept (``torch.utils.checkpoint``), so memory no longer grows with the inner steps.

``log_metrics`` tells the algorithms whether to compute what is only logged and costs an extra
forward pass (the query loss before adaptation); the trainer sets it on logging steps only.
The losses the inner loop computes anyway stay tensors (no host read inside the loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from ..errors import ConfigError
from ..tasks.base import select_names, trainable_names  # noqa: F401 (the engine's callers import them from here)

Params = dict[str, Tensor]


def full_state(model: nn.Module, params: Params) -> Params:
    """``params`` plus the model's frozen parameters and buffers: what ``functional_call`` needs."""
    state = {n: t for n, t in model.named_parameters() if n not in params}
    state.update(dict(model.named_buffers()))
    state.update(params)
    return state


@dataclass
class AdaptResult:
    params: Params  # the full dict: adapted tensors replaced, everything else as given
    support_losses: list[Tensor] = field(default_factory=list)  # loss before each inner step (detached, 0-dim)
    initial_grads: Optional[Params] = None  # d(support loss at the init)/d(every meta-parameter), detached


class InnerLoop:
    """Functional SGD or Adam on the tensors named in ``adapt_names``.

    ``lr`` is a float, or a dict name -> tensor of learned per-parameter rates (Meta-SGD), which are
    then differentiated like everything else. ``grad_clip`` scales each task's gradient (over the
    adapted tensors) to that largest L2 norm in every step, inside the graph, so a diverging loop stays
    finite and its meta-gradient says so. ``log_metrics=False`` lets an algorithm skip the
    forward passes that only feed logged metrics (see :func:`metric_forward`); gradients do not
    depend on it.
    """

    def __init__(
        self,
        family: Any,
        model: nn.Module,
        adapt_names: list[str],
        steps: int,
        lr: float | dict[str, Tensor],
        optimizer: str = "sgd",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        tasks: int = 0,
        checkpoint: bool = False,
        log_metrics: bool = True,
        grad_clip: Optional[float] = None,
    ):
        if steps < 0:
            raise ConfigError(f"algorithm.inner_steps: must be >= 0, got {steps}")
        if optimizer not in ("sgd", "adam"):
            raise ConfigError(f"algorithm.inner_optimizer: {optimizer!r}; allowed values: sgd, adam")
        self.family = family
        self.model = model
        self.adapt_names = list(adapt_names)
        self.steps = steps
        self.lr = lr
        self.optimizer = optimizer
        self.adam_betas = adam_betas
        self.adam_eps = adam_eps
        self.tasks = tasks  # 0: one task; T > 0: batches and adapted tensors are stacked over T tasks
        self.checkpoint = checkpoint
        self.log_metrics = log_metrics
        self.grad_clip = grad_clip
        self._param_dims = {n: p.dim() for n, p in model.named_parameters()}

    @classmethod
    def for_algorithm(cls, family: Any, model: nn.Module, adapt_names: list[str], options: Any,
                      steps: Optional[int] = None, lr: Optional[float | dict[str, Tensor]] = None,
                      **execution: Any) -> "InnerLoop":
        """The inner loop that an algorithm's options describe: ``options`` is a config's
        ``algorithm:`` section or the Trainer plugin's arguments (both name them ``inner_steps``,
        ``inner_lr``, ``inner_optimizer``, ``inner_grad_clip``), so an inner-loop option added there
        reaches meta-training, evaluation and the plugin alike. ``steps`` and ``lr`` replace the
        options' (evaluation's steps, Meta-SGD's learned rates); ``execution`` is ``tasks``,
        ``checkpoint`` or ``log_metrics``."""
        return cls(family, model, adapt_names, options.inner_steps if steps is None else steps,
                   options.inner_lr if lr is None else lr, options.inner_optimizer,
                   grad_clip=options.inner_grad_clip, **execution)

    def loss(self, params: Params, batch: Any) -> Tensor:
        """The task's loss; with ``tasks=T``, the sum of the T task losses."""
        if not self.tasks:
            return self.family.loss(self.model, full_state(self.model, params), batch)
        # a tensor with one more dimension than its parameter holds one copy per task
        dims = {n: 0 if t.dim() == self._param_dims.get(n, t.dim()) + 1 else None for n, t in params.items()}
        per_task = vmap(lambda p, b: self.family.loss(self.model, full_state(self.model, p), b), in_dims=(dims, 0))
        return per_task(params, batch).sum()

    def adapt(
        self,
        params: Params,
        batch: Any,
        create_graph: bool,
        steps: Optional[int] = None,
        want_initial_grads: bool = False,
        after_step: Optional[Callable[[int, Params], None]] = None,
    ) -> AdaptResult:
        """Take ``steps`` gradient steps on ``batch`` (a batch, or a list of batches used in turn).

        ``want_initial_grads`` also returns the gradient of the first support loss with respect to
        every tensor in ``params`` (the outer-loss term when the support set joins the outer step).
        ``after_step(k, params_k)`` is called after each step (MAML++'s multi-step loss).
        """
        steps = self.steps if steps is None else steps
        batches = batch if isinstance(batch, list) else [batch]
        current = dict(params)
        # an adapted tensor that is not a meta-parameter (a language table reset every episode) starts
        # from the model's value as a fresh leaf: the meta-gradient does not reach it
        model_tensors = dict(self.model.named_parameters())
        current.update({n: model_tensors[n].detach().requires_grad_() for n in self.adapt_names if n not in params})
        if self.tasks:  # one copy per task: its gradient is that task's own gradient
            current.update({n: current[n].expand(self.tasks, *current[n].shape) for n in self.adapt_names})
        result = AdaptResult(params=current)
        adam_state: tuple[Params, Params] = ({}, {})
        for k in range(steps):
            want = k == 0 and want_initial_grads
            args = (current, batches[k % len(batches)], k, adam_state, create_graph, want)
            if self.checkpoint and create_graph:
                current, adam_state, loss, initial = recompute_in_backward(self._step, *args, use_reentrant=False)
            else:
                current, adam_state, loss, initial = self._step(*args)
            result.support_losses.append(loss)
            if want:
                result.initial_grads = {n: g.sum(0) if g.dim() == params[n].dim() + 1 else g
                                        for n, g in initial.items() if n in params}
            if after_step is not None:
                after_step(k, current)
        result.params = current
        return result

    def _step(self, current: Params, batch: Any, k: int, adam_state: tuple[Params, Params], create_graph: bool,
              want_all_grads: bool) -> tuple[Params, tuple[Params, Params], Tensor, Params]:
        """One inner step, a pure function of its inputs (so that it can be recomputed in backward)."""
        loss = self.loss(current, batch)
        wrt_names = list(self.adapt_names)
        if want_all_grads:
            wrt_names += [n for n in current if n not in self.adapt_names and current[n].requires_grad]
        grads = torch.autograd.grad(loss, [current[n] for n in wrt_names], create_graph=create_graph, allow_unused=True)
        grads = {n: (torch.zeros_like(current[n]) if g is None else g) for n, g in zip(wrt_names, grads)}
        initial = {n: g.detach() for n, g in grads.items()} if want_all_grads else {}
        if self.grad_clip is not None:
            grads.update(self._clipped({n: grads[n] for n in self.adapt_names}))
        m, v = dict(adam_state[0]), dict(adam_state[1])
        updated = dict(current)
        for name in self.adapt_names:
            updated[name] = current[name] - self._lr(name) * self._direction(name, grads[name], k, m, v)
        return updated, (m, v), loss.detach(), initial

    def _clipped(self, grads: Params) -> Params:
        """Each task's gradient scaled to L2 norm <= ``grad_clip`` (a factor min(1, clip / norm), part of
        the graph like the rest of the step); with ``tasks=T`` every tensor has the task dimension first."""
        if self.tasks:
            squares = sum(g.pow(2).flatten(1).sum(1) for g in grads.values())
        else:
            squares = sum(g.pow(2).sum() for g in grads.values())
        # the tiny term keeps the derivative of the norm finite at a zero gradient
        factor = torch.clamp(self.grad_clip / torch.sqrt(squares + 1e-24), max=1.0)
        if self.tasks:
            return {n: g * factor.view(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}
        return {n: g * factor for n, g in grads.items()}

    def _lr(self, name: str) -> float | Tensor:
        return self.lr[name] if isinstance(self.lr, dict) else self.lr

    def _direction(self, name: str, grad: Tensor, k: int, m: Params, v: Params) -> Tensor:
        if self.optimizer == "sgd":
            return grad
        beta1, beta2 = self.adam_betas
        m[name] = beta1 * m.get(name, torch.zeros_like(grad)) + (1 - beta1) * grad
        v[name] = beta2 * v.get(name, torch.zeros_like(grad)) + (1 - beta2) * grad * grad
        m_hat = m[name] / (1 - beta1 ** (k + 1))
        v_hat = v[name] / (1 - beta2 ** (k + 1))
        # eps inside the sqrt keeps the second derivative finite where a gradient is exactly zero
        return m_hat / torch.sqrt(v_hat + self.adam_eps**2)


def metric_forward(inner: InnerLoop, params: Params, batch: Any) -> Tensor:
    """``inner.loss(params, batch)`` for logging only: no autograd graph, and the RNG left as it was.

    The forward pass draws dropout masks like any other; restoring the RNG state afterwards keeps
    every later draw (and so every gradient) the same whether or not a step logs.
    """
    devices = list({t.device for t in params.values() if t.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        return inner.loss(params, batch)
