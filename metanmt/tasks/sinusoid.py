"""Sinusoid regression (Finn et al. 2017): each task is a sine wave; adapt from K points.

Amplitude ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; an MLP 1-40-40-1 with ReLU; MSE loss::

    family = SinusoidFamily({"shots": 10}, {}, None)
    episode = family.sample_episode(np.random.default_rng(0))
    episode.support[0].shape   # (10, 1): x;  episode.support[1]: y
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torch.func import functional_call

from ..config import at_least, interval
from .base import Episode, TaskFamily, load_hub_mixin_model


@dataclass
class SinusoidTaskConfig:
    """The keys of the sinusoid suite (``tasks/sinusoid.yaml``) and of a config's ``task:``; each
    range is a ``[low, high]`` pair the values are drawn from uniformly."""

    shots: int = field(default=10, metadata=at_least(1))  # K support points per task
    query: int = field(default=10, metadata=at_least(1))  # query points per task during training
    eval_query: int = field(default=100, metadata=at_least(1))  # query points per task at evaluation
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0], metadata=interval(low=0))
    phase: list[float] = field(default_factory=lambda: [0.0, float(np.pi)], metadata=interval())
    # low < high: a single x would make every support point the same
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0], metadata=interval(strict=True))


@dataclass
class SinusoidModelConfig:
    hidden: list[int] = field(default_factory=lambda: [40, 40], metadata=at_least(1))  # widths of the hidden layers


class SineMLP(nn.Module, PyTorchModelHubMixin, library_name="metanmt", tags=["metanmt", "sinusoid"]):
    """The MAML paper's regressor: 1 -> 40 -> 40 -> 1 with ReLU."""

    def __init__(self, hidden: list[int] | None = None):
        super().__init__()
        sizes = [1, *(hidden or [40, 40]), 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class SinusoidFamily(TaskFamily):
    name = "sinusoid"
    TaskConfig = SinusoidTaskConfig
    ModelConfig = SinusoidModelConfig
    supports_vmap = True  # K support and Q query points in every episode
    evaluator = "metanmt.evaluation.sinusoid:evaluate_command"  # the MAML paper's MSE table

    def build_model(self) -> nn.Module:
        return SineMLP(hidden=list(self.model_cfg.hidden))

    def save_model(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load_model(self, directory: Path) -> nn.Module:
        return load_hub_mixin_model(SineMLP, directory)

    def sample_task(self, rng: np.random.Generator) -> tuple[float, float]:
        c = self.task_cfg
        return float(rng.uniform(*c.amplitude)), float(rng.uniform(*c.phase))

    def points(self, rng: np.random.Generator, amplitude: float, phase: float, n: int) -> tuple[Tensor, Tensor]:
        x = rng.uniform(*self.task_cfg.x_range, size=(n, 1))
        y = amplitude * np.sin(x - phase)
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def sample_episode(self, rng: np.random.Generator, split: str = "train", shots: int | None = None) -> Episode:
        amplitude, phase = self.sample_task(rng)
        k = self.task_cfg.shots if shots is None else shots
        n_query = self.task_cfg.query if split == "train" else self.task_cfg.eval_query
        support = self.points(rng, amplitude, phase, k)
        query = self.points(rng, amplitude, phase, n_query)
        return Episode(task=f"A={amplitude:.3f},phase={phase:.3f}", support=support, query=query)

    def loss(self, model: nn.Module, params: dict[str, Tensor], batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(functional_call(model, params, (x,)), y)

    def metrics(self, model: nn.Module, params: dict[str, Tensor], batch: Any) -> dict[str, float]:
        with torch.no_grad():
            return {"mse": float(self.loss(model, params, batch))}
