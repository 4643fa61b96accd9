"""Corpus readers on small fixtures written here: every format, and every bad-input case."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from metanmt.data.corpus import Columns, Pair, read_corpus, read_gettext, read_hf_dataset, read_jsonl, read_moses, read_tsv
from metanmt.data.gettext import convert_gettext, normalize_placeholders
from metanmt.errors import DataError

HEADER = "lang\tsrc\ten\torigin\n"


def write(path: Path, text: str | bytes) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# -- TSV ----------------------------------------------------------------------------------------


def test_tsv_plain_and_gz_no_quoting_no_na(tmp_path: Path) -> None:
    body = HEADER + 'ro\t"Salut\t"Hi\tx\nro\tNA\tNA\tx\nro\tnull\tNone\tx\n'
    for name in ("ro.tsv", "ro.tsv.gz"):
        corpus = read_tsv(write(tmp_path / name, body), lang="ro")
        # quotes are ordinary characters and NA/null are strings: docs/design.md, "TSV quoting"
        assert corpus["ro"] == [Pair('"Salut', '"Hi'), Pair("NA", "NA"), Pair("null", "None")]
        assert not corpus.skipped


def test_tsv_groups_by_lang_column_and_custom_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "all.tsv", "language\ttext\tenglish\nro\tda\tyes\nfi\tkyllä\tyes\nro\tnu\tno\n")
    corpus = read_tsv(path, columns=Columns(lang="language", src="text", en="english"))
    assert corpus.languages() == ["fi", "ro"]
    assert corpus["ro"] == [Pair("da", "yes"), Pair("nu", "no")]
    assert len(corpus) == 3


def test_tsv_lang_given_ignores_regional_variants(tmp_path: Path) -> None:
    path = write(tmp_path / "pt.tsv", HEADER + "pt-BR\tSim\tYes\tx\npt\tNão\tNo\tx\n")
    assert [p.src for p in read_tsv(path, lang="pt")["pt"]] == ["Sim", "Não"]


def test_tsv_crlf_bom_and_unicode_line_separator(tmp_path: Path) -> None:
    text = "\ufeff" + HEADER.replace("\n", "\r\n") + "ro\ta\u2028b\tc\tx\r\n"
    corpus = read_tsv(write(tmp_path / "ro.tsv", text), lang="ro")
    assert corpus["ro"] == [Pair("a\u2028b", "c")]  # U+2028 is text, not a line break


def test_tsv_blank_lines_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "ro.tsv", HEADER + "ro\ta\tb\tx\n\nro\tc\td\tx\n")
    with caplog.at_level(logging.WARNING):
        corpus = read_tsv(path, lang="ro")
    assert len(corpus) == 2 and corpus.skipped["blank line"] == 1
    assert "blank line" in caplog.text


@pytest.mark.parametrize(
    "row, message",
    [
        ("ro\ta\tb\n", "wrong column count: 3 fields"),
        ("ro\ta\tb\tc\td\n", "wrong column count: 5 fields"),
        ("ro\t \tb\tx\n", "empty source"),
        ("ro\ta\t\tx\n", "empty target"),
    ],
)
def test_tsv_bad_rows_name_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = write(tmp_path / "ro.tsv.gz", HEADER + "ro\tok\tok\tx\n" + row)
    with pytest.raises(DataError, match=rf"ro\.tsv\.gz:3: {message}"):
        read_tsv(path, lang="ro")


def test_tsv_skip_mode_counts_bad_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "ro.tsv", HEADER + "ro\tok\tok\tx\nro\ta\tb\nro\t\tb\tx\n")
    corpus = read_tsv(path, lang="ro", on_error="skip")
    assert len(corpus) == 1
    assert sum(corpus.skipped.values()) == 2 and corpus.skipped["empty source"] == 1


def test_tsv_non_utf8_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "ro.tsv", (HEADER + "ro\tok\tok\tx\n").encode() + b"ro\tna\xefve\tnaive\tx\n")
    with pytest.raises(DataError, match=r"ro\.tsv:3: not valid UTF-8"):
        read_tsv(path, lang="ro")


def test_tsv_missing_column_names_header(tmp_path: Path) -> None:
    path = write(tmp_path / "ro.tsv", "lang\tsource\ttarget\nro\ta\tb\n")
    with pytest.raises(DataError, match=r"ro\.tsv:1: missing column\(s\) 'src', 'en'.*'source'"):
        read_tsv(path, lang="ro")
    with pytest.raises(DataError, match="missing column"):
        read_tsv(write(tmp_path / "x.tsv", "src\ten\na\tb\n"))  # no lang given and no lang column


def test_empty_corpus_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"empty\.tsv: empty corpus"):
        read_tsv(write(tmp_path / "empty.tsv", ""), lang="ro")
    with pytest.raises(DataError, match=r"header\.tsv: empty corpus"):
        read_tsv(write(tmp_path / "header.tsv", HEADER), lang="ro")
    with pytest.raises(DataError, match="no such file"):
        read_tsv(tmp_path / "absent.tsv", lang="ro")


def test_requested_language_without_data(tmp_path: Path) -> None:
    corpus = read_tsv(write(tmp_path / "all.tsv", HEADER + "ro\ta\tb\tx\n"))
    with pytest.raises(DataError, match=r"all\.tsv: no data for language\(s\) fi; found: ro \(1\)"):
        corpus.require(["ro", "fi"], str(tmp_path / "all.tsv"))


# -- JSON lines ---------------------------------------------------------------------------------


def test_jsonl_plain_gz_and_columns(tmp_path: Path) -> None:
    rows = [{"language": "ro", "source": "da", "target": "yes"}, {"language": "fi", "source": "ei", "target": "no"}]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n"
    cols = Columns(lang="language", src="source", en="target")
    for name in ("x.jsonl", "x.jsonl.gz"):
        corpus = read_corpus(write(tmp_path / name, text), columns=cols)
        assert corpus["ro"] == [Pair("da", "yes")] and corpus["fi"] == [Pair("ei", "no")]
        assert corpus.skipped["blank line"] == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"lang": "ro", "src": "a"', "not valid JSON"),
        ('["ro", "a", "b"]', "expected a JSON object"),
        ('{"lang": "ro", "src": "a", "english": "b"}', r"missing key\(s\) 'en'"),
        ('{"lang": "ro", "src": "", "en": "b"}', "empty source"),
        ('{"lang": "ro", "src": "a", "en": 3}', r"key\(s\) 'en' are not strings"),
    ],
)
def test_jsonl_bad_rows(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "x.jsonl", '{"lang": "ro", "src": "a", "en": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"x\.jsonl:2: {message}"):
        read_jsonl(path)


# -- Moses --------------------------------------------------------------------------------------


def test_moses_reads_aligned_lines(tmp_path: Path) -> None:
    src = write(tmp_path / "train.ro.gz", "Bună ziua\nMulțumesc\n")
    en = write(tmp_path / "train.en.gz", "Good day\nThank you\n")
    assert read_moses(src, en, lang="ro")["ro"] == [Pair("Bună ziua", "Good day"), Pair("Mulțumesc", "Thank you")]


def test_moses_different_line_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "train.ro", "a\nb\nc\n")
    en = write(tmp_path / "train.en", "A\nB\n")
    with pytest.raises(DataError, match=r"train\.ro:3: Moses files have different line counts: .*has 3 lines but .*train\.en has 2"):
        read_moses(src, en, lang="ro")
    with pytest.raises(DataError, match=r"b\.en:3: .*b\.en has 4 lines but .*b\.ro has 2"):
        read_moses(write(tmp_path / "b.ro", "a\nb\n"), write(tmp_path / "b.en", "A\nB\nC\nD\n"), lang="ro")


def test_moses_empty_side_names_the_right_file(tmp_path: Path) -> None:
    src = write(tmp_path / "t.ro", "a\nb\n")
    en = write(tmp_path / "t.en", "A\n\n")
    with pytest.raises(DataError, match=r"t\.en:2: empty target"):
        read_moses(src, en, lang="ro")


def test_moses_non_utf8(tmp_path: Path) -> None:
    src = write(tmp_path / "t.ro", b"a\n\xff\n")
    en = write(tmp_path / "t.en", "A\nB\n")
    with pytest.raises(DataError, match=r"t\.ro:2: not valid UTF-8"):
        read_moses(src, en, lang="ro")


# -- gettext ------------------------------------------------------------------------------------


PO = r'''# Romanian catalog
msgid ""
msgstr ""
"Language: ro\n"
"Content-Type: text/plain; charset=UTF-8\n"

#: app.py:1
msgid "Save"
msgstr "Salvează"

#, fuzzy
msgid "Delete"
msgstr "Șterge poate"

msgid "Cancel"
msgstr ""

msgid "One file"
msgid_plural "%(n)s files"
msgstr[0] "Un fișier"
msgstr[1] "%(n)s fișiere"
msgstr[2] "%(n)s de fișiere"

msgid ""
"Hello %(name)s,\n"
"welcome"
msgstr ""
"Salut %(name)s,\n"
"bun venit"
'''


def _catalog_bytes(kind: str) -> bytes:
    """The PO fixture, or the same catalog compiled to .mo by babel."""
    import io

    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    if kind == "po":
        return PO.encode("utf-8")
    buffer = io.BytesIO()
    write_mo(buffer, read_po(io.BytesIO(PO.encode("utf-8"))), use_fuzzy=False)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["po", "mo"])
def test_gettext_po_and_mo(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "locale" / "ro" / "LC_MESSAGES" / f"django.{kind}"
    path.parent.mkdir(parents=True)
    path.write_bytes(_catalog_bytes(kind))
    corpus = read_gettext(path)
    assert corpus.languages() == ["ro"]
    # .mo files are sorted by msgid: compare as sets; msgid/msgstr spanning lines become one line
    assert set(corpus["ro"]) == {Pair("Salvează", "Save"), Pair("Salut %(name)s, bun venit", "Hello %(name)s, welcome")}
    assert corpus.skipped["plural entry"] == 1
    if kind == "po":  # a .mo file holds no fuzzy or untranslated entries at all
        assert corpus.skipped["fuzzy entry"] == 1 and corpus.skipped["untranslated entry"] == 1


def test_gettext_bad_po(tmp_path: Path) -> None:
    path = write(tmp_path / "ro.po", PO.replace('#: app.py:1\n', 'not a keyword\n'))
    with pytest.raises(DataError, match=r"ro\.po:7: not a valid \.po file"):
        read_gettext(path)
    path = write(tmp_path / "bad.po", PO.encode("utf-8").replace("Salvează".encode(), b"Salv\xff"))
    with pytest.raises(DataError, match=r"bad\.po:9: not valid"):
        read_gettext(path)
    empty = write(tmp_path / "fi.po", 'msgid ""\nmsgstr ""\n"Language: fi\\n"\n\nmsgid "Save"\nmsgstr ""\n')
    with pytest.raises(DataError, match="empty corpus"):
        read_gettext(empty)


def test_normalize_placeholders() -> None:
    assert normalize_placeholders("Salut %(name)s, ai %d mesaje", "Hi %(name)s, you have %d messages") == (
        "Salut {0}, ai {1} mesaje",
        "Hi {0}, you have {1} messages",
    )
    # named ones may be reordered by the translator; 100%% is not a placeholder
    assert normalize_placeholders("{b} de {a} 100%%", "{a} of {b} 100%%") == ("{1} de {0} 100%%", "{0} of {1} 100%%")
    assert normalize_placeholders("%s și %s", "%s and %s") == ("{0} și {1}", "{0} and {1}")


def test_convert_gettext(tmp_path: Path) -> None:
    locale = tmp_path / "locale"
    for lang, kind in (("ro", "po"), ("pt_BR", "mo")):
        path = locale / lang / "LC_MESSAGES" / f"app.{kind}"
        path.parent.mkdir(parents=True)
        path.write_bytes(_catalog_bytes(kind))
    (locale / "ro" / "LC_MESSAGES" / "app.mo").write_bytes(_catalog_bytes("mo"))  # twin of app.po: not read twice
    summary = convert_gettext(locale, tmp_path / "corpus")
    assert summary.pairs == {"pt-BR": 2, "ro": 2}
    assert summary.skipped[".mo beside its .po"] == 1 and summary.skipped["fuzzy entry"] == 1
    corpus = read_tsv(tmp_path / "corpus" / "ro.tsv", lang="ro")
    assert corpus["ro"][1] == Pair("Salut {0}, bun venit", "Hello {0}, welcome")
    lines = (tmp_path / "corpus" / "ro.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "lang\tsrc\ten\torigin" and lines[1].endswith("\tro/LC_MESSAGES/app.po")
    with pytest.raises(DataError, match="already exists"):
        convert_gettext(locale, tmp_path / "corpus")
    with pytest.raises(DataError, match="no gettext catalogs"):
        convert_gettext(tmp_path / "corpus", tmp_path / "out2")


# -- datasets -----------------------------------------------------------------------------------


def test_hf_datasets_local_json_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write(tmp_path / "ro.jsonl", '{"src": "da", "en": "yes"}\n{"src": "nu", "en": "no"}\n')
    corpus = read_hf_dataset("json", data_files=str(path), lang="ro", cache_dir=str(tmp_path / "cache"))
    assert corpus["ro"] == [Pair("da", "yes"), Pair("nu", "no")]
    wmt = write(tmp_path / "wmt.jsonl", '{"translation": {"ro": "da", "en": "yes"}}\n')
    corpus = read_hf_dataset("json", data_files=str(wmt), lang="ro", cache_dir=str(tmp_path / "cache"))
    assert corpus["ro"] == [Pair("da", "yes")]
    with pytest.raises(DataError, match=r"row 2: empty source"):
        read_hf_dataset("json", data_files=str(write(tmp_path / "bad.jsonl", '{"src": "a", "en": "b"}\n{"src": "", "en": "b"}\n')),
                        lang="ro", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"missing column\(s\) 'en'"):
        read_hf_dataset("json", data_files=str(write(tmp_path / "cols.jsonl", '{"src": "a", "english": "b"}\n')),
                        lang="ro", cache_dir=str(tmp_path / "cache"))
