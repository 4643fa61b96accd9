"""sacreBLEU scoring: corpus BLEU and chrF with their signatures, and per-segment scores.

Never a hand-written BLEU: everything goes through ``sacrebleu.metrics`` with its defaults (13a
tokenization, exponential smoothing for the corpus score; chrF with character 6-grams, beta 2),
and the signature says so, so numbers are comparable with any other sacreBLEU report::

    result = score(["The cat sat."], ["The cat sat down."], per_segment=True)
    result["bleu"], result["chrf"], result["bleu_signature"]   # 'nrefs:1|case:mixed|eff:no|tok:13a|...'
    result["segments"][0]["bleu"]                            # sentence BLEU (effective order)

``metanmt score --hyp hyp.txt --ref ref.txt [--per-segment] [--json]`` is the command-line form.
Design note (design.md pitfall 8): 13a splits placeholders such as ``{0}`` into three tokens, which
inflates BLEU on short strings; the shared dev/test sets have none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError


def score(hypotheses: list[str], references: list[str], per_segment: bool = False) -> dict[str, Any]:
    """Corpus BLEU and chrF of ``hypotheses`` against one reference each (same length lists)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up line by line")
    if not references:
        raise DataError("nothing to score: no segments")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    out: dict[str, Any] = {
        "bleu": float(b.score),
        "chrf": float(c.score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_details": {"precisions": [float(p) for p in b.precisions], "bp": float(b.bp), "sys_len": int(b.sys_len),
                         "ref_len": int(b.ref_len)},
        "segments_scored": len(hypotheses),
    }
    if per_segment:
        # sentence BLEU needs effective order, else any segment without a 4-gram match scores 0
        sentence_bleu = BLEU(effective_order=True)
        out["segments"] = [
            {"bleu": float(sentence_bleu.sentence_score(h, [r]).score), "chrf": float(chrf.sentence_score(h, [r]).score)}
            for h, r in zip(hypotheses, references)
        ]
        out["segment_bleu_signature"] = str(sentence_bleu.get_signature())
    return out


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
    if len(hypotheses) != len(references):
        raise DataError(f"line counts differ: {hyp} has {len(hypotheses)} lines, {ref} has {len(references)}")
    return {"hyp": str(hyp), "ref": str(ref), **score(hypotheses, references, per_segment)}


def format_score(result: dict[str, Any]) -> str:
    """Two lines in sacreBLEU's own style, e.g. ``BLEU = 21.30 nrefs:1|...``."""
    return (f"BLEU = {result['bleu']:.2f} {result['bleu_signature']}\n"
            f"chrF2 = {result['chrf']:.2f} {result['chrf_signature']}")
