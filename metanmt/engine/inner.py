"""The inner loop: adapt a dict of named tensors to one task's support data.

Everything is functional (``torch.func.functional_call`` over a dict of tensors), so the same
code gives exact second-order MAML (``create_graph=True``: the adapted tensors stay functions of
the initialization through every step) and first-order MAML / Reptile (``create_graph=False``:
each inner gradient is a constant, so d(adapted)/d(init) is the identity)::

    inner = InnerLoop(family, model, adapt_names=select_names(model, ["*"]), steps=5, lr=0.01)
    adapted = inner.adapt(params, episode.support, create_graph=True).params
    query_loss = inner.loss(adapted, episode.query)      # differentiable w.r.t. params
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError

Params = dict[str, Tensor]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the meta-parameters: trainable tensors (tied weights counted once)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def select_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Trainable parameter names matching any fnmatch pattern, in model order."""
    names = trainable_names(model)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        preview = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ConfigError(f"algorithm.adapt: patterns {patterns} match no trainable parameter; names look like: {preview}")
    return chosen


def full_state(model: nn.Module, params: Params) -> Params:
    """``params`` plus the model's frozen parameters and buffers: what ``functional_call`` needs."""
    state = {n: t for n, t in model.named_parameters() if n not in params}
    state.update(dict(model.named_buffers()))
    state.update(params)
    return state


@dataclass
class AdaptResult:
    params: Params  # the full dict: adapted tensors replaced, everything else as given
    support_losses: list[float] = field(default_factory=list)  # loss before each inner step
    initial_grads: Optional[Params] = None  # d(support loss at the init)/d(every meta-parameter), detached


class InnerLoop:
    """Functional SGD or Adam on the tensors named in ``adapt_names``.

    ``lr`` is a float, or a dict name -> tensor of learned per-parameter rates (Meta-SGD), which are
    then differentiated like everything else.
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

    def loss(self, params: Params, batch: Any) -> Tensor:
        return self.family.loss(self.model, full_state(self.model, params), batch)

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
        result = AdaptResult(params=current)
        adam_m: Params = {}
        adam_v: Params = {}
        for k in range(steps):
            loss = self.loss(current, batches[k % len(batches)])
            result.support_losses.append(float(loss.detach()))
            wrt_names = list(self.adapt_names)
            if k == 0 and want_initial_grads:
                wrt_names += [n for n in params if n not in self.adapt_names and params[n].requires_grad]
            grads = torch.autograd.grad(
                loss, [current[n] for n in wrt_names], create_graph=create_graph, allow_unused=True
            )
            grads = {n: (torch.zeros_like(current[n]) if g is None else g) for n, g in zip(wrt_names, grads)}
            if k == 0 and want_initial_grads:
                result.initial_grads = {n: g.detach() for n, g in grads.items()}
            current = dict(current)
            for name in self.adapt_names:
                step = self._direction(name, grads[name], k, adam_m, adam_v)
                current[name] = current[name] - self._lr(name) * step
            if after_step is not None:
                after_step(k, current)
        result.params = current
        return result

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
