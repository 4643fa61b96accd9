"""Parallel corpus readers: X -> English sentence pairs, grouped by source language.

Every reader returns a :class:`Corpus` (a dict language -> list of :class:`Pair` plus a count of
everything it skipped, by reason) and raises :class:`~metanmt.errors.DataError` naming the file and
line for input it cannot read::

    corpus = read_corpus("meta_train/de.tsv.gz", lang="de")           # TSV with a header, .gz too
    corpus = read_corpus("corpus.jsonl")                                # rows grouped by their `lang`
    corpus = read_moses("train.ro", "train.en", lang="ro")              # line-aligned plain text
    corpus = read_gettext("locale/ro/LC_MESSAGES/django.po")            # msgid = English, msgstr = source
    corpus = read_hf_dataset("json", data_files="x.jsonl", lang="ro")   # through `datasets`, offline
    corpus["de"][0].src, corpus["de"][0].en

The line-based readers stream the raw bytes themselves instead of going through ``csv`` or
``datasets``: they must report the exact line of a bad row, decode UTF-8 strictly line by line,
and never apply quoting or NA parsing (the shared TSV corpora have neither; docs/design.md, "TSV quoting").
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Literal, NamedTuple, Optional

from ..errors import DataError

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
FORMATS = ("tsv", "jsonl", "moses", "gettext")


class Pair(NamedTuple):
    """One sentence pair: ``src`` in the task's language, ``en`` its English translation."""

    src: str
    en: str


@dataclass(frozen=True)
class Columns:
    """Names of the columns (TSV header fields or JSON keys) a reader takes.

    ``lang`` is only needed when one file holds several languages; set it to ``None`` to ignore it.
    """

    lang: Optional[str] = "lang"
    src: str = "src"
    en: str = "en"


@dataclass
class Corpus:
    """Sentence pairs by language, and the number of rows skipped for each reason."""

    pairs: dict[str, list[Pair]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    def __getitem__(self, lang: str) -> list[Pair]:
        return self.pairs[lang]

    def __contains__(self, lang: object) -> bool:
        return lang in self.pairs

    def __len__(self) -> int:
        """Total number of pairs over all languages."""
        return sum(len(p) for p in self.pairs.values())

    def languages(self) -> list[str]:
        return sorted(self.pairs)

    def add(self, lang: str, pair: Pair) -> None:
        self.pairs.setdefault(lang, []).append(pair)

    def update(self, other: "Corpus") -> "Corpus":
        """Append ``other``'s pairs and counts to this corpus (in place) and return it."""
        for lang, pairs in other.pairs.items():
            self.pairs.setdefault(lang, []).extend(pairs)
        self.skipped.update(other.skipped)
        self.files.extend(other.files)
        return self

    def require(self, languages: list[str], where: str) -> None:
        """Raise a DataError when a requested language has no pairs (``where`` names the source)."""
        missing = [lang for lang in languages if not self.pairs.get(lang)]
        if missing:
            have = ", ".join(f"{lang} ({len(p)})" for lang, p in sorted(self.pairs.items())) or "nothing"
            raise DataError(f"{where}: no data for language(s) {', '.join(missing)}; found: {have}")


# -- helpers ------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` for each line of ``path``, 1-based, without the line terminator.

    Splits on ``\\n`` only (``str.splitlines`` would also split on U+2028 and friends, which are
    legitimate characters inside a segment) and decodes each line strictly as UTF-8, so a bad byte
    is reported with its line.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as raw:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
        lineno = 0
        try:
            for lineno, data in enumerate(stream, start=1):
                if data.endswith(b"\n"):
                    data = data[:-1]
                if data.endswith(b"\r"):
                    data = data[:-1]
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path}:{lineno}: not valid UTF-8 (byte {data[exc.start:exc.start + 1]!r} at column "
                        f"{exc.start + 1}); re-encode the file as UTF-8"
                    ) from None
                if lineno == 1 and text.startswith("\ufeff"):
                    text = text[1:]  # a UTF-8 byte order mark is not part of the first field name
                yield lineno, text
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"{path}:{lineno + 1}: cannot read ({exc})") from None


def _check_sides(path: Path, lineno: int, src: str, en: str) -> Optional[str]:
    """The reason a pair is unusable, or None."""
    if not src.strip():
        return "empty source"
    if not en.strip():
        return "empty target (English)"
    return None


