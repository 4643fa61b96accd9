"""The study file: the MetaNMT experiment as data (``studies/*.yaml``), read and checked in full
before anything runs.

    spec = load_study("studies/quick.yaml", data_root="../shared/data/l10n", langs=["fi"])
    spec.inits["meta"].warm_start          # WarmStart(init='multi', update=2888)
    spec.total_updates("meta")              # 3300: its own updates plus those of its warm start

A study names its initializations (each a run config, optionally warm-started from another init of
the study at a named update), the equal-compute rule, how the fine-tuning length is set (chosen on
the dev language by a fixed procedure, or fixed), the test languages, budgets, seeds, the adaptation
curve's points and the decoding. Keys and values are checked like run configs
(:func:`metanmt.config.from_dict`); an error names the study file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ..adaptation.recipe import FinetuneRecipe, adapt_patterns
from ..config import ConfigError, above, at_least, from_dict, load_config, parse_overrides
from ..evaluation.compare import budget_words
from ..errors import UserError
from ..evaluation.statistics import TESTS

#: schedules whose learning rate at an update does not depend on ``train.steps``: a run trained to its
#: warm-start update and then resumed to its end computes exactly what one uninterrupted run would
STEP_FREE_SCHEDULES = ("constant", "inverse_sqrt")


@dataclass
class WarmStart:
    init: str  # another init of the study
    update: int = field(default=1, metadata=at_least(1))  # that init's model after this many updates


@dataclass
class InitEntry:
    config: str  # a run config, relative to the study file
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides, as meta-train's --set
    warm_start: Optional[WarmStart] = None
    # "chosen": the inner loop (algorithm.inner_lr / inner_steps) that the study's `inner` search picks
    # on the dev language at the warm start; "config": the config's own
    inner: Literal["config", "chosen"] = "config"
    # true: the outer rate starts where the warm start's own schedule had reached at its update (a fresh
    # optimizer continues at the multi-task run's rate instead of jumping back to its peak); it stays there
    # (schedule constant) or falls linearly to 0 (schedule linear, no warmup: the source's cooldown)
    lr_from_warm_start: bool = False


@dataclass
class InnerSearch:
    """The inner loop of the warm-started meta inits, chosen on the dev language before they train:
    every (rate, steps) pair adapts the warm start on the same ``episodes`` dev-language episodes
    (support and query disjoint, drawn from the dev language's ``budget`` file); the pair with the
    largest mean inner gain (query NLL before minus after) wins, and a study whose best gain is not
    positive stops there (meta-training through an inner loop that hurts wastes the study's hours)."""

    lrs: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4], metadata=above(0))
    steps: list[int] = field(default_factory=lambda: [1, 3], metadata=at_least(1))
    episodes: int = field(default=24, metadata=at_least(2))
    budget: Any = "4k"
    seed: int = field(default=0, metadata=at_least(0))


@dataclass
class LengthSearch:
    """Candidates of the fine-tuning length rule ``min(max_steps, max(min_steps, ceil(epochs x batches
    per epoch)))`` measured on the dev language (:mod:`metanmt.study.rule`)."""

    epochs: list[float] = field(default_factory=lambda: [5.0, 10.0, 20.0, 40.0], metadata=above(0))
    min_steps: list[int] = field(default_factory=lambda: [0], metadata=at_least(0))
    budgets: list[Any] = field(default_factory=lambda: ["1k", "4k"])  # strings or numbers: 1k, 4000
    tie: float = field(default=0.1, metadata=at_least(0))  # chrF points within which two rules tie
    segments: Optional[int] = field(default=None, metadata=at_least(1))  # dev segments scored (None: all)


@dataclass
class FinetuneSection:
    adapt: str = "all"
    lr: float = field(default=3e-4, metadata=above(0))
    max_tokens: int = field(default=1000, metadata=at_least(1))
    grad_clip: Optional[float] = field(default=1.0, metadata=at_least(0))
    # "chosen": the length rule the dev language picks among `search`; "fixed": epochs/min_steps below
    length: Literal["chosen", "fixed"] = "chosen"
    epochs: float = field(default=20.0, metadata=above(0))
    min_steps: int = field(default=0, metadata=at_least(0))
    max_steps: int = field(default=1000, metadata=at_least(1))
    search: LengthSearch = field(default_factory=LengthSearch)


@dataclass
class CurveSection:
    points: list[int] = field(default_factory=lambda: [0, 10, 30, 100], metadata=at_least(0))
    seeds: int = field(default=1, metadata=at_least(1))  # fine-tuning seeds with a curve
    segments: Optional[int] = field(default=None, metadata=at_least(1))  # test segments decoded per point


@dataclass
class DecodingSection:
    beam: int = field(default=1, metadata=at_least(1))
    test_segments: Optional[int] = field(default=None, metadata=at_least(1))  # None: the whole test set


