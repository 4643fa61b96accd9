"""Omniglot N-way K-shot classification: the classic few-shot benchmark on the same engine.

Each episode draws N character classes (a character rotated by 90, 180 or 270 degrees is a class of
its own, as in the MAML paper; an episode holds N distinct characters, each at one rotation), K
support and Q query drawings of each, and labels the classes 0..N-1 in a random order. The model
is the MAML paper's conv net: 4 x [conv3x3 64, batch norm, ReLU, 2x2 max-pool (or a stride-2
conv)], a global mean over what is left of the image, and a linear head with N outputs::

    family = OmniglotFamily({"split": "minimal", "ways": 20, "shots": 1},
                            {"bn_policy": "batch"}, data_root="../shared/data/omniglot")
    model = family.build_model()
    episode = family.sample_episode(np.random.default_rng([0, 0, 0]), split="train")
    params = dict(model.named_parameters())
    family.loss(model, params, episode.support)           # cross-entropy, differentiable twice
    family.metrics(model, params, episode.query)          # {"loss": ..., "accuracy": ...}

Adaptation: ``default_adapt = ["*"]`` adapts every tensor (MAML). For ANIL-style adaptation of
the linear head only, set ``algorithm.adapt: ["head.*"]`` (or ``model.head_only: true``, which
makes the family's ``default_adapt`` ``["head.*"]`` for callers that consult it); the conv blocks
are then meta-learned by the outer loop only.

Batch norm (``model.bn_policy``) is written from primitive tensor ops under ``torch.func``
transforms: the fused ``batch_norm`` gives wrong second-order gradients under ``torch.vmap`` in
torch 2.13 (design notes, pitfall 1), while this version is exact. Outside transforms the fused
kernel is used for the ``batch`` policy: exact there and faster (tests/test_omniglot.py checks the
MAML meta-gradient against finite differences, tests/test_fast_paths.py the two kernels against
each other). The model keeps no running buffers; both policies are
pure functions of the parameters and the batch:

* ``batch`` (the MAML/Reptile convention, and what the reference numbers use): every batch, support
  or query, is normalized with its own mean and variance. Evaluation is **transductive**: the
  prediction for one query image depends on the other query images of the episode (with Q=1 per
  class the query batch holds one image of every class, which is the setting of published MAML
  results).
* ``running_reset``: the statistics are reset for every task and estimated from that task's
  support set only, i.e. running statistics with momentum 1 over the support set, recomputed with
  the current (adapted) weights. Support batches normalize with their own statistics; query
  batches carry the support images (``batch["context"]``) and are normalized with the support
  statistics, so evaluation is **not transductive**: each query image is classified on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn
from torch.func import functional_call

from ..data.omniglot import (
    AdaptAndPredict,
    ImageSet,
    load_image_set,
    resolve_source,
    score_official_runs as _score_official_runs,
    to_float,
)
from ..config import above, at_least
from ..errors import ConfigError, DataError
from .base import Episode, TaskFamily, load_hub_mixin_model

__all__ = [
    "HEAD_ONLY_ADAPT",
    "EpisodePlan",
    "OmniglotConvNet",
    "OmniglotFamily",
    "OmniglotModelConfig",
    "OmniglotTaskConfig",
    "TaskBatchNorm",
    "random_shift",
    "score_official_runs",
]

HEAD_ONLY_ADAPT = ["head.*"]
SPLITS = ("train", "val", "test")

# Image sets each split scheme uses when the suite names none.
_DEFAULT_SETS = {
    "maml": (["background"], ["evaluation"]),
    "lake": (["background"], ["evaluation"]),
    "minimal": (["background_small1"], ["background_small2"]),
}


# -- configs ----------------------------------------------------------------------------------------
@dataclass
class OmniglotTaskConfig:
    """The keys of an Omniglot suite (``tasks/omniglot_*.yaml``) and of a config's ``task:`` section.

    ``split`` decides which characters train and which evaluate:

    * ``maml``: the characters of ``train_sets`` + ``test_sets`` (default: background + evaluation,
      1623 characters) are shuffled with ``split_seed``; the first ``maml_train_characters`` (1200)
      train and the rest test (Finn et al. 2017, after Santoro et al. 2016).
    * ``lake``: ``train_sets`` train (default the 30 background alphabets), ``test_sets`` test
      (default the 20 evaluation alphabets), as in Lake et al. 2015.
    * ``minimal``: one minimal set trains (default ``background_small1``: 5 alphabets, 136
      characters) and ``test_sets`` (default ``background_small2``) tests.

    With ``lake`` and ``minimal``, test alphabets that also appear in training (Greek and Latin are
    in both small sets) are dropped, so evaluation is always on unseen alphabets. With ``maml``, a
    character that appears in two pooled sets is kept once. ``val_characters`` characters (chosen
    with ``split_seed``) are moved out of the training characters into a ``val`` split.

    A set is a short name (``background``, ``evaluation``, ``background_small1``,
    ``background_small2``: the folder ``images_<name>/`` or the official ``images_<name>.zip``) or a
    zip/folder path; relative paths are under ``data.root``.
    """

    split: Literal["maml", "lake", "minimal"] = "minimal"
    train_sets: Optional[list[str]] = None  # None: the split's default (see above)
    test_sets: Optional[list[str]] = None
    # `maml` split: characters (before rotation) that train
    maml_train_characters: int = field(default=1200, metadata=at_least(1))
    # characters moved from the training ones into the `val` split
    val_characters: int = field(default=0, metadata=at_least(0))
    split_seed: int = field(default=1, metadata=at_least(0))  # fixes which characters train/validate/test
    ways: int = field(default=5, metadata=at_least(2))  # N: classes per episode (one class would teach nothing)
    shots: int = field(default=1, metadata=at_least(1))  # K: support images per class
    query: int = field(default=1, metadata=at_least(1))  # Q: query images per class
    image_size: int = field(default=28, metadata=at_least(1))  # also large enough for model.blocks (checked with them)
    rotations: bool = True  # train split: 90/180/270-degree rotations are extra classes (x4)
    eval_rotations: bool = False  # the same for the val and test splits
    # train split: translate each image by up to +-shift px (0 = off; below image_size), drawn from the episode's rng
    shift: int = field(default=0, metadata=at_least(0))
    official_runs: Optional[str] = None  # all_runs.zip (or folder), relative to data.root, for score_official_runs
    cache_dir: Optional[str] = None  # also keep decoded images as .npz here (keyed by source and size)


@dataclass
class OmniglotModelConfig:
    """The keys of a config's ``model:`` section for Omniglot.

    ``pooling: max`` is conv (padding 1) + 2x2 max-pool, ``stride`` a stride-2 conv (the MAML
    paper's Omniglot variant). ``bn_policy`` is documented in the module docstring.
    ``head_only`` marks the model for ANIL-style adaptation (``default_adapt`` becomes ``head.*``).
    """

    hidden: int = field(default=64, metadata=at_least(1))
    blocks: int = field(default=4, metadata=at_least(1))
    pooling: Literal["max", "stride"] = "max"
    bn_policy: Literal["batch", "running_reset"] = "batch"
    bn_eps: float = field(default=1e-5, metadata=above(0))
    head_only: bool = False


# -- model --------------------------------------------------------------------------------------------
class TaskBatchNorm(nn.Module):
    """Batch norm from primitive ops, with statistics taken from a given tensor (exact to any order).

    ``forward(x, stats_from)`` normalizes ``x`` per channel with the biased mean and variance of
    ``stats_from`` (default ``x`` itself), then scales and shifts. No running buffers: the caller
    decides which images the statistics come from.
    """

    #: the fused kernel where it is exact (no given statistics, no torch.func transform active)
    use_fused: ClassVar[bool] = True

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, stats_from: Optional[Tensor] = None) -> Tensor:
        if self.use_fused and stats_from is None and torch._C._functorch.peek_interpreter_stack() is None:
            # Outside torch.func transforms the fused kernel is exact to any order and ~20% faster
            # for second-order MAML on CPU; under vmap it is not (docs/design.md, "vmap and fused batch norm").
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps)
        ref = x if stats_from is None else stats_from
        mean = ref.mean(dim=(0, 2, 3), keepdim=True)
        var = (ref - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        shape = (1, -1, 1, 1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class ConvBlock(nn.Module):
    """conv3x3 -> batch norm -> ReLU -> 2x2 max-pool (or a stride-2 conv instead of the pool).

    The conv has no bias: batch norm subtracts the per-channel mean right after, which cancels it
    exactly under both policies (its gradient would be identically zero).
    """

    def __init__(self, in_channels: int, out_channels: int, pooling: str, eps: float):
        super().__init__()
        self.pooling = pooling
        stride = 2 if pooling == "stride" else 1
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm = TaskBatchNorm(out_channels, eps)
        nn.init.xavier_uniform_(self.conv.weight)  # the MAML reference code's initializer

    def forward(self, x: Tensor, n_stats: int = 0) -> Tensor:
        """``n_stats > 0``: the last ``n_stats`` rows of ``x`` give the batch-norm statistics."""
        h = self.conv(x)
        h = self.norm(h, h[-n_stats:] if n_stats else None)
        h = F.relu(h)
        return F.max_pool2d(h, 2) if self.pooling == "max" else h


class OmniglotConvNet(nn.Module, PyTorchModelHubMixin, library_name="metanmt", tags=["meta-learning", "omniglot"]):
    """The MAML paper's 4-block conv net; ``save_pretrained``/``from_pretrained`` via the Hub mixin.

    Parameter names: ``blocks.{i}.conv.weight``, ``blocks.{i}.norm.{weight,bias}``,
    ``head.{weight,bias}`` (so ANIL adapts ``head.*``).

        net = OmniglotConvNet(ways=20)
        net(torch.rand(40, 1, 28, 28)).shape            # (40, 20)
        net.save_pretrained("out/model")                 # config.json + model.safetensors
        OmniglotConvNet.from_pretrained("out/model")
    """

    def __init__(
        self,
        ways: int = 5,
        hidden: int = 64,
        blocks: int = 4,
        pooling: str = "max",
        in_channels: int = 1,
        bn_policy: str = "batch",
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        if pooling not in ("max", "stride"):
            raise ConfigError(f"model.pooling: {pooling!r}; allowed values: max, stride")
        if bn_policy not in ("batch", "running_reset"):
            raise ConfigError(f"model.bn_policy: {bn_policy!r}; allowed values: batch, running_reset")
        self.bn_policy = bn_policy
        channels = [in_channels] + [hidden] * blocks
        self.blocks = nn.ModuleList(ConvBlock(channels[i], channels[i + 1], pooling, bn_eps) for i in range(blocks))
        self.head = nn.Linear(hidden, ways)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Logits for ``images`` (B, C, H, W); with ``context`` (the support images) and the
        ``running_reset`` policy, batch-norm statistics come from ``context`` only."""
        dtype = self.head.weight.dtype
        x = images.to(dtype)
        n_stats = 0
        if context is not None and self.bn_policy == "running_reset":
            # One pass over both: every layer's statistics are those of the context rows, computed
            # with the same (possibly adapted) weights as the images they normalize.
            x = torch.cat([x, context.to(dtype)])
            n_stats = context.shape[0]
        for block in self.blocks:
            x = block(x, n_stats)
        if n_stats:
            x = x[:-n_stats]
        # Global mean over what is left of the image: 1x1 with max-pooling on 28x28, 2x2 with
        # strides (as in the MAML reference code), so the head always sees `hidden` features.
        return self.head(x.mean(dim=(2, 3)))


# -- episodes -----------------------------------------------------------------------------------------
@dataclass
class EpisodePlan:
    """Which images make an episode, before they are read: class ``i`` of the episode (label ``i``)
    is class ``classes[i]`` of the split, i.e. character ``characters[i]`` rotated by
    ``90 * rotations[i]`` degrees; ``support[i]``/``query[i]`` are its image rows."""

    split: str
    classes: np.ndarray  # (N,) class numbers within the split
    characters: np.ndarray  # (N,) global character numbers
    rotations: np.ndarray  # (N,) quarter turns
    support: np.ndarray  # (N, K) image rows
    query: np.ndarray  # (N, Q) image rows
    support_order: np.ndarray  # (N*K,) shuffled order of the support examples
    query_order: np.ndarray  # (N*Q,)


@dataclass
class _Pool:
    characters: np.ndarray  # (C,) global character numbers of the split, before rotation
    class_char: np.ndarray = field(init=False)
    class_rot: np.ndarray = field(init=False)
    rotations: bool = False

    def __post_init__(self) -> None:
        turns = 4 if self.rotations else 1
        self.class_char = np.repeat(self.characters, turns)
        self.class_rot = np.tile(np.arange(turns), len(self.characters))


class OmniglotFamily(TaskFamily):
    """Omniglot as a task family: see the module docstring and :class:`OmniglotTaskConfig`."""

    name: ClassVar[str] = "omniglot"
    TaskConfig: ClassVar[type] = OmniglotTaskConfig
    ModelConfig: ClassVar[type] = OmniglotModelConfig
    default_adapt: ClassVar[list[str]] = ["*"]
    supports_vmap: ClassVar[bool] = True  # N-way K-shot episodes all have the same shapes
    evaluator: ClassVar[Any] = "metanmt.evaluation.omniglot:evaluate_command"  # accuracy, Lake et al.'s runs

    def __init__(self, task_cfg: dict[str, Any], model_cfg: dict[str, Any], data_root: str | Path | None = None):
        super().__init__(task_cfg, model_cfg, data_root)
        t, m = self.task_cfg, self.model_cfg
        # each key's own range is checked with the schema (OmniglotTaskConfig's field metadata); here the
        # ranges that depend on another key
        if not 0 <= t.shift < t.image_size:
            raise ConfigError(f"task.shift: expected a value in [0, task.image_size={t.image_size}), got {t.shift}")
        size = t.image_size
        for _ in range(m.blocks):
            size = size // 2 if m.pooling == "max" else (size + 1) // 2
        if size < 1:
            raise ConfigError(
                f"task.image_size: {t.image_size}px is too small for {m.blocks} blocks with {m.pooling} pooling"
            )
        if m.head_only:
            self.default_adapt = list(HEAD_ONLY_ADAPT)  # instance attribute: ANIL for this family only
        self._sets: list[ImageSet] | None = None
        self._images: Tensor | None = None  # every loaded image, (M, H, W) uint8
        self._char_rows: list[np.ndarray] = []  # global character -> image rows
        self._char_names: list[str] = []  # global character -> "source:Alphabet/characterNN"
        self._pools: dict[str, _Pool] = {}
        self._checked: set[str] = set()

    # -- model ------------------------------------------------------------------------------------
    def build_model(self) -> OmniglotConvNet:
        m = self.model_cfg
        return OmniglotConvNet(
            ways=self.task_cfg.ways,
            hidden=m.hidden,
            blocks=m.blocks,
            pooling=m.pooling,
            in_channels=1,
            bn_policy=m.bn_policy,
            bn_eps=m.bn_eps,
        )

    def save_model(self, model: nn.Module, directory: Path) -> None:
        if not isinstance(model, OmniglotConvNet):
            raise TypeError(f"expected an OmniglotConvNet, got {type(model).__name__}")
        model.save_pretrained(Path(directory))

    def load_model(self, directory: Path) -> OmniglotConvNet:
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise DataError(f"{directory}: no config.json; expected a folder written by save_model/save_pretrained")
        return load_hub_mixin_model(OmniglotConvNet, directory)

    # -- data -------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Read the image sets the split needs (once) and assign characters to train/val/test."""
        if self._sets is not None:
            return
        t = self.task_cfg
        default_train, default_test = _DEFAULT_SETS[t.split]
        train_names = t.train_sets if t.train_sets is not None else default_train
        test_names = t.test_sets if t.test_sets is not None else default_test
        if not train_names:
            raise ConfigError("task.train_sets: names no image set")
        sets: list[ImageSet] = []
        by_name: dict[str, ImageSet] = {}
        for name in dict.fromkeys([*train_names, *test_names]):
            path = resolve_source(self.data_root, name)
            by_name[name] = load_image_set(path, t.image_size, t.cache_dir)
            if all(by_name[name] is not s for s in sets):
                sets.append(by_name[name])

        rows: list[np.ndarray] = []
        names: list[str] = []
        first_char: dict[int, int] = {}
        offset = 0
        for s in sets:
            first_char[id(s)] = len(names)
            for c in range(len(s.characters)):
                rows.append(s.indices_of(c) + offset)
                names.append(f"{s.source}:{s.characters[c]}")
            offset += s.images.shape[0]
        self._images = torch.cat([s.images for s in sets]) if len(sets) > 1 else sets[0].images
        self._char_rows, self._char_names = rows, names

        def chars_of(set_names: list[str]) -> list[int]:
            out: list[int] = []
            for n in dict.fromkeys(set_names):
                s = by_name[n]
                out.extend(range(first_char[id(s)], first_char[id(s)] + len(s.characters)))
            return out

        def short(c: int) -> str:  # "Alphabet/characterNN" of a global character
            return names[c].rsplit(":", 1)[1]

        rng = np.random.default_rng(t.split_seed)
        if t.split == "maml":
            seen: set[str] = set()
            pooled = []
            for c in chars_of([*train_names, *test_names]):
                if short(c) not in seen:  # the same character in two pooled sets counts once
                    seen.add(short(c))
                    pooled.append(c)
            if len(pooled) <= t.maml_train_characters:
                raise DataError(
                    f"the maml split needs more than maml_train_characters={t.maml_train_characters} characters; "
                    f"{', '.join(s.source for s in sets)} hold {len(pooled)}"
                )
            pooled_arr = np.array(pooled)[rng.permutation(len(pooled))]
            train = pooled_arr[: t.maml_train_characters]
            test = np.sort(pooled_arr[t.maml_train_characters :])
        else:
            train_list = chars_of(train_names)
            train_alphabets = {short(c).split("/")[0] for c in train_list}
            # evaluation is on unseen alphabets: drop test alphabets that also train
            test = np.array(
                [c for c in chars_of(test_names) if short(c).split("/")[0] not in train_alphabets], dtype=np.int64
            )
            train = np.array(train_list)[rng.permutation(len(train_list))]
        if t.val_characters >= len(train):
            raise ConfigError(
                f"task.val_characters: {t.val_characters} leaves no training characters (there are {len(train)})"
            )
        cut = len(train) - t.val_characters
        val = np.sort(train[cut:])
        train = np.sort(train[:cut])
        self._pools = {
            "train": _Pool(train.astype(np.int64), rotations=t.rotations),
            "val": _Pool(val.astype(np.int64), rotations=t.eval_rotations),
            "test": _Pool(test.astype(np.int64), rotations=t.eval_rotations),
        }
        self._sets = sets

    def split_characters(self, split: str) -> list[str]:
        """``source:Alphabet/characterNN`` of every character in a split (before rotation)."""
        self._load()
        return [self._char_names[c] for c in self._pool(split, check=False).characters]

    def num_classes(self, split: str) -> int:
        """Classes an episode of ``split`` draws from (characters x 4 with rotations)."""
        self._load()
        return len(self._pool(split, check=False).class_char)

    def prepare(self) -> None:
        """Load the image sets and check that training episodes can be drawn."""
        self._load()
        self._pool("train")

    def _pool(self, split: str, check: bool = True) -> _Pool:
        """The split's classes; ``check``: first make sure an episode can be drawn from them."""
        if split not in SPLITS:
            raise ConfigError(f"split {split!r}: allowed values: {', '.join(SPLITS)}")
        pool = self._pools[split]
        if check and split not in self._checked:
            self._check_pool(split, pool)
            self._checked.add(split)
        return pool

    def _check_pool(self, split: str, pool: _Pool) -> None:
        t = self.task_cfg
        if len(pool.characters) < t.ways:
            hint = " (set task.val_characters)" if split == "val" and len(pool.characters) == 0 else ""
            raise DataError(
                f"the {split} split of {t.split!r} has {len(pool.characters)} characters; "
                f"a {t.ways}-way episode needs at least {t.ways} distinct ones{hint}"
            )
        need = t.shots + t.query
        short = [c for c in pool.characters if len(self._char_rows[c]) < need]
        if short:
            shown = "; ".join(f"{self._char_names[c]} has {len(self._char_rows[c])}" for c in short[:3])
            more = f" (and {len(short) - 3} more)" if len(short) > 3 else ""
            raise DataError(
                f"{len(short)} character(s) of the {split} split have fewer than shots+query={need} images: "
                f"{shown}{more}"
            )

    def plan_episode(self, rng: np.random.Generator, split: str = "train") -> EpisodePlan:
        """Choose an episode's classes and images (deterministic given ``rng``) without reading them.

        N classes of distinct characters (each with its own rotation when rotations are on), K + Q
        distinct images of each: the first K support and the rest query.
        """
        self._load()
        pool = self._pool(split)
        t = self.task_cfg
        # N distinct characters, then one rotation each: two rotations of one character never share
        # an episode (as in the MAML reference code), so no drawing is both a support image of one
        # class and, turned, a query image of another.
        which = rng.choice(len(pool.characters), size=t.ways, replace=False)  # random order = labels
        turns = rng.integers(0, 4, size=t.ways) if pool.rotations else np.zeros(t.ways, dtype=np.int64)
        classes = which * (4 if pool.rotations else 1) + turns
        chars = pool.class_char[classes]
        picks = np.stack([rng.choice(self._char_rows[c], size=t.shots + t.query, replace=False) for c in chars])
        return EpisodePlan(
            split=split,
            classes=classes,
            characters=chars,
            rotations=pool.class_rot[classes],
            support=picks[:, : t.shots],
            query=picks[:, t.shots :],
            support_order=rng.permutation(t.ways * t.shots),
            query_order=rng.permutation(t.ways * t.query),
        )

    def sample_episode(self, rng: np.random.Generator, split: str = "train") -> Episode:
        """One N-way K-shot episode: batches ``{"images": (B, 1, H, W) float32, "labels": (B,) int64}``.

        Labels are 0..N-1 in a random class order; examples are shuffled within each batch. With
        ``bn_policy: running_reset`` the query batch also carries ``"context"``: the support images.
        With ``task.shift > 0`` every training image (support and query) is translated by its own
        random offset, drawn from ``rng`` after the plan (so the plan is the same as without it).
        """
        plan = self.plan_episode(rng, split)
        support_x = self._read(plan.support, plan.rotations)
        query_x = self._read(plan.query, plan.rotations)
        t = self.task_cfg
        if t.shift and split == "train":
            support_x = random_shift(support_x, t.shift, rng)
            query_x = random_shift(query_x, t.shift, rng)
        support_y = torch.arange(t.ways).repeat_interleave(t.shots)
        query_y = torch.arange(t.ways).repeat_interleave(t.query)
        s_order = torch.from_numpy(plan.support_order)
        q_order = torch.from_numpy(plan.query_order)
        names = [
            self._char_names[c].rsplit(":", 1)[1] + (f"@{90 * r}" if r else "")
            for c, r in zip(plan.characters, plan.rotations)
        ]
        return self.episode_from_arrays(
            support_x[s_order],
            support_y[s_order],
            query_x[q_order],
            query_y[q_order],
            task=f"{split}: {', '.join(names)}",
        )

    def _read(self, rows: np.ndarray, rotations: np.ndarray) -> Tensor:
        """(N, R) image rows -> (N*R, 1, H, W) float32, each class rotated by its quarter turns."""
        assert self._images is not None
        imgs = self._images[torch.from_numpy(rows)]  # (N, R, H, W) uint8
        out = [torch.rot90(imgs[i], int(k), dims=(-2, -1)) if k else imgs[i] for i, k in enumerate(rotations)]
        return to_float(torch.cat(out))

    def episode_from_arrays(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Optional[Tensor] = None,
        task: str = "",
    ) -> Episode:
        """Wrap ready images (``(B, 1, H, W)`` float in [0, 1]) as this family's batches.

        What an evaluation (e.g. the official runs' ``adapt_and_predict``) uses so its batches
        follow the batch-norm policy; a query without labels has no ``"labels"`` key.
        """
        support = {"images": support_x, "labels": support_y.to(torch.int64)}
        query: dict[str, Tensor] = {"images": query_x}
        if query_y is not None:
            query["labels"] = query_y.to(torch.int64)
        if self.model_cfg.bn_policy == "running_reset":
            query["context"] = support_x
        return Episode(task=task, support=support, query=query)

    def merge_batches(self, first: Any, second: Any) -> Any:
        """Support + query as one training batch (Reptile, the multi-task baseline); it normalizes
        with its own statistics, so any ``context`` is dropped."""
        return {k: torch.cat([first[k], second[k]]) for k in ("images", "labels")}

    # -- loss -------------------------------------------------------------------------------------
    def logits(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        kwargs = {"context": batch["context"]} if "context" in batch else {}
        return functional_call(model, params, (batch["images"],), kwargs)

    def loss(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            raise ValueError("this batch has no labels (built with query_y=None): use predict() instead of loss()")
        return F.cross_entropy(self.logits(model, params, batch), batch["labels"])

    def predict(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """Predicted class (0..N-1) of every image in ``batch``."""
        with torch.no_grad():
            return self.logits(model, params, batch).argmax(dim=-1)

    def metrics(self, model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
        with torch.no_grad():
            logits = self.logits(model, params, batch)
            labels = batch["labels"]
            return {
                "loss": float(F.cross_entropy(logits, labels)),
                "accuracy": float((logits.argmax(dim=-1) == labels).to(torch.float64).mean()),
            }

    # -- the official one-shot runs ---------------------------------------------------------------
    def score_official_runs(self, runs_path: str | Path | None, adapt_and_predict: AdaptAndPredict) -> dict[str, Any]:
        """Lake et al.'s 20 runs at this family's image size; ``runs_path`` None uses ``task.official_runs``.

        See :func:`metanmt.data.omniglot.score_official_runs` for ``adapt_and_predict``.
        """
        if runs_path is None:
            if self.task_cfg.official_runs is None:
                raise ConfigError("no official runs given: pass a path to all_runs.zip or set task.official_runs")
            runs_path = resolve_source(self.data_root, self.task_cfg.official_runs)
        return _score_official_runs(runs_path, adapt_and_predict, image_size=self.task_cfg.image_size)


def random_shift(images: Tensor, max_shift: int, rng: np.random.Generator) -> Tensor:
    """Translate each image ``(B, C, H, W)`` by its own integer offset in ``[-max_shift, max_shift]``
    (rows and columns), filling with 0 (the background after inversion).

    Written here rather than taken from torchvision (not a dependency): its random transforms draw
    from torch's global generator, while episodes must be a function of their own numpy ``rng``.
    """
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    offsets = rng.integers(-max_shift, max_shift + 1, size=(b, 2))
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    out = torch.empty_like(images)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        # output pixel (y, x) = input pixel (y - dy, x - dx): the drawing moves by (+dy, +dx)
        top, left = max_shift - dy, max_shift - dx
        out[i] = padded[i, :, top : top + h, left : left + w]
    return out


def score_official_runs(
    runs_path: str | Path, adapt_and_predict: AdaptAndPredict, image_size: int = 28
) -> dict[str, Any]:
    """Re-export of :func:`metanmt.data.omniglot.score_official_runs` (error % per run and overall)."""
    return _score_official_runs(runs_path, adapt_and_predict, image_size=image_size)
