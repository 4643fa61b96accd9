"""sacreBLEU scoring of translations: corpus BLEU and chrF with their signatures, and per-segment scores.

Never a hand-written BLEU: everything goes through ``sacrebleu.metrics`` with its defaults (13a
tokenization, exponential smoothing for the corpus score; chrF with character 6-grams, beta 2),
and the signature says so, so numbers are comparable with any other sacreBLEU report::

    result = score(["The cat sat."], ["The cat sat down."], per_segment=True)
    result["bleu"], result["chrf"], result["bleu_signature"]   # 'nrefs:1|case:mixed|eff:no|tok:13a|...'
    result["segments"][0]["bleu"]                            # sentence BLEU (effective order)

Validation during meta-training and fine-tuning scores with it; ``metanmt score`` and ``evaluate``
use it through :mod:`metanmt.evaluation.scoring`. 13a splits placeholders such as ``{0}`` into
three tokens, which inflates BLEU on short strings (docs/design.md, "sacreBLEU and placeholders").
"""

from __future__ import annotations

from typing import Any

from ...errors import DataError


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