@dataclass
class DataSection:
    root: Optional[str] = None  # relative to the study file; --data-root replaces it
    langs: list[str] = field(default_factory=list)  # the new languages; --langs replaces them
    dev_lang: str = "ro"
    test: str = "test/{lang}.tsv.gz"
    finetune: str = "finetune/{lang}.{budget}.tsv.gz"
    dev: str = "dev/{lang}.tsv.gz"


@dataclass
class StudyFile:
    name: str = ""
    description: str = ""
    data: DataSection = field(default_factory=DataSection)
    inits: dict[str, Any] = field(default_factory=dict)  # name -> InitEntry
    reference: str = "multi"  # every other init is tested against it; the length rule is chosen with it
    # "updates": every init's updates, its warm start's included, equal the reference's, on episodes of
    # the same size (checked before anything trains); "none": not checked (the compute table still counts)
    equal_compute: Literal["updates", "none"] = "updates"
    # "required": no test cell runs until the reference's dev NLL is flat by the study's criterion
    # (study/convergence.py); "reported": the check is only reported
    convergence: Literal["reported", "required"] = "reported"
    inner: Optional[InnerSearch] = None
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    budgets: list[Any] = field(default_factory=lambda: ["0", "1k", "4k"])  # English words: 0 (zero-shot), 1k, 4000
    seeds: int = field(default=3, metadata=at_least(1))
    scratch_seeds: int = field(default=3, metadata=at_least(0))  # 0: no from-scratch row
    curve: CurveSection = field(default_factory=CurveSection)
    decoding: DecodingSection = field(default_factory=DecodingSection)
    paired_test: str = "bs"
    jobs: int = field(default=2, metadata=at_least(1))  # processes (of one thread each where several run)


@dataclass
class Init:
    name: str
    config: Path
    overrides: list[str]
    warm_start: Optional[WarmStart]
    inner: str
    lr_from_warm_start: bool
    steps: int  # the init's own train.steps
    schedule: str
    episode_shape: tuple[Any, ...]  # what equal compute compares: episode sizes and tasks per update
    optim: Any  # the config's OptimConfig
    passes: int = 1  # forward-backward passes per update and task: 1 for multi-task, inner steps + 1 with an inner loop


@dataclass
class Study:
    """A checked study: :class:`StudyFile`'s values with the paths resolved and the inits read."""

    path: Path
    file: StudyFile
    data_root: Path
    langs: list[str]
    inits: dict[str, Init]
    recipe: FinetuneRecipe

    @property
    def name(self) -> str:
        return self.file.name

    def total_updates(self, name: str) -> int:
        init = self.inits[name]
        return init.steps + (self.total_updates_at(init.warm_start) if init.warm_start else 0)

    def total_updates_at(self, warm: WarmStart) -> int:
        source = self.inits[warm.init]
        return warm.update + (self.total_updates_at(source.warm_start) if source.warm_start else 0)

    def cost(self, name: str) -> int:
        """The work of the init's last training task in forward-backward passes per task: its own updates
        (a warm start's not included) past the last update another init warm-starts from."""
        exported = max((w.update for w in self.warm_starts() if w.init == name), default=0)
        return (self.inits[name].steps - exported) * self.inits[name].passes

    def order(self) -> list[str]:
        """The inits, each after the one it is warm-started from."""
        done: list[str] = []
        while len(done) < len(self.inits):
            for name, init in self.inits.items():
                if name not in done and (init.warm_start is None or init.warm_start.init in done):
                    done.append(name)
        return done

    def lr_at_warm_start(self, name: str) -> float:
        """The rate ``name``'s warm start's schedule had reached at its update (for ``lr_from_warm_start``)."""
        warm = self.inits[name].warm_start
        return _rate_reached(self.inits[warm.init], warm.update)

    def warm_starts(self) -> list[WarmStart]:
        """Each distinct (init, update) some init starts from, in training order."""
        seen: dict[tuple[str, int], WarmStart] = {}
        for name in self.order():
            warm = self.inits[name].warm_start
            if warm is not None:
                seen.setdefault((warm.init, warm.update), warm)
        return list(seen.values())


def _passes(algorithm: Any, chosen_steps: Optional[list[int]]) -> int:
    """Forward-backward passes of one update per task, to order the work (longest first): the inner
    steps (the most a choice may pick) plus the query pass; multi-task training is one."""
    if algorithm.name == "multitask":
        return 1
    return max(chosen_steps or [algorithm.inner_steps]) + 1


