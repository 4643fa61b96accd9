"""Translate with a run's model (greedy or beam search through ``generate``) and evaluate on a test set.

    loaded = open_translation_model("runs/fi16k")
    hyps = translate_batch(loaded.family, loaded.model, ["Hyvää huomenta"], num_beams=4)
    translate_file("runs/fi16k", "src.txt", "hyp.txt", num_beams=4)     # metanmt translate
    report = evaluate_translation(loaded, "l10n/test/fi.tsv.gz", num_beams=4)   # metanmt evaluate
    report["bleu"], report["chrf"], report["nll"]

Decoding itself is :mod:`metanmt.tasks.translation.decoding` (``translate_batch``: sorted by
length, in blocks with a progress bar, detokenized by the SentencePiece decoder, empty source lines
give empty lines); this module reads and writes the files and scores the result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from ..adaptation.loading import LoadedModel, open_translation_model
from ..data.corpus import FORMATS, detect_format, read_pairs
from ..engine.checkpoint import atomic_write_text
from ..errors import DataError, UserError
from ..files import check_output_file, refuse_same_file
from ..tasks.translation.decoding import translate_batch
from .scoring import read_lines, score

log = logging.getLogger(__name__)


def read_sources(path: str | Path) -> list[str]:
    """Source segments: the ``src`` side of a corpus file (``.tsv[.gz]``, ``.jsonl``, ``.po``), else
    the lines of a plain UTF-8 text file."""
    try:
        fmt = detect_format(path)
    except DataError:
        fmt = "text"
    if fmt in FORMATS:
        return [p.src for p in read_pairs(path)]
    return read_lines(path)


def translate_file(run: str | Path | LoadedModel, input_path: str | Path, output_path: str | Path, num_beams: int = 4,
                   batch_size: int = 32, max_new_tokens: Optional[int] = None, lang: Optional[str] = None,
                   device: Any = "cpu") -> dict[str, Any]:
    """Translate every line of ``input_path`` into ``output_path`` (written atomically), one line each;
    ``lang`` is the source language (corpus id) where the checkpoint needs one (mBART-50, M2M100, NLLB, T5)."""
    check_output_file(output_path, "--output")
    refuse_same_file(output_path, [("--input", input_path)], "--output")
    if not isinstance(run, LoadedModel):
        _refuse_model_file(output_path, run)
    sources = read_sources(input_path)  # before the model is loaded: an empty --input fails at once
    if not sources:
        raise DataError(f"--input {input_path}: no segments to translate (the file is empty)")
    for i, s in enumerate(sources, 1):
        if "\n" in s or "\r" in s:
            raise DataError(f"{input_path}: segment {i} contains a line break; one segment per line is written")
    loaded = run if isinstance(run, LoadedModel) else open_translation_model(run, device)
    started = time.perf_counter()
    with loaded.family.source_language(lang):
        hyps = translate_batch(loaded.family, loaded.model, sources, batch_size, num_beams, max_new_tokens)
    seconds = time.perf_counter() - started
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(h.replace("\n", " ") + "\n" for h in hyps))
    return {"input": str(input_path), "output": str(out), "segments": len(sources), "num_beams": num_beams, "seconds": seconds}


def evaluate_translation(run: str | Path | LoadedModel, test: str | Path, num_beams: int = 4, batch_size: int = 32,
                         max_new_tokens: Optional[int] = None, max_segments: Optional[int] = None,
                         hyp_out: str | Path | None = None, progress: bool = True, lang: Optional[str] = None) -> dict[str, Any]:
    """Translate a test corpus, score it with sacreBLEU, and measure its NLL (nats per target token).

    The NLL is teacher-forced cross-entropy of the references; at this scale it separates
    initializations better than BLEU (docs/design.md, "Why test NLL beside BLEU"), so it is reported beside it.
    """
    if hyp_out:
        check_output_file(hyp_out, "--hyp")
        refuse_same_file(hyp_out, [("--test", test)], "--hyp")
        if not isinstance(run, LoadedModel):
            _refuse_model_file(hyp_out, run)
    loaded = run if isinstance(run, LoadedModel) else open_translation_model(run)
    pairs = read_pairs(test)
    if max_segments:
        pairs = pairs[:max_segments]
    started = time.perf_counter()
    with loaded.family.source_language(lang):  # the source language, where the checkpoint needs one
        hyps = translate_batch(loaded.family, loaded.model, [p.src for p in pairs], batch_size, num_beams, max_new_tokens,
                               progress=progress, desc=f"translate {Path(test).name}")
        translate_seconds = time.perf_counter() - started
        nll = loaded.family.corpus_loss(loaded.model, pairs)
    scores = score(hyps, [p.en for p in pairs])
    if hyp_out:
        atomic_write_text(Path(hyp_out), "".join(h + "\n" for h in hyps))
    return {"test": str(test), "segments": len(pairs), "num_beams": num_beams, **scores, "nll": nll,
            "translate_seconds": translate_seconds, "model": loaded.source}


def _refuse_model_file(output: str | Path, model_dir: str | Path) -> None:
    """An output file must not replace a file of the model folder it is translated with."""
    folder = Path(model_dir)
    if folder.is_dir():
        refuse_same_file(output, [("a file of the model", p) for p in folder.iterdir() if p.is_file()], "the output")


def format_evaluation(result: dict[str, Any]) -> str:
    return (f"{result['test']}: {result['segments']} segments, beam {result['num_beams']}\n"
            f"BLEU = {result['bleu']:.2f} {result['bleu_signature']}\n"
            f"chrF2 = {result['chrf']:.2f} {result['chrf_signature']}\n"
            f"NLL = {result['nll']:.4f} nats/token")


def evaluate_command(run: Any, args: Any) -> tuple[dict, str]:
    """``metanmt evaluate`` of a translation run: translate ``--test``, score it, and its test NLL."""
    if not getattr(args, "test", None):
        raise UserError("evaluate: a translation run needs --test FILE (e.g. ../shared/data/l10n/test/fi.tsv.gz)")
    loaded = LoadedModel(run.family, run.model, str(args.model_dir or run.directory), run.cfg.to_dict())
    result = evaluate_translation(loaded, args.test, num_beams=args.beam, batch_size=args.batch_size, hyp_out=args.hyp,
                                  lang=getattr(args, "lang", None))
    return result, format_evaluation(result)


#: the ``metanmt evaluate`` options it reads: the command refuses the others (they would do nothing)
evaluate_command.options = ("test", "beam", "batch_size", "hyp", "lang")  # type: ignore[attr-defined]
