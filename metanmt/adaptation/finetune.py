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

The updates themselves are :class:`metanmt.tasks.translation.training.TrainingLoop`'s, the loop that
validation during meta-training runs too; this module adds the budget, the update-scaling rule,
dev evaluation, early stopping and checkpoints around it. Opening an initialization (a run, a saved
model, a from-scratch copy) is :mod:`metanmt.adaptation.loading`.

Resuming (``resume=True``) continues a killed fine-tune from ``OUT/checkpoints/last.pt``, which
holds the weights, Adam's moments, every torch RNG in use (CPU, and CUDA or MPS: dropout), the epoch and batch position in the
seeded data order, the best score and the evaluation history; the checkpoint is written at every
evaluation with a temporary name and an atomic rename. On CPU the resumed run ends with exactly the
weights of an uninterrupted one (tested). A finished fine-tune is not redone: resuming it returns
the recorded result.
"""

from __future__ import annotations

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
from torch import nn

from .. import files
from ..data.corpus import Pair, read_pairs
from ..engine import checkpoint as ckpt
from ..errors import ConfigError, DataError, UserError
from ..tasks.base import select_names
from ..tasks.language_embeddings import set_language
from ..tasks.translation.decoding import translate_batch
from ..tasks.translation.scoring import score
from ..tasks.translation.training import LoopPosition, TrainingLoop
from .loading import LoadedModel, open_translation_model, plain_run_config
from .recipe import FinetuneRecipe, adapt_patterns

log = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
RESUME_FILE = "last.pt"
PREVIOUS_FILE = "previous.pt"  # the checkpoint before last.pt, for a damaged last.pt

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


def pairs_digest(pairs: list[Pair]) -> str:
    """A short hash of the pairs (a resumed fine-tune must see the same data)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.src.encode("utf-8") + b"\t" + p.en.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


# -- the fine-tuner -----------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """Every RNG a fine-tune draws from (dropout): the CPU generator, and CUDA's (every device) or
    MPS's where one is in use, so that a resumed fine-tune continues exactly on the device it ran on."""
    states: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        states["mps_rng"] = torch.mps.get_rng_state()
    return states