def _line_of(text: str, keys: list[str]) -> Optional[int]:
    """The 1-based line of the key path ``keys`` in a YAML text (the deepest key found)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def _error(path: Path, text: str, message: str) -> ConfigError:
    """``STUDY.yaml, line N: message`` where the message starts with a dotted key path."""
    key = message.split(":", 1)[0].strip()
    parts = [p.split("[")[0] for p in key.split(".")] if key and " " not in key else []
    line = _line_of(text, parts) if parts else None
    return ConfigError(f"{path}{f', line {line}' if line else ''}: {message}")


def load_study(path: str | Path, data_root: Optional[str | Path] = None, langs: Optional[list[str]] = None,
               extra: Optional[list[str]] = None) -> Study:
    """Read and check a study file; ``data_root`` and ``langs`` replace the file's (``--data-root``,
    ``--langs``), ``extra`` are ``KEY=VALUE`` overrides of the study's own keys (``--set``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    from ..config import deep_merge

    raw = deep_merge(raw, parse_overrides(extra or []))
    try:
        study_file = from_dict(StudyFile, raw)
        inits = {name: from_dict(InitEntry, entry, f"inits.{name}") for name, entry in study_file.inits.items()}
        return _check(path, study_file, inits, data_root, langs)
    except ConfigError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise _error(path, text, str(exc)) from None


def _rate_reached(source: Init, update: int) -> float:
    """The rate ``source``'s schedule gives its update ``update`` (0-based: the first after that many)."""
    from ..engine.schedule import schedule_factor

    return source.optim.lr * schedule_factor(source.optim, source.steps, update)


