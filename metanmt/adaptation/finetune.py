"""Fine-tune a translation initialization on a low-resource language, under a budget, resumably.

The adaptation step of MetaNMT (Gu et al. 2018): start from a meta-learned (or multi-task, or
random) initialization, train the chosen parameters on a few thousand English words of a new
language, and keep the checkpoint that scores best on a dev set::

    recipe = FinetuneRecipe(adapt="emb+enc", lr=3e-4, max_tokens=1000, epochs=20, max_steps=2000)
    result = finetune_run("runs/meta", train="l10n/finetune/fi.16k.tsv.gz", output_dir="runs/fi16k",
                          recipe=recipe, dev="l10n/dev/ro.tsv.gz")
    result["best_step"], result["dev"][-1]["bleu"], result["pairs"], result["updates"]

``metanmt finetune RUN --train FILE --output-dir OUT [--dev FILE] [--adapt emb+enc] ...`` is the
command-line form. ``OUT`` becomes a run folder of its own: the best model as a
``save_pretrained`` folder (``AutoModelForSeq2SeqLM`` / ``AutoTokenizer.from_pretrained(OUT)``
load it), the source run's ``metanmt.yaml`` (so ``metanmt translate`` and ``metanmt evaluate``
accept it), and ``finetune.json`` (the settings and, once finished, the result).

The number of updates scales with the budget (the rule, :meth:`FinetuneRecipe.updates_for`)::

    updates = min(max_steps, max(min_steps, ceil(epochs * batches_per_epoch)))

where ``batches_per_epoch`` is the number of ``max_tokens``-sized batches the budget's pairs make,
so 16K words get about four times the updates of 4K words at the same number of epochs, and the
cap bounds the largest budgets. Evaluation on the dev set happens before the first update (the
initialization itself is a candidate) and every ``eval_every`` updates (0 = automatically
``ceil(updates / 10)``, i.e. ten evaluations per fine-tune whatever the budget); training stops
early after ``patience`` evaluations without improvement. Without a dev set every update runs and
the last model is kept.

Resuming (``resume=True``) continues a killed fine-tune from ``OUT/checkpoints/last.pt``, which
holds the weights, Adam's moments, the torch RNG (dropout), the epoch and batch position in the
seeded data order, the best score and the evaluation history; the checkpoint is written at every
evaluation with a temporary name and an atomic rename. On CPU the resumed run ends with exactly the
weights of an uninterrupted one (tested). A finished fine-tune is not redone: resuming it returns
the recorded result.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import Columns, Pair, read_corpus
from ..engine import checkpoint as ckpt
from ..errors import ConfigError, DataError, UserError
from ..tasks.translation import IGNORE, plan_batches
from .recipe import ADAPT_PRESETS, FinetuneRecipe, adapt_patterns  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
RESUME_FILE = "last.pt"

def adapted_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Trainable parameter names matching ``patterns`` (frozen tables such as positions never match)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and any(fnmatch.fnmatchcase(n, q) for q in patterns)]
    if not names:
        some = ", ".join(n for n, _ in list(model.named_parameters())[:4])
        raise ConfigError(f"--adapt: patterns {patterns} match no trainable parameter (names look like: {some}, ...)")
    return names


# -- budgets ------------------------------------------------------------------------------------


def english_words(pairs: list[Pair]) -> int:
    """English whitespace words, the unit of the shared budgets (4k, 16k, 40k)."""
    return sum(len(p.en.split()) for p in pairs)


def take_budget(pairs: list[Pair], words: int, order: Literal["prefix", "sample"] = "prefix",
                seed: int = 0) -> tuple[list[Pair], dict[str, Any]]:
    """The first pairs (of the file, or of a seeded shuffle) until ``words`` English words are reached.

    The pair that reaches the budget is included, as in the shared ``{4k,16k,40k}`` files (4,013
    words for ro.4k). A budget larger than the pool warns and returns the whole pool, saying so in
    the returned info (``complete: False``).

        chosen, info = take_budget(pairs, 4000, order="sample", seed=1)
    """
    if words < 1:
        raise ConfigError(f"--budget-words: must be at least 1, got {words}")
    pool_words = english_words(pairs)
    info: dict[str, Any] = {"budget_words": words, "order": order, "seed": seed, "pool_pairs": len(pairs), "pool_words": pool_words}
    index = np.random.default_rng([seed, 7]).permutation(len(pairs)) if order == "sample" else np.arange(len(pairs))
    if pool_words < words:
        log.warning("budget of %d English words is larger than the pool (%d words in %d pairs): using the whole pool",
                    words, pool_words, len(pairs))
        return [pairs[i] for i in index], {**info, "pairs": len(pairs), "words": pool_words, "complete": False}
    chosen, total = [], 0
    for i in index:
        chosen.append(pairs[i])
        total += len(pairs[i].en.split())
        if total >= words:
            break
    return chosen, {**info, "pairs": len(chosen), "words": total, "complete": True}


def read_pairs(path: str | Path, lang: str | None = None) -> list[Pair]:
    """All pairs of a corpus file in any format :func:`~metanmt.data.corpus.read_corpus` reads
    (TSV/JSONL/gettext; one language expected, or ``lang`` chosen)."""
    path = Path(path)
    corpus = read_corpus(path, lang=lang or path.name.split(".")[0], columns=Columns(lang=None))
    langs = corpus.languages()
    if len(langs) != 1:
        raise DataError(f"{path}: expected pairs of one language, found {', '.join(langs) or 'none'}")
    return corpus[langs[0]]


def pairs_digest(pairs: list[Pair]) -> str:
    """A short hash of the pairs (a resumed fine-tune must see the same data)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.src.encode("utf-8") + b"\t" + p.en.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