def restore_rng_states(data: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` saved (generator states are CPU byte tensors, whatever
    ``map_location`` moved them to)."""
    torch.set_rng_state(data["torch_rng"].cpu())
    if "cuda_rng" in data and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in data["cuda_rng"]])
    if "mps_rng" in data and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(data["mps_rng"].cpu())



@dataclass
class FinetuneState(LoopPosition):
    """What a resumed fine-tune continues from (with the weights, optimizer and RNG); ``epoch`` and
    ``position`` (the next batch of the epoch's plan) are the loop's place in its data order."""

    step: int = 0
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
                 settings: Optional[dict[str, Any]] = None, device: str | torch.device = "cpu", lang: Optional[str] = None):
        if not train_pairs:
            raise DataError("fine-tuning data: no pairs")
        if lang is not None:  # language embeddings: this language's table (a new language's starts at zero)
            set_language(model, lang, family)
        self.family, self.model, self.recipe = family, model.to(device), recipe
        self.train_pairs = train_pairs
        self.dev_pairs = list(dev_pairs[: recipe.dev_segments]) if dev_pairs else []
        self.output_dir = Path(output_dir)
        self.run_config = run_config or plain_run_config()
        self.device = torch.device(device)
        self.names = select_names(model, adapt_patterns(recipe.adapt), key="--adapt")
        chosen = set(self.names)
        # frozen parameters get no gradient at all: bit-identical afterwards, and cheaper backward passes
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
        self.loop = TrainingLoop(family, self.model, train_pairs, self.names, recipe.lr, recipe.max_tokens, recipe.seed,
                                 grad_clip=recipe.grad_clip, device=self.device)
        self.optimizer = self.loop.optimizer
        self.lengths = self.loop.lengths
        self.batches_per_epoch = self.loop.batches_per_epoch
        self.updates = recipe.updates_for(self.batches_per_epoch)
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
        try:
            with files.library_write(tmp):  # torch.save's RuntimeError on a full disk: the OSError it is
                torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                            **rng_states(), "state": asdict(self.state)}, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written .tmp-last.pt
            raise
        if path.is_file():  # the previous one stays as the fallback of a damaged last.pt
            os.replace(path, path.with_name(PREVIOUS_FILE))
        os.replace(tmp, path)
        ckpt.confirm_replacement(self.output_dir)  # --overwrite: the previous fine-tune is deleted only now

    def load_checkpoint(self) -> bool:
        """Continue from ``last.pt``, or from the one before it when ``last.pt`` is damaged (named in
        the log); False when there is none to continue from (the fine-tune then starts over, which
        ends with the same weights: it is deterministic)."""
        for path in (self._resume_path(), self._resume_path().with_name(PREVIOUS_FILE)):
            if not path.is_file():
                continue
            try:
                data = torch.load(path, map_location=self.device, weights_only=False)
                missing = {"model", "optimizer", "torch_rng", "state"} - set(data)
                if missing:
                    raise KeyError(f"no {', '.join(sorted(missing))}")
            except Exception as exc:  # truncated zip, missing keys, ...: the file cannot be resumed from
                log.warning("--resume: skipping the damaged fine-tune checkpoint %s (%s: %s)", path,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                continue
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])
            restore_rng_states(data)
            self.state = FinetuneState(**data["state"])
            log.info("resumed the fine-tune in %s at update %d from %s", self.output_dir, self.state.step, path.name)
            return True
        return False

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate_dev(self) -> dict[str, float]:
        """Dev loss (nats/token) and, unless the metric is the loss, sacreBLEU BLEU and chrF."""
        r = self.recipe
        # evaluation must not move the RNG that dropout draws from (exact resume)
        with torch.random.fork_rng(devices=[]):
            out = {"step": float(self.state.step), "loss": self.family.corpus_loss(self.model, self.dev_pairs)}
            if r.dev_metric != "loss":
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
        """Fine-tune, evaluate, keep the best; returns the result (also in ``finetune.json``).

        With ``overwrite``, the previous contents of the folder are set aside, deleted at the first
        checkpoint and put back whole if this fine-tune stops before it (any exception, Ctrl-C included)."""
        try:
            return self._run(resume, overwrite)
        except BaseException:
            ckpt.restore_replaced(self.output_dir)  # a no-op unless it replaces one and has no checkpoint yet
            raise

    def _run(self, resume: bool, overwrite: bool) -> dict[str, Any]:
        from tqdm.auto import tqdm

        finished = self._prepare_output(resume, overwrite)
        if finished is not None:
            self.model = self.family.load_model(self.output_dir).to(self.device).eval()
            ckpt.release_directory(self.output_dir)
            return finished
        r = self.recipe
        resumed = resume and self.load_checkpoint()
        if resume and not resumed and self._resume_path().parent.is_dir():
            log.warning("--resume: no usable checkpoint in %s; the fine-tune starts over", self.output_dir)
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
        while s.step < self.updates and not s.stopped:
            _, rows = self.loop.update(s, nonfinite=lambda: UserError(
                f"fine-tune {self.output_dir}: non-finite loss at update {s.step + 1}; lower --lr "
                f"(the best model so far is in {self.output_dir}, best update {s.best_step})"))
            s.step += 1
            s.pairs_seen += len(rows)
            s.tokens_seen += sum(len(t) for _, t in rows)
            bar.update(1)
            if s.step % interval == 0 or s.step == self.updates:
                self._maybe_evaluate()
                s.seconds = time.perf_counter() - started
                self.save_checkpoint()
            if self.after_update is not None:
                hooked = time.perf_counter()
                self.after_update(s.step)
                started += time.perf_counter() - hooked  # the hook's time (a curve's scoring) is not the fine-tune's
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
        ckpt.release_directory(self.output_dir)
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
                 device: str | torch.device = "cpu", lang: Optional[str] = None) -> dict[str, Any]:
    """Fine-tune ``source`` (a run folder, a saved model, or a :class:`LoadedModel`) on ``train``.

    ``budget_words`` keeps a reproducible prefix (or, ``budget_order="sample"``, a sample seeded by
    ``recipe.seed``) of ``train`` by English words. Returns the result dict, also written to
    ``output_dir/finetune.json``, with ``budget`` (what was taken from the file) added. ``lang`` (default:
    the file name up to the first dot, as :func:`read_pairs` reads it) is the source language of
    ``train`` and ``dev``: it picks the language table when the model has language embeddings, and
    the code or T5 prefix a multilingual checkpoint needs.
    """
    from ..files import refuse_overlap

    if budget_order != "prefix" and budget_words is None:  # a sample of nothing: every pair would be used
        raise UserError(f"--budget-order {budget_order}: picks the pairs of a --budget-words budget; give "
                        "--budget-words N (without it every pair of --train is used)")
    init = None if isinstance(source, LoadedModel) else ckpt.run_folder_of(source)  # RUN/best: the run RUN
    refuse_overlap(output_dir, [("--train", train), ("--dev", dev), ("the initialization", init)], "--output-dir")
    # the data first: an empty or broken --train / --dev fails before the model is loaded
    pairs = read_pairs(train)
    dev_pairs = read_pairs(dev) if dev else None
    budget: dict[str, Any] = {"pairs": len(pairs), "words": english_words(pairs), "complete": True}
    if budget_words is not None:
        pairs, budget = take_budget(pairs, budget_words, budget_order, recipe.seed)
    loaded = source if isinstance(source, LoadedModel) else open_translation_model(source, device)
    settings = {"source": loaded.source, "train": str(Path(train).resolve()), "dev": str(Path(dev).resolve()) if dev else None,
                "budget_words": budget_words, "budget_order": budget_order}
    lang = lang or Path(train).name.split(".")[0]
    with loaded.family.source_language(lang):  # the source language, where the checkpoint needs one
        tuner = Finetuner(loaded.family, loaded.model, pairs, recipe, Path(output_dir), dev_pairs, loaded.run_config, settings,
                          device, lang=lang)
        result = tuner.run(resume=resume, overwrite=overwrite)
    return {**result, "budget": budget}
