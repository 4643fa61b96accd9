"""Turn a tree of gettext catalogs (``.po``/``.mo``) into one TSV corpus file per language.

This is what ``metanmt data gettext path/to/locale/ --out corpus/`` runs::

    summary = convert_gettext("myapp/locale", "corpus/")
    summary.pairs           # {"ro": 812, "fi": 640}
    summary.files_written   # [Path("corpus/fi.tsv"), Path("corpus/ro.tsv")]

The output has the shared corpora's layout (``lang<TAB>src<TAB>en<TAB>origin``, no quoting), so it
can be named in a task suite like ``../shared/data/l10n``. Placeholders (``%(name)s``, ``%s``,
``%1$s``, ``{user}``, ``{0}``...) are rewritten as ``{0}``, ``{1}``... consistently on both sides, as
in the shared corpus: the vocabulary keeps ``{0}``..``{9}`` atomic, so the model learns to copy them.
``%`` conversions follow Python/C printf syntax and are rewritten only in pairs whose every ``%`` is
one (``50% off`` is text and stays; see :func:`normalize_placeholders`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..files import check_output_dir, is_inside
from .corpus import read_gettext, write_tsv

logger = logging.getLogger(__name__)

# A printf conversion as Python's % operator and C's printf spell it:
#   %[(name) | n$][flags][width][.precision][length]conversion      (%% is a literal percent sign)
# The space flag and C's ' flag are left out on purpose: in ordinary text "50% off" and "50% done"
# would read as "% o" and "% d" conversions, and no catalog of ours uses them.
_PRINTF = re.compile(
    r"%(?:\((?P<name>[^()]*)\)|(?P<pos>[1-9]\d*)\$)?(?P<flags>[-+#0]*)(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d*))?"
    r"(?P<length>hh|h|ll|l|j|z|t|L|q)?(?P<conv>[diouxXeEfFgGaAcsrpn%])"
)
# str.format-style placeholders: {}, {0}, {name}, {user.name!r:>10}
_BRACE = re.compile(r"\{[A-Za-z0-9_.\[\]]*(?:![rsa])?(?::[^{}]*)?\}")


def _printf_conversions(text: str) -> list[re.Match] | None:
    """Every ``%`` of ``text`` read as a printf conversion (``%%`` included), or None when some
    ``%`` starts none: then the text is not a printf format string and its ``%`` signs are text."""
    found, pos = [], text.find("%")
    while pos != -1:
        match = _PRINTF.match(text, pos)
        if match is None:
            return None
        found.append(match)
        pos = text.find("%", match.end())
    return found


def _placeholder_keys(text: str, printf: bool) -> list[tuple[str, int, int, tuple[str, int] | None]]:
    """(literal, start, end, key) per placeholder, by position; ``%%`` has key None (a literal %).

    Named (``%(user)s``) and numbered (``%1$s``, ``{0}``) placeholders are keyed by name/number;
    unnumbered ones (``%s``, ``{}``) by occurrence: the k-th ``%s`` of one side is the k-th of the other.
    """
    spans: list[tuple[str, int, int, tuple[str, int] | None]] = []
    seen: Counter = Counter()
    matches: list[re.Match] = list(_BRACE.finditer(text))
    if printf:
        matches += _printf_conversions(text) or []
    for match in sorted(matches, key=lambda m: m.start()):
        literal = match.group(0)
        if literal.startswith("%") and match.group("conv") == "%":
            spans.append((literal, match.start(), match.end(), None))
            continue
        if literal.startswith("%") and (match.group("name") is not None or match.group("pos")):
            key: tuple[str, int] = (match.group("name") if match.group("name") is not None else "$" + match.group("pos"), 0)
        elif literal in ("{}",) or (literal.startswith("%")):
            key = (literal, seen[literal])
            seen[literal] += 1
        else:
            key = (literal, 0)
        spans.append((literal, match.start(), match.end(), key))
    return spans


def is_printf_pair(src: str, en: str) -> bool:
    """Both sides read as printf format strings (every ``%`` a conversion) and one has a real one.

    Catalog flags (``#, python-format``) are not used: babel adds ``python-format`` itself to any
    message its own looser pattern matches ("50% off" included), so the flag cannot be trusted."""
    sides = [_printf_conversions(src), _printf_conversions(en)]
    return all(side is not None for side in sides) and any(m.group("conv") != "%" for side in sides for m in side or [])


def normalize_placeholders(src: str, en: str) -> tuple[str, str]:
    """Rewrite placeholders as ``{0}``, ``{1}``... numbered by first appearance in the English side.

        normalize_placeholders("Salut %(name)s, ai %d mesaje", "Hi %(name)s, you have %d messages")
        # ('Salut {0}, ai {1} mesaje', 'Hi {0}, you have {1} messages')
        normalize_placeholders("Reducere 50%", "50% off")      # unchanged: not a format string
        normalize_placeholders("%d%% gata", "%d%% done")       # ('{0}% gata', '{0}% done')

    printf conversions are rewritten only when both sides are printf format strings
    (:func:`is_printf_pair`); then ``%%`` becomes the ``%`` a user sees. ``{...}`` placeholders are
    always rewritten.
    """
    printf = is_printf_pair(src, en)
    numbers: dict[tuple[str, int], int] = {}
    for _, _, _, key in _placeholder_keys(en, printf):
        if key is not None:
            numbers.setdefault(key, len(numbers))

    def rewrite(text: str) -> str:
        pieces, last = [], 0
        for _, start, end, key in _placeholder_keys(text, printf):
            if key is None:
                pieces += [text[last:start], "%"]
            else:
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
    check_output_dir(out_dir, "--out")
    if is_inside(out_dir, src_dir):
        raise DataError(f"--out {out_dir}: lies inside the catalogs' folder {src_dir}; write the corpus elsewhere")
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
    targets = {lang: out_dir / f"{lang}.tsv" for lang in rows}
    for target in targets.values():  # every refusal before the first file is written
        if target.is_dir():
            raise DataError(f"{target}: is a folder; expected to write a file there")
        if target.exists() and not overwrite:
            raise DataError(f"{target}: already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for lang, lang_rows in sorted(rows.items()):
        target = targets[lang]
        tmp = target.with_name(f".tmp-{target.name}")
        try:  # a temporary name, then a rename: a full disk leaves neither a half file nor a .tmp-*
            write_tsv(tmp, lang_rows)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        summary.pairs[lang] = len(lang_rows)
        summary.files_written.append(target)
    logger.info("%s", summary)
    return summary
