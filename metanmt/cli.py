"""Command line: ``metanmt meta-train | evaluate | plot-sinusoid | data | finetune | translate | score | compare | study``.

User errors (bad config, bad data, wrong paths) print one line and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from .argtypes import at_least, positive_float
from .errors import NonFiniteError, UserError

log = logging.getLogger("metanmt")


def _meta_train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.set)
    from . import registry

    registry.check(registry.TASK_FAMILIES, cfg.family)
    registry.check(registry.ALGORITHMS, cfg.algorithm.name)
    from .engine.trainer import MetaTrainer  # after the config is read: its error takes a second, not ten

    trainer = MetaTrainer(cfg, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        log.info("finished: %s", json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}))
    return 0


def evaluator_of(family: Any) -> Callable[[Any, argparse.Namespace], tuple[dict, str]]:
    """The family's ``metanmt evaluate`` function (:attr:`metanmt.tasks.TaskFamily.evaluator`)."""
    spec = type(family).evaluator  # read on the class: a plain function stays unbound
    if not isinstance(spec, str):
        return spec
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"evaluate: the {family.name} family's evaluator {spec!r} cannot be loaded ({exc})") from None


#: ``metanmt evaluate``'s options for some families only, None unless given
FAMILY_OPTIONS = {"shots": "--shots", "steps": "--steps", "episodes": "--episodes", "lr": "--lr",
                  "omniglot_runs": "--omniglot-runs", "test": "--test", "hyp": "--hyp", "lang": "--lang"}


def refuse_unread_options(family: Any, evaluator: Callable[..., Any], args: argparse.Namespace) -> None:
    """An option the family's evaluator never reads (``--hyp`` for a sinusoid run, ``--episodes``
    for a translation run) would do nothing: refused, naming what it reads. An evaluator without an
    ``options`` attribute (a plugin's) is given every option, unchecked."""
    reads = getattr(evaluator, "options", None)
    if reads is None:
        return
    unread = [flag for dest, flag in FAMILY_OPTIONS.items() if getattr(args, dest, None) is not None
              and dest not in reads]
    if unread:
        wanted = ", ".join("--" + d.replace("_", "-") for d in reads)
        raise UserError(f"evaluate: {', '.join(unread)} would do nothing for a {family.name} run (its evaluation reads "
                        f"{wanted}); drop {'it' if len(unread) == 1 else 'them'}")


def _evaluate(args: argparse.Namespace) -> int:
    from .engine.checkpoint import load_run_config

    load_run_config(args.run)  # a wrong path fails before the model's imports: in a second, not ten
    from .engine.run import load_run
    from .evaluation.commands import device_of

    device, precision = device_of(args)
    with precision:
        run = load_run(args.run, model_dir=args.model_dir, device=device, double_backward=False)
        evaluator = evaluator_of(run.family)
        refuse_unread_options(run.family, evaluator, args)
        result, text = evaluator(run, args)
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def _translation_commands() -> Any:
    """finetune / translate / score / compare live in their own module."""
    from .evaluation import commands

    return commands


