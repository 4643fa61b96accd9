"""Scoring files: ``metanmt score --hyp hyp.txt --ref ref.txt [--per-segment] [--json]``.

    result = score_files("hyp.txt", "ref.txt", per_segment=True)
    print(format_score(result))      # BLEU = 21.30 nrefs:1|case:mixed|eff:no|tok:13a|...

The scoring itself, sacreBLEU with its defaults, is :func:`metanmt.tasks.translation.scoring.score`
(validation needs it below this layer); it is imported here for the commands and callers of this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from ..tasks.translation.scoring import score

__all__ = ["format_score", "read_lines", "score", "score_files"]


def read_lines(path: str | Path, like_sacrebleu: bool = False) -> list[str]:
    """Lines of a UTF-8 text file (``\\n`` separated; a final newline does not add an empty line;
    empty lines are kept: an empty hypothesis is a valid, if poor, translation).

    ``like_sacrebleu``: read exactly as the ``sacrebleu`` command line does, so that ``metanmt
    score`` gives its numbers on any file it accepts: every line loses its trailing whitespace
    (``str.rstrip``: spaces, tabs, ``\\r``, no-break spaces, U+2028...) and a byte-order mark is
    kept as a character of the first line. Otherwise a BOM and a ``\\r`` before ``\\n`` are removed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    if path.suffix == ".gz":
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; re-encode the file as UTF-8") from None
    if text.startswith("\ufeff") and not like_sacrebleu:
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if like_sacrebleu:
        return [line.rstrip() for line in lines]
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def score_files(hyp: str | Path, ref: str | Path, per_segment: bool = False) -> dict[str, Any]:
    """:func:`score` of two line-aligned text files; a line-count mismatch names both files."""
    hypotheses, references = read_lines(hyp, like_sacrebleu=True), read_lines(ref, like_sacrebleu=True)
    if not hypotheses and not references:
        raise DataError(f"--hyp {hyp} and --ref {ref}: both files are empty; nothing to score")
    if len(hypotheses) != len(references):
        raise DataError(f"line counts differ: {hyp} has {len(hypotheses)} lines, {ref} has {len(references)}")
    return {"hyp": str(hyp), "ref": str(ref), **score(hypotheses, references, per_segment)}


def format_score(result: dict[str, Any]) -> str:
    """Two lines in sacreBLEU's own style, e.g. ``BLEU = 21.30 nrefs:1|...``."""
    return (f"BLEU = {result['bleu']:.2f} {result['bleu_signature']}\n"
            f"chrF2 = {result['chrf']:.2f} {result['chrf_signature']}")
