"""The translation commands of the CLI: ``finetune``, ``translate``, ``score``, ``compare``
(the translation family's ``metanmt evaluate`` is :func:`metanmt.evaluation.translate.evaluate_command`).

    metanmt finetune runs/meta --train l10n/finetune/fi.16k.tsv.gz --dev l10n/dev/ro.tsv.gz \\
        --adapt emb+enc --output-dir runs/fi16k
    metanmt translate runs/fi16k --input src.txt --output hyp.txt --beam 4
    metanmt score --hyp hyp.txt --ref ref.txt [--per-segment] [--json]
    metanmt evaluate runs/fi16k --test l10n/test/fi.tsv.gz [--beam 4] [--json]
    metanmt compare --init meta=runs/meta --init multi=runs/multi --data-root l10n \\
        --langs lv fi tr ko --budgets 0 4k 16k 40k --seeds 3 --out report/

Building the parser imports nothing heavy (the recipe's defaults come from a torch-free module).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, ContextManager

from ..adaptation.recipe import FinetuneRecipe
from ..argtypes import at_least, non_negative_float, positive_float

log = logging.getLogger("metanmt")


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """The fine-tuning recipe (:class:`FinetuneRecipe`), identical for every init in ``compare``."""
    d = FinetuneRecipe()
    g = p.add_argument_group("fine-tuning recipe")
    g.add_argument("--adapt", default=d.adapt, help="all | emb+enc (MetaNMT) | emb | lang (the language table) | fast (the official MetaNMT "
                   "inner loop) | comma-separated fnmatch patterns and @roles (@embeddings, @encoder, @decoder, @lm_head)")
    g.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate (default %(default)s)")
    g.add_argument("--max-tokens", type=at_least(1), default=d.max_tokens, help="target tokens per batch (default %(default)s)")
    g.add_argument("--epochs", type=positive_float, default=d.epochs,
                   help="updates = ceil(epochs x batches per epoch), clamped to [--min-steps, --max-steps] (default %(default)s)")
    g.add_argument("--min-steps", type=at_least(0), default=d.min_steps)
    g.add_argument("--max-steps", type=at_least(1), default=d.max_steps)
    g.add_argument("--grad-clip", type=non_negative_float, default=d.grad_clip, help="gradient norm clip, 0 = none (default %(default)s)")
    g.add_argument("--eval-every", type=at_least(0), default=d.eval_every, help="updates between dev evaluations, 0 = updates/10")
    g.add_argument("--patience", type=at_least(0), default=d.patience, help="evaluations without improvement before stopping, 0 = never")
    g.add_argument("--dev-metric", choices=["bleu", "chrf", "loss"], default=d.dev_metric)
    g.add_argument("--dev-segments", type=at_least(1), default=d.dev_segments, help="first N dev pairs are scored")
    g.add_argument("--dev-beam", type=at_least(1), default=d.dev_beam, help="beam on the dev set (1 = greedy)")


def add_lang_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lang", help="source language (corpus id, e.g. pt): needed by multilingual checkpoints "
                                   "(mBART-50, M2M100, NLLB, T5), which take its code or a task prefix")


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """Where a command runs: the device Accelerate picks (CUDA, MPS, else the CPU), or the CPU."""
    g = p.add_argument_group("device")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even where Accelerate finds an accelerator")
    g.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                   help="bf16 autocast of forward passes and decoding; weights and optimizer stay float32 (default %(default)s)")


def device_of(args: argparse.Namespace) -> tuple[Any, ContextManager]:
    """``(device, autocast context)`` for ``--cpu`` / ``--mixed-precision``: the device of Accelerate's
    process state (``accelerate launch`` settings and ``ACCELERATE_USE_CPU`` apply), and bf16
    ``torch.autocast`` on it when asked."""
    import torch
    from accelerate import PartialState

    device = PartialState(cpu=bool(getattr(args, "cpu", False))).device
    if getattr(args, "mixed_precision", "no") == "bf16":
        return device, torch.autocast(device.type, dtype=torch.bfloat16)
    return device, contextlib.nullcontext()


def recipe_from_args(args: argparse.Namespace, seed: int = 0) -> FinetuneRecipe:
    return FinetuneRecipe(adapt=args.adapt, lr=args.lr, max_tokens=args.max_tokens, epochs=args.epochs,
                          min_steps=args.min_steps, max_steps=args.max_steps, grad_clip=args.grad_clip or None,
                          eval_every=args.eval_every, patience=args.patience, dev_metric=args.dev_metric,
                          dev_segments=args.dev_segments, dev_beam=args.dev_beam, seed=seed)


def _finetune(args: argparse.Namespace) -> int:
    from ..adaptation.finetune import finetune_run

    device, precision = device_of(args)
    with precision:
        result = finetune_run(args.run, args.train, args.output_dir, recipe_from_args(args, args.seed), dev=args.dev,
                              budget_words=args.budget_words, budget_order=args.budget_order, resume=args.resume,
                              overwrite=args.overwrite, lang=args.lang, device=device)
    print(json.dumps({k: v for k, v in result.items() if k != "dev"}, indent=2, ensure_ascii=False))
    return 0


def _translate(args: argparse.Namespace) -> int:
    from .translate import translate_file

    device, precision = device_of(args)
    with precision:
        result = translate_file(args.run, args.input, args.output, num_beams=args.beam, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, lang=args.lang, device=device)
    log.info("translated %d segments in %.1f s -> %s", result["segments"], result["seconds"], result["output"])
    return 0


def _score(args: argparse.Namespace) -> int:
    from .scoring import format_score, score_files

    result = score_files(args.hyp, args.ref, per_segment=args.per_segment)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(format_score(result))
    for i, seg in enumerate(result.get("segments", []), 1):
        print(f"{i}\tBLEU {seg['bleu']:.2f}\tchrF {seg['chrf']:.2f}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, parse_init

    device, precision = device_of(args)
    with precision:
        summary = compare(
            [parse_init(s) for s in args.init], args.data_root, args.langs, args.budgets, args.seeds, args.out,
            recipe_from_args(args), scratch=not args.no_scratch, scratch_seed=args.scratch_seed,
            scratch_seeds=args.scratch_seeds, dev=args.dev, report_only=args.report_only,
            test_pattern=args.test_pattern, finetune_pattern=args.finetune_pattern, num_beams=args.beam,
            max_test_segments=args.max_test_segments, keep_models=args.keep_models, overwrite=args.overwrite,
            curve=args.curve, curve_beam=args.curve_beam, curve_seeds=args.curve_seeds,
            curve_segments=args.curve_segments, reference=args.reference,
            paired_test=args.paired_test,
            paired_samples=args.paired_samples, device=str(device),
        )
    rows, planned = len(summary["rows"]), summary["planned"]
    if args.report_only:
        done = f"report of {rows} of the {planned} cells" + (f" ({planned - rows} not finished)" if rows < planned
                                                              else "")
    elif not summary["ran"]:  # a request that selects no cell is refused: these were all finished before
        done = f"all {planned} cells were already finished; report rewritten"
    else:
        done = f"{summary['ran']} cells run, {summary['skipped']} reused; report"
    print(f"{done} in {Path(args.out) / 'results.md'}")
    return 0


def add_translation_commands(sub: Any) -> None:
    """Register ``finetune``, ``translate``, ``score`` and ``compare`` on the CLI's subparsers."""
    p = sub.add_parser("finetune", help="fine-tune a translation run on a low-resource language (resumable)")
    p.add_argument("run", type=Path, help="a meta-train run, RUN/best, or any seq2seq save_pretrained folder")
    p.add_argument("--train", required=True, type=Path, help="fine-tuning corpus (TSV/JSONL/.po, .gz too)")
    p.add_argument("--dev", type=Path, help="dev corpus for early stopping (none: every planned update, last model)")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--budget-words", type=at_least(1), help="use only this many English words of --train")
    p.add_argument("--budget-order", choices=["prefix", "sample"], default="prefix", help="which pairs make the budget")
    p.add_argument("--seed", type=at_least(0), default=0, help="batch order, dropout and the budget sample")
    p.add_argument("--resume", action="store_true", help="continue a killed fine-tune in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace what --output-dir holds")
    add_lang_flag(p)
    add_recipe_flags(p)
    add_device_flags(p)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("translate", help="translate a file with a run's model (greedy or beam search)")
    p.add_argument("run", type=Path, help="a run folder, RUN/best, a fine-tune output, or a save_pretrained folder")
    p.add_argument("--input", required=True, type=Path, help="one source segment per line (or a TSV/JSONL corpus)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--beam", type=at_least(1), default=4, help="beam size, 1 = greedy (default %(default)s)")
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--max-new-tokens", type=at_least(1), help="default: the run's task.max_new_tokens")
    add_lang_flag(p)
    add_device_flags(p)
    p.set_defaults(func=_translate)

    p = sub.add_parser("score", help="sacreBLEU BLEU and chrF of a hypothesis file against a reference file")
    p.add_argument("--hyp", required=True, type=Path)
    p.add_argument("--ref", required=True, type=Path)
    p.add_argument("--per-segment", action="store_true", help="also sentence BLEU and chrF of every line")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_score)

    p = sub.add_parser("compare", help="inits x languages x budgets x seeds -> table and plot (resumable)")
    p.add_argument("--init", action="append", required=True, metavar="NAME=PATH",
                   help="repeatable; PATH a run folder or RUN/best; NAME=random adds a from-scratch row under NAME")
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--langs", nargs="+", required=True)
    p.add_argument("--budgets", nargs="+", default=["0", "4k", "16k", "40k"],
                   help="0 = zero-shot; others name files by --finetune-pattern (default %(default)s)")
    p.add_argument("--seeds", type=at_least(1), default=3, help="fine-tuning seeds 0..N-1 (default %(default)s)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dev", help="dev corpus for early stopping, relative to --data-root, may use {lang} "
                                 "(default: none, every planned update and the last model)")
    p.add_argument("--beam", type=at_least(1), default=4, help="beam size on the test sets (default %(default)s)")
    p.add_argument("--max-test-segments", type=at_least(1), help="score only the first N test segments")
    p.add_argument("--test-pattern", default="test/{lang}.tsv.gz")
    p.add_argument("--finetune-pattern", default="finetune/{lang}.{budget}.tsv.gz")
    p.add_argument("--no-scratch", action="store_true", help="no automatic from-scratch row")
    p.add_argument("--scratch-seeds", type=at_least(1), help="fine-tuning seeds of the from-scratch rows (default: --seeds)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished cells; run none")
    p.add_argument("--scratch-seed", type=at_least(0), default=0, help="initialization seed of the from-scratch row")
    p.add_argument("--keep-models", action="store_true", help="keep each cell's fine-tuned model in OUT/work/")
    p.add_argument("--overwrite", action="store_true", help="discard OUT's finished cells")
    p.add_argument("--curve", type=int, nargs="*", default=[0, 10, 30, 100], metavar="K",
                   help="adaptation curve: test NLL and chrF after K fine-tuning updates (fixed lr, no early "
                        "stopping); no values = no curve (default %(default)s)")
    p.add_argument("--curve-beam", type=int, default=1, help="beam of the curve's test decoding (default %(default)s)")
    p.add_argument("--curve-seeds", type=int, metavar="N",
                   help="the curve for the first N fine-tuning seeds of each cell only (default: every seed)")
    p.add_argument("--curve-segments", type=int, metavar="N",
                   help="the curve scores the first N test segments only (default: all; the cells score all)")
    p.add_argument("--reference", help="the init the others are tested against (default: multi if given, else the first)")
    p.add_argument("--paired-test", choices=["bs", "ar"], default="bs",
                   help="sacreBLEU's paired bootstrap (bs) or approximate randomization (ar) for BLEU/chrF")
    p.add_argument("--paired-samples", type=int, default=0,
                   help="resamples of the paired BLEU / chrF test (0: sacreBLEU's default, or enough that the "
                        "Holm-corrected p of the report's comparisons can reach 0.005)")
    add_recipe_flags(p)
    add_device_flags(p)
    p.set_defaults(func=_compare)
