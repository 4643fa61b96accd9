"""A zero-download parallel corpus built at run time from the CLDR data that Babel ships.

For each locale, every named thing CLDR translates (languages, territories, scripts, currencies,
months, weekdays, quarters, unit patterns like ``{0} Kilometer``, relative dates like
``in {0} Tagen``) is paired with its English name. That is a few hundred to ~1,500 short pairs per
language in hundreds of locales: enough for the quickstart to meta-train and adapt in minutes::

    corpus = cldr_corpus(["de", "fr", "ro"])
    corpus["ro"][:2]    # [Pair(src='afar', en='Afar'), Pair(src='abhază', en='Abkhazian')]

Entries identical to the English (untranslated names CLDR inherits from its root locale, or names
that are the same in both languages) are skipped and counted: they only teach copying.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from ..errors import ConfigError
from .corpus import Corpus, Pair

logger = logging.getLogger(__name__)

# The quickstart's split: Latin/Cyrillic/Greek-script European languages with full CLDR data, and
# held-out languages the model never sees in meta-training (Romanian for validation, as MetaNMT).
TRAIN_LANGUAGES = ["de", "fr", "es", "it", "pt", "nl", "pl", "cs", "sv", "da", "ru", "hu"]
DEV_LANGUAGES = ["ro"]
TEST_LANGUAGES = ["fi", "lv", "tr"]


def _flat(mapping: Any) -> dict[Any, Any]:
    return {k: mapping[k] for k in mapping}


def _entries(locale: Any) -> Iterator[tuple[str, Any]]:
    """(key, value) for every translatable CLDR string of ``locale``; keys match across locales."""
    data = locale._data  # Babel's public properties do not expose units and relative dates
    for name, table in (
        ("language", locale.languages),
        ("territory", locale.territories),
        ("script", locale.scripts),
        ("currency", locale.currencies),
    ):
        for key, value in table.items():
            yield f"{name}:{key}", value
    for context in ("format", "stand-alone"):
        for width in ("wide", "abbreviated"):
            for key, value in _flat(locale.months.get(context, {}).get(width, {})).items():
                yield f"month:{context}:{width}:{key}", value
            for key, value in _flat(locale.days.get(context, {}).get(width, {})).items():
                yield f"day:{context}:{width}:{key}", value
            for key, value in _flat(locale.quarters.get(context, {}).get(width, {})).items():
                yield f"quarter:{context}:{width}:{key}", value
    for unit, patterns in _flat(data.get("unit_patterns", {})).items():
        long = patterns.get("long") if hasattr(patterns, "get") else None
        if long is None:
            continue
        for form in ("other", "per"):
            value = long.get(form) if hasattr(long, "get") else None
            if isinstance(value, str):
                yield f"unit:{unit}:{form}", value
    for fieldname, spec in _flat(data.get("date_fields", {})).items():
        if not hasattr(spec, "get"):
            continue
        for tense in ("future", "past"):
            forms = spec.get(tense)
            value = forms.get("other") if hasattr(forms, "get") else None
            if isinstance(value, str):
                yield f"relative:{fieldname}:{tense}", value


def cldr_pairs(lang: str) -> tuple[list[Pair], int]:
    """The pairs for one locale (in a fixed order) and how many identical-to-English entries were skipped."""
    from babel import Locale, UnknownLocaleError

    try:
        locale = Locale.parse(lang.replace("-", "_"))
    except (UnknownLocaleError, ValueError) as exc:
        raise ConfigError(f"task.languages: {lang!r} is not a locale in Babel's CLDR data ({exc})") from None
    english = dict(_entries(Locale("en")))
    pairs: list[Pair] = []
    identical = 0
    seen: set[tuple[str, str]] = set()
    for key, value in _entries(locale):
        en = english.get(key)
        if not isinstance(value, str) or not isinstance(en, str) or not value.strip() or not en.strip():
            continue
        src, en = " ".join(value.split()), " ".join(en.split())
        if src == en:
            identical += 1
            continue
        if (src, en) in seen:
            continue  # e.g. a month's format and stand-alone forms are often the same string
        seen.add((src, en))
        pairs.append(Pair(src, en))
    return pairs, identical


def cldr_corpus(languages: list[str], min_pairs: int = 50) -> Corpus:
    """A :class:`Corpus` with one entry per language, built from Babel's CLDR data (no download).

    Raises ConfigError for a language Babel does not know or with fewer than ``min_pairs`` pairs.
    """
    corpus = Corpus(files=["babel:cldr"])
    for lang in languages:
        pairs, identical = cldr_pairs(lang)
        if len(pairs) < min_pairs:
            raise ConfigError(
                f"task.languages: CLDR has only {len(pairs)} translated names for {lang!r} (need {min_pairs}); "
                "choose a locale with fuller CLDR data"
            )
        corpus.pairs[lang] = pairs
        if identical:
            corpus.skipped["identical to English"] += identical
        logger.info("CLDR %s: %d pairs (%d identical to English skipped)", lang, len(pairs), identical)
    return corpus