def _reject(corpus: Corpus, on_error: OnError, where: str, reason: str) -> None:
    """Raise for a bad row, or count it under ``reason`` when the caller asked to skip bad rows."""
    if on_error == "raise":
        raise DataError(f"{where}: {reason}")
    corpus.skipped[reason] += 1


def _finish(corpus: Corpus, path: Path, lang: Optional[str]) -> Corpus:
    """Log what was read and skipped; an input without a single usable pair is an error."""
    if not len(corpus):
        detail = f" (skipped: {dict(corpus.skipped)})" if corpus.skipped else ""
        raise DataError(f"{path}: empty corpus: no sentence pairs{' for ' + lang if lang else ''}{detail}")
    counts = ", ".join(f"{k}={len(v)}" for k, v in sorted(corpus.pairs.items()))
    logger.info("read %s: %d pairs (%s)", path, len(corpus), counts)
    if corpus.skipped:
        logger.warning("%s: skipped %d rows: %s", path, sum(corpus.skipped.values()), dict(corpus.skipped))
    return corpus


# -- TSV ----------------------------------------------------------------------------------------


def read_tsv(
    path: str | Path, lang: Optional[str] = None, columns: Columns = Columns(), on_error: OnError = "raise"
) -> Corpus:
    """Read a tab-separated file with a header row (``lang<TAB>src<TAB>en[<TAB>...]``), ``.gz`` too.

    No quoting and no NA parsing: a field is exactly the text between two tabs (``"`` and ``NA``
    are ordinary text). ``lang`` given: every row belongs to that language (a per-language file
    such as ``meta_train/pt.tsv.gz``, whose ``lang`` column may hold regional variants like
    ``pt-BR``). ``lang`` None: rows are grouped by the ``columns.lang`` column. Blank lines are
    skipped and counted; ``on_error="skip"`` counts bad rows instead of raising.

        read_tsv("dev/ro.tsv.gz", lang="ro")["ro"][:2]
    """
    path = Path(path)
    corpus = Corpus(files=[str(path)])
    lines = _lines(path)
    header_line = next(lines, None)
    if header_line is None:
        raise DataError(f"{path}: empty corpus: the file is empty (expected a header line such as lang<TAB>src<TAB>en)")
    header = header_line[1].split("\t")
    index = _column_index(path, header, columns, need_lang=lang is None)
    width = len(header)
    for lineno, text in lines:
        where = f"{path}:{lineno}"
        if not text.strip():
            corpus.skipped["blank line"] += 1
            continue
        fields = text.split("\t")
        if len(fields) != width:
            _reject(
                corpus,
                on_error,
                where,
                f"wrong column count: {len(fields)} fields, the header has {width} "
                f"({'tab inside a field?' if len(fields) > width else 'missing tab?'})",
            )
            continue
        src, en = fields[index["src"]], fields[index["en"]]
        reason = _check_sides(path, lineno, src, en)
        if reason:
            _reject(corpus, on_error, where, reason)
            continue
        row_lang = lang if lang is not None else fields[index["lang"]].strip()
        if not row_lang:
            _reject(corpus, on_error, where, f"empty language in column {columns.lang!r}")
            continue
        corpus.add(row_lang, Pair(src, en))
    return _finish(corpus, path, lang)


def _column_index(path: Path, header: list[str], columns: Columns, need_lang: bool) -> dict[str, int]:
    wanted = {"src": columns.src, "en": columns.en}
    if need_lang:
        if not columns.lang:
            raise DataError(f"{path}: no language given for this file and no language column configured")
        wanted["lang"] = columns.lang
    missing = [name for name in wanted.values() if name not in header]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(map(repr, missing))} in the header; "
            f"the header has {', '.join(map(repr, header))} (set the column names in the task config's `columns`)"
        )
    duplicated = [name for name in wanted.values() if header.count(name) > 1]
    if duplicated:
        raise DataError(f"{path}:1: column(s) {', '.join(map(repr, duplicated))} appear more than once in the header")
    return {key: header.index(name) for key, name in wanted.items()}


# -- JSON lines ---------------------------------------------------------------------------------