def _check(path: Path, sf: StudyFile, entries: dict[str, InitEntry], data_root: Optional[str | Path],
           langs: Optional[list[str]]) -> Study:
    base = path.resolve().parent
    if not sf.name or not all(c.isalnum() or c in "-_." for c in sf.name):
        raise ConfigError(f"name: give the study a name of letters, digits and - _ . (got {sf.name!r})")
    if not entries:
        raise ConfigError("inits: name at least one initialization (name: {config: ...})")
    if sf.reference not in entries:
        raise ConfigError(f"reference: {sf.reference!r} is not one of the inits ({', '.join(entries)})")
    for name in entries:
        if name == "scratch" or "__" in name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"inits.{name}: an init's name uses letters, digits and - _ . (not 'scratch', "
                              "the from-scratch row, and no '__')")
    if sf.paired_test not in TESTS:
        raise ConfigError(f"paired_test: expected one of {', '.join(TESTS)}, got {sf.paired_test!r}")
    for key, budgets in (("budgets", sf.budgets), ("finetune.search.budgets", sf.finetune.search.budgets)):
        if not budgets:
            raise ConfigError(f"{key}: give at least one budget")
        for budget in budgets:
            try:
                budget_words(str(budget))
            except UserError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    sf.budgets = [str(b) for b in sf.budgets]
    sf.finetune.search.budgets = [str(b) for b in sf.finetune.search.budgets]
    if sf.inner is not None:
        try:
            budget_words(str(sf.inner.budget))
        except UserError as exc:
            raise ConfigError(f"inner.budget: {exc}") from None
        sf.inner.budget = str(sf.inner.budget)
    try:
        adapt_patterns(sf.finetune.adapt)
    except ConfigError as exc:
        raise ConfigError(f"finetune.adapt: {exc}") from None

    root = Path(data_root) if data_root is not None else (base / sf.data.root if sf.data.root else None)
    if root is None:
        raise ConfigError("data.root: no data root (set data.root in the study file or pass --data-root)")
    if not root.is_dir():
        raise ConfigError(f"data.root: {root} is not a directory")
    chosen_langs = list(langs) if langs else list(sf.data.langs)
    if not chosen_langs:
        raise ConfigError("data.langs: no test language (set data.langs or pass --langs)")
    if len(set(chosen_langs)) != len(chosen_langs):
        raise ConfigError(f"data.langs: a language is named twice ({' '.join(chosen_langs)})")

    inits: dict[str, Init] = {}
    for name, entry in entries.items():
        config = (base / entry.config).resolve()  # an absolute path stays itself
        if not config.is_file():
            raise ConfigError(f"inits.{name}.config: no such run config {config}")
        overrides = [f"data.root={root}", *entry.set]
        if entry.warm_start is not None:
            overrides.append("model.pretrained=<warm start>")  # only to read the config: the study sets it
        cfg = load_config(config, overrides)
        if cfg.family != "translation":
            raise ConfigError(f"inits.{name}.config: {config} is a {cfg.family} run; a study compares translation inits")
        task = cfg.task
        shape = (task.get("support_tokens"), task.get("query_tokens"), task.get("support_examples"),
                 task.get("query_examples"), cfg.train.meta_batch_size)
        inits[name] = Init(name, config, list(entry.set), entry.warm_start, entry.inner, entry.lr_from_warm_start,
                           cfg.train.steps, cfg.optim.schedule, shape, cfg.optim,
                           _passes(cfg.algorithm, sf.inner.steps if entry.inner == "chosen" and sf.inner else None))
    for name, init in inits.items():
        warm = init.warm_start
        if warm is None:
            if init.inner == "chosen" or init.lr_from_warm_start:
                key = "inner: chosen" if init.inner == "chosen" else "lr_from_warm_start"
                raise ConfigError(f"inits.{name}: {key} needs a warm start; {name} has none")
            continue
        if warm.init not in inits or warm.init == name:
            raise ConfigError(f"inits.{name}.warm_start.init: {warm.init!r} is not another init of the study "
                              f"({', '.join(n for n in inits if n != name)})")
        source = inits[warm.init]
        if warm.update > source.steps:
            raise ConfigError(f"inits.{name}.warm_start.update: {warm.update} is past the end of {warm.init} "
                              f"({source.steps} updates)")
        if warm.update < source.steps and source.schedule not in STEP_FREE_SCHEDULES:
            raise ConfigError(f"inits.{name}.warm_start: {warm.init} uses the {source.schedule} schedule, whose rate "
                              f"depends on train.steps, so its update {warm.update} would differ from a run that stops "
                              f"there; use one of {', '.join(STEP_FREE_SCHEDULES)} or warm-start at its last update")
        cooldown = source.optim.cooldown_from
        if cooldown and cooldown < warm.update < source.steps:
            raise ConfigError(f"inits.{name}.warm_start: update {warm.update} is inside {warm.init}'s cooldown (from "
                              f"update {cooldown}), whose rates depend on train.steps; warm-start at {cooldown} or before")
        if init.lr_from_warm_start and not (init.optim.schedule == "constant" or
                                            (init.optim.schedule == "linear" and not init.optim.warmup_steps)):
            raise ConfigError(f"inits.{name}.lr_from_warm_start: the init's own schedule must be constant, or linear "
                              f"without warmup (a cooldown from the warm start's rate), not {init.optim.schedule}"
                              f"{' with warmup' if init.optim.schedule == 'linear' else ''}: the rate continues the "
                              "warm start's")
        if init.lr_from_warm_start and not _rate_reached(source, warm.update):
            raise ConfigError(f"inits.{name}.lr_from_warm_start: {warm.init}'s rate at update {warm.update} is 0 (the "
                              "end of its cooldown); warm-start where its rate is above 0")
        if init.inner == "chosen" and sf.inner is None:
            raise ConfigError(f"inits.{name}.inner: 'chosen' needs the study's `inner:` search")
    seen: set[str] = set()
    for name in inits:  # no cycle of warm starts
        chain, current = [name], inits[name].warm_start
        while current is not None:
            if current.init in chain:
                raise ConfigError(f"inits.{name}.warm_start: a cycle of warm starts ({' -> '.join(chain + [current.init])})")
            chain.append(current.init)
            current = inits[current.init].warm_start
        seen.add(name)
    study = Study(path.resolve(), sf, root.resolve(), chosen_langs, inits,
                  FinetuneRecipe(adapt=sf.finetune.adapt, lr=sf.finetune.lr, max_tokens=sf.finetune.max_tokens,
                                 grad_clip=sf.finetune.grad_clip, epochs=sf.finetune.epochs,
                                 min_steps=sf.finetune.min_steps, max_steps=sf.finetune.max_steps, patience=0))
    if sf.equal_compute == "updates":
        want = study.total_updates(sf.reference)
        for name, init in inits.items():
            got = study.total_updates(name)
            if got != want:
                raise ConfigError(f"inits.{name}: {got} updates in all (warm start included) where the reference "
                                  f"{sf.reference} has {want}; equal_compute: updates asks for the same number")
            if init.episode_shape != inits[sf.reference].episode_shape:
                raise ConfigError(f"inits.{name}: episodes of another size than {sf.reference}'s (support/query "
                                  f"tokens or examples, meta_batch_size: {init.episode_shape} against "
                                  f"{inits[sf.reference].episode_shape}); equal_compute: updates compares updates "
                                  "of the same size")
    if any(math.isnan(x) for x in sf.finetune.search.epochs):
        raise ConfigError("finetune.search.epochs: not a number")
    return study


def describe(study: Study) -> dict[str, Any]:
    """The study's settings as JSON-able data (what a resumed study must match)."""
    sf = dataclasses.asdict(study.file)
    sf["data"] = {k: v for k, v in sf["data"].items() if k not in ("root", "langs")}
    sf.pop("jobs")  # how many processes run it changes nothing it computes
    sf.pop("convergence")  # nor does a check that only stops it
    sf["langs"] = study.langs
    sf["inits"] = {name: {"config": init.config.read_text(encoding="utf-8"), "set": init.overrides,
                          "warm_start": dataclasses.asdict(init.warm_start) if init.warm_start else None,
                          "inner": init.inner}
                   for name, init in study.inits.items()}
    return sf