def _plot_sinusoid(args: argparse.Namespace) -> int:
    from .engine.run import load_run
    from .evaluation.sinusoid import plot_sinusoid

    from .files import check_output_file, refuse_same_file

    check_output_file(args.out, "--out")
    refuse_same_file(args.out, [(f"a file of {r}", p) for r in args.runs if Path(r).is_dir() for p in Path(r).iterdir()], "--out")
    runs = [load_run(r) for r in args.runs]
    wrong = [str(r.directory) for r in runs if r.cfg.family != "sinusoid"]
    if wrong:
        raise UserError(f"plot-sinusoid: not sinusoid runs: {', '.join(wrong)}")
    print(plot_sinusoid(runs, Path(args.out), shots=args.shots))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metanmt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("meta-train", help="meta-train an initialization (or the multi-task baseline)")
    p.add_argument("config", help="run config, e.g. configs/sinusoid_maml.yaml")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace what --output-dir holds")
    p.set_defaults(func=_meta_train)

    p = sub.add_parser("evaluate", help="few-shot evaluation of a run")
    p.add_argument("run", type=Path)
    p.add_argument("--model-dir", type=Path, help="evaluate another saved model of the run, e.g. RUN/best")
    p.add_argument("--shots", type=at_least(1), nargs="+", help="sinusoid: K values (default 5 10 20)")
    p.add_argument("--steps", type=at_least(0), nargs="+", help="inner steps to report (default: the config's eval steps)")
    p.add_argument("--episodes", type=at_least(1), help="number of held-out episodes")
    p.add_argument("--lr", type=positive_float, help="inner learning rate at evaluation (default: the config's)")
    p.add_argument("--seed", type=at_least(0), default=1234, help="seed of the held-out episodes")
    p.add_argument("--omniglot-runs", type=Path, help="omniglot: Lake et al.'s 20 official runs (all_runs.zip or folder)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--test", type=Path, help="translation: test corpus to translate and score (TSV/JSONL)")
    p.add_argument("--beam", type=at_least(1), default=4, help="translation: beam size (1: greedy)")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="translation: segments per generate call")
    p.add_argument("--hyp", type=Path, help="translation: also write the hypotheses here")
    p.add_argument("--lang", help="translation: source language of --test (corpus id), for multilingual checkpoints")
    _translation_commands().add_device_flags(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("plot-sinusoid", help="the MAML paper's toy figure for one or more sinusoid runs")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shots", type=at_least(1), default=10)
    p.set_defaults(func=_plot_sinusoid)

    data = sub.add_parser("data", help="prepare data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("gettext", help=".po/.mo catalogs -> one TSV per language (lang, src, en, origin)")
    p.add_argument("src", type=Path, help="a folder of catalogs, e.g. path/to/locale/")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--keep-placeholders", action="store_true", help="do not rewrite %%(name)s, {x}, %%s as {0}, {1}, ...")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_data_gettext)
    p = data.add_parser("omniglot", help="download the official Omniglot zips (needs internet)")
    p.add_argument("--to", required=True, type=Path)
    p.add_argument("--names", nargs="+", help="which zips (default: all official ones)")
    p.set_defaults(func=_data_omniglot)
    _translation_commands().add_translation_commands(sub)

    p = sub.add_parser("study", help="a whole study from a study file: train the inits, choose on the dev language, "
                                     "run every cell, write the report (resumable)")
    p.add_argument("study", type=Path, help="a study file, e.g. studies/quick.yaml")
    p.add_argument("--out", required=True, type=Path, help="the study folder (resumes what it holds)")
    p.add_argument("--data-root", type=Path, help="the corpus (default: the study file's data.root)")
    p.add_argument("--langs", nargs="+", help="the new languages (default: the study file's data.langs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study key (repeatable)")
    p.add_argument("--jobs", type=at_least(1), help="processes at once (default: the study file's jobs)")
    p.add_argument("--report-only", action="store_true", help="the report of the finished cells; run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the tasks, their commands and the cells; run nothing")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds")
    p.add_argument("--task", help=argparse.SUPPRESS)  # one task, in a process the study started
    _translation_commands().add_device_flags(p)
    p.set_defaults(func=_study)
    return parser


def _study(args: argparse.Namespace) -> int:
    from .study.spec import load_study

    study = load_study(args.study, args.data_root, args.langs, args.set)
    from .evaluation.commands import device_of  # after the study file is read: its error takes a second, not ten
    from .study.runner import run_study, run_task

    device, precision = device_of(args)
    extra = [x for s in args.set for x in ("--set", s)] + (["--cpu"] if args.cpu else [])
    extra += ["--mixed-precision", args.mixed_precision] if args.mixed_precision != "no" else []
    with precision:
        if args.task:
            run_task(study, args.out, args.task, str(device))
            return 0
        result = run_study(study, args.out, jobs=args.jobs, overwrite=args.overwrite, report_only=args.report_only,
                           dry_run=args.dry_run, device=str(device), argv_extra=extra)
    if args.dry_run:
        print(json.dumps(result, indent=2))
    elif result["ran"]:
        print(f"study {study.name}: ran {', '.join(result['ran'])}; report in {result['report']}")
    else:
        print(f"study {study.name}: every task was already finished; report in {result['report']}")
    return 0


def _data_omniglot(args: argparse.Namespace) -> int:
    from .data.download import download_omniglot

    for path in download_omniglot(args.to, names=args.names):
        print(path)
    return 0


def _data_gettext(args: argparse.Namespace) -> int:
    from .data.gettext import convert_gettext

    print(convert_gettext(args.src, args.out, placeholders=not args.keep_placeholders, overwrite=args.overwrite))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .study.threads import follow_lent_threads

    follow_lent_threads()  # a study's task: take the cores the study lends it
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args)
    except (UserError, NonFiniteError) as exc:
        print(f"metanmt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder, a path that is a file: the user's to fix
        from .files import USER_ERRNOS, os_error_line

        if exc.errno not in USER_ERRNOS:
            raise
        print(f"metanmt {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