def read_jsonl(
    path: str | Path, lang: Optional[str] = None, columns: Columns = Columns(), on_error: OnError = "raise"
) -> Corpus:
    """Read one JSON object per line (``{"lang": "ro", "src": "...", "en": "..."}``), ``.gz`` too.

        read_jsonl("pairs.jsonl.gz", columns=Columns(lang="language", src="source", en="target"))
    """
    path = Path(path)
    corpus = Corpus(files=[str(path)])
    for lineno, text in _lines(path):
        where = f"{path}:{lineno}"
        if not text.strip():
            corpus.skipped["blank line"] += 1
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            _reject(corpus, on_error, where, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            _reject(corpus, on_error, where, f"expected a JSON object, got {type(row).__name__}")
            continue
        keys = [columns.src, columns.en] + ([columns.lang] if lang is None and columns.lang else [])
        if lang is None and not columns.lang:
            raise DataError(f"{path}: no language given for this file and no language column configured")
        missing = [k for k in keys if k not in row]
        if missing:
            # a wrong key name is a config problem, not one bad row: always raise
            raise DataError(
                f"{where}: missing key(s) {', '.join(map(repr, missing))}; the object has "
                f"{', '.join(map(repr, row)) or 'no keys'} (set the column names in the task config's `columns`)"
            )
        values = [row[k] for k in keys]
        bad = [k for k, v in zip(keys, values) if not isinstance(v, str)]
        if bad:
            _reject(corpus, on_error, where, f"key(s) {', '.join(map(repr, bad))} are not strings")
            continue
        src, en = row[columns.src], row[columns.en]
        reason = _check_sides(path, lineno, src, en)
        if reason:
            _reject(corpus, on_error, where, reason)
            continue
        row_lang = lang if lang is not None else row[columns.lang].strip()
        if not row_lang:
            _reject(corpus, on_error, where, f"empty language in key {columns.lang!r}")
            continue
        corpus.add(row_lang, Pair(src, en))
    return _finish(corpus, path, lang)


# -- Moses-style parallel text ------------------------------------------------------------------


def read_moses(src_path: str | Path, en_path: str | Path, lang: str, on_error: OnError = "raise") -> Corpus:
    """Read two line-aligned plain-text files (``train.ro`` + ``train.en``): line i translates line i.

        read_moses("wmt16/train.ro", "wmt16/train.en", lang="ro")
    """
    src_path, en_path = Path(src_path), Path(en_path)
    corpus = Corpus(files=[str(src_path), str(en_path)])
    src_lines, en_lines = _lines(src_path), _lines(en_path)
    lineno = 0
    while True:
        a, b = next(src_lines, None), next(en_lines, None)
        if a is None or b is None:
            if a is None and b is None:
                break
            # count the rest of the longer file so the message gives both line counts
            longer, rest = (src_path, src_lines) if b is None else (en_path, en_lines)
            total_longer = lineno + 1 + sum(1 for _ in rest)
            shorter = en_path if longer == src_path else src_path
            raise DataError(
                f"{longer}:{lineno + 1}: Moses files have different line counts: {longer} has {total_longer} "
                f"lines but {shorter} has {lineno}; every line of one must translate the same line of the other"
            )
        lineno = a[0]
        src, en = a[1], b[1]
        if not src.strip() and not en.strip():
            corpus.skipped["blank line"] += 1
            continue
        reason = _check_sides(src_path, lineno, src, en)
        if reason:
            bad_path = src_path if reason == "empty source" else en_path
            _reject(corpus, on_error, f"{bad_path}:{lineno}", reason)
            continue
        corpus.add(lang, Pair(src, en))
    return _finish(corpus, src_path, lang)


# -- gettext catalogs ---------------------------------------------------------------------------


def bcp47(tag: str) -> str:
    """``pt_BR`` / ``zh_Hant`` / ``sr@latin`` -> ``pt-BR`` / ``zh-Hant`` / ``sr-latin`` (gettext to BCP-47-ish)."""
    return tag.replace("_", "-").replace("@", "-")


def gettext_language(path: Path, catalog_locale: object = None) -> Optional[str]:
    """The language of a catalog: ``<lang>/LC_MESSAGES/x.po``, else its header, else ``<lang>.po``."""
    if path.parent.name == "LC_MESSAGES":
        return bcp47(path.parent.parent.name)
    if catalog_locale:
        return bcp47(str(catalog_locale))
    return bcp47(path.stem) if path.stem else None


def _clean_message(text: str) -> str:
    """Catalog strings may span lines; a pair is one line of text, so whitespace runs become one space."""
    return " ".join(text.split())


def read_gettext(path: str | Path, lang: Optional[str] = None) -> Corpus:
    """Read a ``.po`` or ``.mo`` catalog: msgid is the English side, msgstr the source side.

    Fuzzy, plural and untranslated entries are skipped and counted (``corpus.skipped``), as is
    the header entry. The language comes from ``lang``, else from the path/header (:func:`gettext_language`).

        read_gettext("locale/ro/LC_MESSAGES/django.po")["ro"]
    """
    from babel.messages.mofile import read_mo
    from babel.messages.pofile import PoFileError, read_po

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    corpus = Corpus(files=[str(path)])
    try:
        if path.suffix == ".mo":
            catalog = read_mo(io.BytesIO(data))
        elif path.suffix == ".po":
            catalog = read_po(io.BytesIO(data), abort_invalid=True, ignore_obsolete=True)
        else:
            raise DataError(f"{path}: not a gettext catalog (expected .po or .mo)")
    except PoFileError as exc:
        lineno = exc.lineno + 1 if isinstance(getattr(exc, "lineno", None), int) else "?"  # babel counts from 0
        reason = re.sub(r" on \d+$", "", str(exc))  # babel appends its 0-based line number
        line = str(getattr(exc, "line", "")).strip()
        raise DataError(f"{path}:{lineno}: not a valid .po file: {reason}: {line!r}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{_line_of_bad_byte(data)}: not valid in the catalog's charset ({exc.reason})") from None
    except DataError:
        raise
    except Exception as exc:  # babel raises assorted errors (struct.error, IndexError...) on corrupt .mo files
        raise DataError(f"{path}: cannot read the catalog ({type(exc).__name__}: {exc})") from None
    lang = lang or gettext_language(path, catalog.locale)
    if not lang:
        raise DataError(f"{path}: cannot tell the catalog's language; pass it explicitly")
    for message in catalog:
        if not message.id:
            continue  # the header entry (msgid ""), metadata rather than a translation
        if message.pluralizable:
            corpus.skipped["plural entry"] += 1
        elif message.fuzzy:
            corpus.skipped["fuzzy entry"] += 1
        elif not message.string or not str(message.string).strip():
            corpus.skipped["untranslated entry"] += 1
        else:
            corpus.add(lang, Pair(_clean_message(message.string), _clean_message(message.id)))
    return _finish(corpus, path, lang)


def _line_of_bad_byte(data: bytes) -> int:
    """1-based line of the first non-UTF-8 byte (babel does not say where decoding failed)."""
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return lineno
    return 1


# -- HuggingFace datasets -----------------------------------------------------------------------


def read_hf_dataset(
    name: str,
    *,
    data_files: str | list[str] | None = None,
    config: Optional[str] = None,
    split: str = "train",
    lang: Optional[str] = None,
    columns: Columns = Columns(),
    translation_column: str = "translation",
    on_error: OnError = "raise",
    cache_dir: Optional[str] = None,
) -> Corpus:
    """Read through ``datasets.load_dataset``: local files (``name="json"|"csv"|"parquet"`` with
    ``data_files``, works offline) or a hub dataset by name when online.

    Columns are taken as configured; when the source column is absent and a ``translation``
    column of dicts exists (the hub's WMT/OPUS layout, ``{"ro": ..., "en": ...}``), the pair is
    ``translation[lang]``, ``translation[columns.en]``. Errors name the dataset and its row
    number (1-based; for a JSON-lines file that is its line number).

        read_hf_dataset("json", data_files="ro.jsonl", lang="ro")
        read_hf_dataset("wmt16", config="ro-en", split="validation", lang="ro")   # online
    """
    import datasets

    kwargs: dict = {"split": split}
    if data_files is not None:
        kwargs["data_files"] = data_files
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    if name == "csv":
        # the same no-quoting, no-NA rules as read_tsv (docs/design.md, "TSV quoting")
        kwargs.update(sep="\t", quoting=3, keep_default_na=False, na_filter=False)
    where_name = f"{name}:{data_files}" if data_files else f"{name}{'/' + config if config else ''}[{split}]"
    try:
        ds = datasets.load_dataset(name, config, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(f"{where_name}: not found ({exc})") from None
    except (ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        cause = exc.__cause__ or exc
        raise DataError(f"{where_name}: cannot load with `datasets` ({cause})") from None
    corpus = Corpus(files=[where_name])
    names = ds.column_names
    use_translation = columns.src not in names and translation_column in names
    needed = [translation_column] if use_translation else [columns.src, columns.en]
    if lang is None:
        if not columns.lang:
            raise DataError(f"{where_name}: no language given and no language column configured")
        needed.append(columns.lang)
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(
            f"{where_name}: missing column(s) {', '.join(map(repr, missing))}; the dataset has "
            f"{', '.join(map(repr, names))} (set the column names in the task config's `columns`)"
        )
    for row_number, row in enumerate(ds, start=1):
        where = f"{where_name}: row {row_number}"
        row_lang = lang if lang is not None else (row[columns.lang] or "").strip()
        if use_translation:
            pair = row[translation_column] or {}
            src, en = pair.get(row_lang), pair.get(columns.en)
        else:
            src, en = row[columns.src], row[columns.en]
        if not isinstance(src, str) or not isinstance(en, str):
            _reject(corpus, on_error, where, "source or target is missing or not a string")
            continue
        reason = _check_sides(Path(where_name), row_number, src, en)
        if reason:
            _reject(corpus, on_error, where, reason)
            continue
        if not row_lang:
            _reject(corpus, on_error, where, "empty language")
            continue
        corpus.add(row_lang, Pair(src, en))
    return _finish(corpus, Path(where_name), lang)


# -- dispatch -----------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """``tsv``, ``jsonl`` or ``gettext`` from the file name (``.gz`` is looked through)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".tsv", ".txt.tsv", ".tab")):
        return "tsv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".po", ".mo")):
        return "gettext"
    raise DataError(f"{path}: cannot tell the corpus format from the file name; set `format:` (one of {', '.join(FORMATS)})")


def read_corpus(
    path: str | Path,
    lang: Optional[str] = None,
    format: str = "auto",
    columns: Columns = Columns(),
    on_error: OnError = "raise",
    en_path: str | Path | None = None,
) -> Corpus:
    """Read any supported file; ``format="moses"`` needs ``en_path`` (the English side) and ``lang``.

        read_corpus("dev/ro.tsv.gz", lang="ro")
    """
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "tsv":
        return read_tsv(path, lang=lang, columns=columns, on_error=on_error)
    if fmt == "jsonl":
        return read_jsonl(path, lang=lang, columns=columns, on_error=on_error)
    if fmt == "gettext":
        return read_gettext(path, lang=lang)
    if fmt == "moses":
        if en_path is None or lang is None:
            raise DataError(f"{path}: a Moses corpus needs the English file and the language")
        return read_moses(path, en_path, lang=lang, on_error=on_error)
    raise DataError(f"{path}: unknown corpus format {fmt!r}; allowed: auto, {', '.join(FORMATS)}")


def write_tsv(path: str | Path, rows: list[tuple[str, str, str, str]]) -> None:
    """Write ``lang, src, en, origin`` rows as the shared corpora's TSV (tabs/newlines must not occur)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="\n") as f:  # type: ignore[operator]
        f.write("lang\tsrc\ten\torigin\n")
        for row in rows:
            if any("\t" in x or "\n" in x or "\r" in x for x in row):
                raise ValueError(f"tab or newline inside a TSV field: {row!r}")
            f.write("\t".join(row) + "\n")


def fill_placeholders(pattern: str, **values: str) -> str:
    """A file pattern with its ``{name}`` placeholders replaced (``{lang}``, ``{side}``, ``{budget}``);
    placeholders without a value stay as they are."""
    for key, value in values.items():
        pattern = pattern.replace("{" + key + "}", value)
    return pattern


def read_pairs(path: str | Path, lang: str | None = None) -> list[Pair]:
    """All pairs of a corpus file in any format :func:`read_corpus` reads (TSV/JSONL/gettext; one
    language expected, or ``lang`` chosen; the language column is not needed)."""
    path = Path(path)
    corpus = read_corpus(path, lang=lang or path.name.split(".")[0], columns=Columns(lang=None))
    langs = corpus.languages()
    if len(langs) != 1:
        raise DataError(f"{path}: expected pairs of one language, found {', '.join(langs) or 'none'}")
    return corpus[langs[0]]