# -- the recipe ---------------------------------------------------------------------------------


# -- batches ------------------------------------------------------------------------------------


def plan_epoch(target_lengths: list[int], max_tokens: int, rng: Optional[np.random.Generator]) -> list[list[int]]:
    """Index lists of one epoch: the batches of :meth:`TranslationFamily.token_batches` with the same
    generator (length-bucketed and shuffled; in file order without one), without re-tokenizing."""
    return plan_batches(target_lengths, max_tokens, rng)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch ``epoch``'s data order (a fresh one per epoch: resumable anywhere)."""
    return np.random.default_rng([seed, epoch])


def token_loss(family: Any, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy of a batch through the model's own forward."""
    logits = family._logits(model, None, batch)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)


def train_updates(family: Any, model: nn.Module, pairs: list[Pair], steps: int, lr: float, max_tokens: int,
                  adapt: list[str], seed: int = 0) -> nn.Module:
    """Adam on the parameters matching ``adapt`` for ``steps`` batches of seeded epochs over ``pairs``
    (in place); no evaluation, no checkpoints. :meth:`TranslationFamily.finetune` (validation during
    meta-training) is this function."""
    encoded = family.encode(pairs)
    names = set(adapted_names(model, adapt))
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if n in names], lr=lr)
    device = next(model.parameters()).device
    lengths = [len(t) for _, t in encoded]
    model.train()
    epoch, plan, position = 0, plan_epoch(lengths, max_tokens, epoch_rng(seed, 0)), 0
    for _ in range(steps):
        if position == len(plan):
            epoch, position = epoch + 1, 0
            plan = plan_epoch(lengths, max_tokens, epoch_rng(seed, epoch))
        batch = family.to_device(family.collate([encoded[i] for i in plan[position]]), device)
        position += 1
        loss = token_loss(family, model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


# -- loading an initialization --------------------------------------------------------------------


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
        run = load_run(run_dir, device=device, model_dir=None if run_dir == path else path)
        return LoadedModel(run.family, run.model, str(path.resolve()), cfg_dict, meta_training_state(run_dir))
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: neither a metanmt run ({ckpt.CONFIG_FILE}) nor a saved model (config.json)")
    cfg_dict = plain_run_config()
    family = TranslationFamily(cfg_dict["task"], cfg_dict["model"])
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
    model = family._prepare(model.to(next(like.model.parameters()).dtype))
    return LoadedModel(family, model.eval(), f"scratch(seed={seed}, like={like.source})", like.run_config, {})


# -- the fine-tuner -----------------------------------------------------------------------------


@dataclass
class FinetuneState:
    """What a resumed fine-tune continues from (with the weights, optimizer and RNG)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # next batch of the epoch's plan
    pairs_seen: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    best_score: Optional[list[float]] = None  # (primary metric, -loss) compared lexicographically
    best_step: int = -1
    bad_evals: int = 0
    dev: list[dict[str, float]] = field(default_factory=list)
    stopped: str = ""


class Finetuner:
    """One fine-tune of ``model`` on ``train_pairs`` into ``output_dir`` (see the module docstring).

        tuner = Finetuner(loaded.family, loaded.model, pairs, FinetuneRecipe(adapt="emb+enc"),
                          output_dir=Path("runs/fi4k"), dev_pairs=dev, run_config=loaded.run_config)
        result = tuner.run()          # tuner.model holds the best weights afterwards
    """

    def __init__(self, family: Any, model: nn.Module, train_pairs: list[Pair], recipe: FinetuneRecipe,
                 output_dir: Path, dev_pairs: Optional[list[Pair]] = None, run_config: Optional[dict[str, Any]] = None,
                 settings: Optional[dict[str, Any]] = None, device: str | torch.device = "cpu"):
        if not train_pairs:
            raise DataError("fine-tuning data: no pairs")
        self.family, self.model, self.recipe = family, model.to(device), recipe
        self.train_pairs = train_pairs
        self.dev_pairs = list(dev_pairs[: recipe.dev_segments]) if dev_pairs else []
        self.output_dir = Path(output_dir)
        self.run_config = run_config or plain_run_config()
        self.device = torch.device(device)
        self.encoded = family.encode(train_pairs)
        self.lengths = [len(t) for _, t in self.encoded]
        self.batches_per_epoch = len(plan_epoch(self.lengths, recipe.max_tokens, None))
        self.updates = recipe.updates_for(self.batches_per_epoch)
        self.names = adapted_names(model, adapt_patterns(recipe.adapt))
        chosen = set(self.names)
        # frozen parameters get no gradient at all: bit-identical afterwards, and cheaper backward passes
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
        self.optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if n in chosen], lr=recipe.lr)
        self.state = FinetuneState()
        self.settings = {
            **(settings or {}),
            "recipe": recipe.to_dict(),
            "train_pairs": len(train_pairs),
            "train_digest": pairs_digest(train_pairs),
            "dev_pairs": len(self.dev_pairs),
            "dev_digest": pairs_digest(self.dev_pairs),
        }
        # called with the update count after each update (compare's adaptation curve; tests)
        self.after_update: Optional[Callable[[int], None]] = None

    # -- output folder ---------------------------------------------------------------------------
    def _prepare_output(self, resume: bool, overwrite: bool) -> Optional[dict[str, Any]]:
        """Claim ``output_dir``; on ``resume`` return the finished result if there is one."""
        out, record = self.output_dir, self.output_dir / FINETUNE_FILE
        if ckpt.claim_directory(out, record, "fine-tune", resume, overwrite, foreign="a metanmt fine-tune"):
            saved = json.loads(record.read_text(encoding="utf-8"))
            details = ckpt.describe_changes(saved.get("settings", {}), json.loads(json.dumps(self.settings)), limit=4)
            if details:
                raise UserError(f"{out}: holds a different fine-tune ({details}); pass --overwrite to replace it")
            if saved.get("finished"):
                log.info("%s: fine-tune already finished; nothing to do", out)
                return dict(saved["result"])
        from ..config import RunConfig, dump_config, from_dict

        if not record.is_file():  # first: it is what marks the folder as this fine-tune's
            self._write_record(finished=False, result=None)
        ckpt.atomic_write_text(out / ckpt.CONFIG_FILE, dump_config(from_dict(RunConfig, self.run_config)))
        return None

    def _write_record(self, finished: bool, result: Optional[dict[str, Any]]) -> None:
        data = {"settings": self.settings, "finished": finished, "result": result}
        ckpt.atomic_write_text(self.output_dir / FINETUNE_FILE, json.dumps(data, indent=2, ensure_ascii=False))

    def _resume_path(self) -> Path:
        return self.output_dir / ckpt.CHECKPOINTS / RESUME_FILE

    def save_checkpoint(self) -> None:
        """Weights, optimizer, RNG and position, atomically (temporary name, then rename)."""
        path = self._resume_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "state": asdict(self.state)}, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self) -> bool:
        path = self._resume_path()
        if not path.is_file():
            return False
        data = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        torch.set_rng_state(data["torch_rng"])
        self.state = FinetuneState(**data["state"])
        log.info("resumed the fine-tune in %s at update %d", self.output_dir, self.state.step)
        return True

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate_dev(self) -> dict[str, float]:
        """Dev loss (nats/token) and, unless the metric is the loss, sacreBLEU BLEU and chrF."""
        from ..evaluation.scoring import score

        r = self.recipe
        # evaluation must not move the RNG that dropout draws from (exact resume)
        with torch.random.fork_rng(devices=[]):
            out = {"step": float(self.state.step), "loss": self.family.corpus_loss(self.model, self.dev_pairs, r.max_tokens * 2)}
            if r.dev_metric != "loss":
                from ..evaluation.translate import translate_batch

                hyps = translate_batch(self.family, self.model, [p.src for p in self.dev_pairs], num_beams=r.dev_beam,
                                       max_new_tokens=r.max_new_tokens, progress=False)
                scores = score(hyps, [p.en for p in self.dev_pairs])
                out["bleu"], out["chrf"] = scores["bleu"], scores["chrf"]
        self.model.train()
        return out

    def _key(self, scores: dict[str, float]) -> list[float]:
        # ties of a coarse metric (BLEU 0.0 at the start from scratch) are broken by the dev loss
        if self.recipe.dev_metric == "loss":
            return [-scores["loss"]]
        return [scores[self.recipe.dev_metric], -scores["loss"]]

    def _export_best(self) -> None:
        ckpt.export_files(self.output_dir, lambda d: self.family.save_model(self.model, d))

    def _maybe_evaluate(self) -> None:
        s, r = self.state, self.recipe
        if not self.dev_pairs:
            return
        scores = self.evaluate_dev()
        s.dev.append(scores)
        key = self._key(scores)
        if s.best_score is None or key > s.best_score:
            s.best_score, s.best_step, s.bad_evals = key, s.step, 0
            self._export_best()
        else:
            s.bad_evals += 1
            if r.patience and s.bad_evals >= r.patience:
                s.stopped = f"early stop at update {s.step}: {s.bad_evals} evaluations without improvement"
        log.info("update %d/%d: dev %s", s.step, self.updates, ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "step"))

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Fine-tune, evaluate, keep the best; returns the result (also in ``finetune.json``)."""
        from tqdm.auto import tqdm

        finished = self._prepare_output(resume, overwrite)
        if finished is not None:
            self.model = self.family.load_model(self.output_dir).to(self.device).eval()
            return finished
        r = self.recipe
        resumed = resume and self.load_checkpoint()
        s = self.state  # after loading: the checkpoint replaces the state object
        if not resumed:
            torch.manual_seed(r.seed)  # dropout of this fine-tune
        interval = r.eval_interval(self.updates)
        self.model.train()
        started = time.perf_counter() - s.seconds
        if not resumed:
            self._maybe_evaluate()  # the initialization itself is a candidate (update 0)
            s.seconds = time.perf_counter() - started
            self.save_checkpoint()
        bar = tqdm(total=self.updates, initial=s.step, desc="fine-tune", leave=False, mininterval=2.0,
                   disable=os.environ.get("METANMT_PROGRESS", "1") == "0")
        plan = plan_epoch(self.lengths, r.max_tokens, epoch_rng(r.seed, s.epoch))
        while s.step < self.updates and not s.stopped:
            if s.position >= len(plan):
                s.epoch, s.position = s.epoch + 1, 0
                plan = plan_epoch(self.lengths, r.max_tokens, epoch_rng(r.seed, s.epoch))
            rows = [self.encoded[i] for i in plan[s.position]]
            s.position += 1
            batch = self.family.to_device(self.family.collate(rows), self.device)
            loss = token_loss(self.family, self.model, batch)
            if not torch.isfinite(loss):
                raise UserError(f"fine-tune {self.output_dir}: non-finite loss at update {s.step + 1}; lower --lr "
                                f"(the best model so far is in {self.output_dir}, best update {s.best_step})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if r.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], r.grad_clip)
            self.optimizer.step()
            s.step += 1
            s.pairs_seen += len(rows)
            s.tokens_seen += sum(len(t) for _, t in rows)
            bar.update(1)
            if s.step % interval == 0 or s.step == self.updates:
                self._maybe_evaluate()
                s.seconds = time.perf_counter() - started
                self.save_checkpoint()
            if self.after_update is not None:
                self.after_update(s.step)
        bar.close()
        if not self.dev_pairs:
            s.best_step = s.step
            self._export_best()
        elif s.best_step != s.step:
            # the model in memory is the last one; hand back the best (exported when it was found)
            self.model = self.family.load_model(self.output_dir).to(self.device)
        self.model.eval()
        s.seconds = time.perf_counter() - started
        result = self.result()
        self._write_record(finished=True, result=result)
        # the resume state (weights + Adam moments) is no longer needed once the result is recorded
        shutil.rmtree(self.output_dir / ckpt.CHECKPOINTS, ignore_errors=True)
        return result

    def result(self) -> dict[str, Any]:
        s = self.state
        best = next((d for d in s.dev if int(d["step"]) == s.best_step), {})
        return {
            "pairs": len(self.train_pairs),
            "words": english_words(self.train_pairs),
            "train_tokens": sum(self.lengths),
            "batches_per_epoch": self.batches_per_epoch,
            "planned_updates": self.updates,
            "updates": s.step,
            "epochs": s.step / max(1, self.batches_per_epoch),
            "pairs_seen": s.pairs_seen,
            "tokens_seen": s.tokens_seen,
            "seconds": s.seconds,
            "best_step": s.best_step,
            "best_dev": {k: v for k, v in best.items() if k != "step"},
            "dev": s.dev,
            "stopped": s.stopped or "all planned updates",
            "adapted_parameters": len(self.names),
            "adapted_elements": int(sum(p.numel() for n, p in self.model.named_parameters() if n in set(self.names))),
        }


def finetune_run(source: str | Path | LoadedModel, train: str | Path, output_dir: str | Path, recipe: FinetuneRecipe,
                 dev: str | Path | None = None, budget_words: Optional[int] = None,
                 budget_order: Literal["prefix", "sample"] = "prefix", resume: bool = False, overwrite: bool = False,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """Fine-tune ``source`` (a run folder, a saved model, or a :class:`LoadedModel`) on ``train``.

    ``budget_words`` keeps a reproducible prefix (or, ``budget_order="sample"``, a sample seeded by
    ``recipe.seed``) of ``train`` by English words. Returns the result dict, also written to
    ``output_dir/finetune.json``, with ``budget`` (what was taken from the file) added.
    """
    loaded = source if isinstance(source, LoadedModel) else open_translation_model(source, device)
    pairs = read_pairs(train)
    budget: dict[str, Any] = {"pairs": len(pairs), "words": english_words(pairs), "complete": True}
    if budget_words is not None:
        pairs, budget = take_budget(pairs, budget_words, budget_order, recipe.seed)
    dev_pairs = read_pairs(dev) if dev else None
    settings = {"source": loaded.source, "train": str(Path(train).resolve()), "dev": str(Path(dev).resolve()) if dev else None,
                "budget_words": budget_words, "budget_order": budget_order}
    tuner = Finetuner(loaded.family, loaded.model, pairs, recipe, Path(output_dir), dev_pairs, loaded.run_config, settings, device)
    result = tuner.run(resume=resume, overwrite=overwrite)
    return {**result, "budget": budget}
