"""Turn a tree of gettext catalogs (``.po``/``.mo``) into one TSV corpus file per language.

This is what ``metanmt data gettext path/to/locale/ --out corpus/`` runs::

    summary = convert_gettext("myapp/locale", "corpus/")
    summary.pairs           # {"ro": 812, "fi": 640}
    summary.files_written   # [Path("corpus/fi.tsv"), Path("corpus/ro.tsv")]

The output has the shared corpora's layout (``lang<TAB>src<TAB>en<TAB>origin``, no quoting), so it
can be named in a task suite like ``../shared/data/l10n``. Placeholders (``%(name)s``, ``%s``,
``{user}``, ``{0}``...) are rewritten as ``{0}``, ``{1}``... consistently on both sides, as in the
shared corpus: the vocabulary keeps ``{0}``..``{9}`` atomic, so the model learns to copy them.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .corpus import read_gettext, write_tsv

logger = logging.getLogger(__name__)

# printf-style (named and positional, not %%) and str.format-style placeholders
_PLACEHOLDER = re.compile(
    r"%\([^)\s]+\)[#0\- +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]"
    r"|%[#0\- +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]"
    r"|\{[A-Za-z0-9_.\[\]]*(?:![rsa])?(?::[^{}]*)?\}"
)
_POSITIONAL = re.compile(r"%[#0\- +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]|\{\}")


def _placeholder_keys(text: str) -> list[tuple[str, int, int, tuple[str, int]]]:
    """(literal, start, end, key) per placeholder; positional ones are keyed by their occurrence."""
    out = []
    seen: Counter = Counter()
    for match in _PLACEHOLDER.finditer(text):
        literal = match.group(0)
        if _POSITIONAL.fullmatch(literal):
            key = (literal, seen[literal])  # the k-th `%s` of one side matches the k-th `%s` of the other
            seen[literal] += 1
        else:
            key = (literal, 0)
        out.append((literal, match.start(), match.end(), key))
    return out


def normalize_placeholders(src: str, en: str) -> tuple[str, str]:
    """Rewrite placeholders as ``{0}``, ``{1}``... numbered by first appearance in the English side.

        normalize_placeholders("Salut %(name)s, ai %d mesaje", "Hi %(name)s, you have %d messages")
        # ('Salut {0}, ai {1} mesaje', 'Hi {0}, you have {1} messages')
    """
    numbers: dict[tuple[str, int], int] = {}
    for _, _, _, key in _placeholder_keys(en):
        numbers.setdefault(key, len(numbers))

    def rewrite(text: str) -> str:
        pieces, last = [], 0
        for _, start, end, key in _placeholder_keys(text):
            if key not in numbers:
                numbers[key] = len(numbers)  # only on the source side: still numbered consistently
            pieces += [text[last:start], "{%d}" % numbers[key]]
            last = end
        pieces.append(text[last:])
        return "".join(pieces)

    new_en = rewrite(en)
    return rewrite(src), new_en


@dataclass
class GettextSummary:
    """What :func:`convert_gettext` read and wrote."""

    catalogs: int = 0
    pairs: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    files_written: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        langs = ", ".join(f"{k}: {v}" for k, v in sorted(self.pairs.items()))
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.catalogs} catalogs -> {sum(self.pairs.values())} pairs in {len(self.pairs)} languages ({langs}); "
            f"skipped {sum(self.skipped.values())} ({skipped})"
        )


def find_catalogs(src_dir: Path) -> tuple[list[Path], int]:
    """Every ``.po`` under ``src_dir``, and every ``.mo`` that has no ``.po`` beside it (compiled twins
    hold the same entries, so reading both would duplicate them); also the number of twins left out."""
    pos = sorted(src_dir.rglob("*.po"))
    po_stems = {p.with_suffix("") for p in pos}
    mos = sorted(src_dir.rglob("*.mo"))
    lone_mos = [m for m in mos if m.with_suffix("") not in po_stems]
    return sorted(pos + lone_mos), len(mos) - len(lone_mos)


def convert_gettext(
    src_dir: str | Path, out_dir: str | Path, placeholders: bool = True, overwrite: bool = False
) -> GettextSummary:
    """Read every catalog under ``src_dir`` and write ``out_dir/<lang>.tsv`` for each language.

    The language of a catalog comes from its path (``<lang>/LC_MESSAGES/<domain>.po``), else its
    header, else its file name (``ro.po``); the ``origin`` column holds the catalog's path relative
    to ``src_dir``. Fuzzy, plural and untranslated entries are skipped and counted. Raises
    DataError when there is no catalog or no usable entry, and when an output file exists and
    ``overwrite`` is False.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise DataError(f"{src_dir}: no such directory")
    catalogs, twins = find_catalogs(src_dir)
    if not catalogs:
        raise DataError(f"{src_dir}: no gettext catalogs (*.po, *.mo) found")
    summary = GettextSummary(catalogs=len(catalogs))
    if twins:
        summary.skipped[".mo beside its .po"] += twins
    rows: dict[str, list[tuple[str, str, str, str]]] = {}
    for path in catalogs:
        try:
            corpus = read_gettext(path)
        except DataError as exc:
            if "empty corpus" not in str(exc):
                raise
            summary.skipped["catalog without usable entries"] += 1
            logger.warning("%s", exc)
            continue
        summary.skipped.update(corpus.skipped)
        origin = str(path.relative_to(src_dir))
        for lang, pairs in corpus.pairs.items():
            for pair in pairs:
                src, en = normalize_placeholders(pair.src, pair.en) if placeholders else (pair.src, pair.en)
                rows.setdefault(lang, []).append((lang, src, en, origin))
    if not rows:
        raise DataError(f"{src_dir}: empty corpus: no translated entries in {len(catalogs)} catalogs ({dict(summary.skipped)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for lang, lang_rows in sorted(rows.items()):
        target = out_dir / f"{lang}.tsv"
        if target.exists() and not overwrite:
            raise DataError(f"{target}: already exists (pass overwrite=True / --overwrite to replace it)")
        write_tsv(target, lang_rows)
        summary.pairs[lang] = len(lang_rows)
        summary.files_written.append(target)
    logger.info("%s", summary)
    return summary
