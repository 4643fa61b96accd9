"""Reading a translation suite's files: file patterns filled per language and split, globs expanded,
each file read by its format (TSV/JSONL/gettext, Moses pairs of files, HuggingFace ``datasets``).

    corpus = read_pattern(task_cfg, root, "meta_train/{lang}.tsv.gz", ["de", "fr"], "train")
    corpus["de"]          # list of Pair(src, en)

``root`` is a function returning ``data.root``, called only when a file path has to be resolved
(the embedded CLDR corpus and hub datasets need none).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable

from ...data.corpus import Corpus, fill_placeholders, read_corpus, read_hf_dataset, read_moses
from ...errors import ConfigError, DataError
from .config import TranslationTaskConfig


def expand_pattern(root: Callable[[], Path], pattern: str, **values: str) -> list[Path]:
    """Files a pattern names: placeholders filled, globs expanded (sorted), relative to data.root."""
    text = fill_placeholders(pattern, **values)
    path = Path(text)
    if not path.is_absolute():
        path = root() / path
    if any(ch in text for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not matches:
            raise DataError(f"{path}: no file matches this pattern")
        return matches
    return [path]


def read_pattern(t: TranslationTaskConfig, root: Callable[[], Path], pattern: str, langs: list[str], split: str,
                 **values: str) -> Corpus:
    """Read ``pattern`` for each language (or once, grouped by the lang column)."""
    if not pattern:
        raise ConfigError(f"task.{split}_path: empty; give a file pattern such as '{split}/{{lang}}.tsv.gz'")
    columns = t.columns
    corpus = Corpus()
    # one read per language when the pattern names one (Moses: {side} does); else one file, grouped by its lang column
    per_language = (
        "{lang}" in pattern
        or (t.source == "files" and t.format == "moses")
        or bool(t.source == "datasets" and t.dataset_config and "{lang}" in t.dataset_config)
    )
    for lang in langs if per_language else [None]:
        names = {"lang": lang} if lang else {}
        if t.source == "datasets":
            data_files = [str(p) for p in expand_pattern(root, pattern, **names, **values)] if t.dataset in ("json", "csv", "parquet") else None
            config = fill_placeholders(t.dataset_config, lang=lang or "") if t.dataset_config else None
            hf_split = "train" if data_files else t.dataset_splits.get(split, split)
            corpus.update(read_hf_dataset(t.dataset, data_files=data_files, config=config, split=hf_split, lang=lang,
                                          columns=columns, on_error=t.bad_rows))
        elif t.format == "moses":
            src_file = expand_pattern(root, pattern, side=lang, **names, **values)[0]
            en_file = expand_pattern(root, pattern, side=t.target_language, **names, **values)[0]
            corpus.update(read_moses(src_file, en_file, lang=lang, on_error=t.bad_rows))
        else:
            for path in expand_pattern(root, pattern, **names, **values):
                corpus.update(read_corpus(path, lang=lang, format=t.format, columns=columns, on_error=t.bad_rows))
    return corpus
