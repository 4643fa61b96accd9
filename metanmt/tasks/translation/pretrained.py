"""Pretrained multilingual checkpoints: the source-language codes, the forced English target and
the frozen position tables of each family of ``transformers`` seq2seq models.

    scheme = LanguageScheme.for_tokenizer(tokenizer, model_cfg)   # from the tokenizer's class
    scheme.prepare_target(tokenizer)        # labels begin with the English code where the family wants it
    pairs = scheme.apply(tokenizer, pairs, "pt")   # tokenizer.src_lang = "pt_XX" (or a T5 task prefix)
    scheme.forced_bos_id(tokenizer)         # en_XX / __en__ / eng_Latn: generate() starts English
    sinusoidal_tables(model)                # frozen position tables, whatever the architecture calls them

The family of a checkpoint is read from its tokenizer class, which is what decides how the
language is given to the model (the architectures are shared: NLLB is an M2M100 model):

============  ===========================  ===================  ============================================
family        tokenizer                    English target       source language
============  ===========================  ===================  ============================================
``mbart50``   ``MBart50Tokenizer``         ``en_XX``            ``src_lang``: ``[pt_XX] tokens </s>``
``m2m100``    ``M2M100Tokenizer``          ``en`` (``__en__``)  ``src_lang``: ``[__pt__] tokens </s>``
``nllb``      ``NllbTokenizer``            ``eng_Latn``         ``src_lang``: ``[por_Latn] tokens </s>``
``t5``        ``T5Tokenizer`` (T5, mT5)    none                 prefix ``translate Portuguese to English: ``
``plain``     anything else (Marian,       none                 none (one English-target model)
              metanmt's own vocabulary)
============  ===========================  ===================  ============================================

Labels and decoder inputs follow each model's training convention, which the tokenizer's target
mode produces once ``tgt_lang`` is English: mBART-50, M2M100 and NLLB labels are
``[en] tokens </s>`` and the decoder starts from ``</s>`` (``decoder_start_token_id``), so the
teacher-forced decoder input is ``</s> [en] tokens``, as ``shift_tokens_right`` makes it; at
generation the English code is forced as the first token (``forced_bos_token_id``, written into
the model's ``generation_config`` so a saved model keeps translating into English). T5 and Marian
labels are ``tokens </s>`` with the decoder starting from the pad token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch import nn

from ...data.corpus import Pair
from ...errors import ConfigError

#: The corpus' language ids -> each family's codes. Languages a family lacks are left out (an
#: episode of that language then stops with an error naming ``model.language_codes``).
#: mBART-50 has no Hungarian or Catalan and one Chinese code (zh_CN, simplified), which
#: traditional Chinese also gets; M2M100 has one Chinese code for both scripts.
LANGUAGE_CODES: dict[str, dict[str, str]] = {
    "mbart50": {
        "pt": "pt_XX", "de": "de_DE", "es": "es_XX", "fr": "fr_XX", "nl": "nl_XX", "ja": "ja_XX", "zh": "zh_CN",
        "pl": "pl_PL", "it": "it_IT", "zh-Hant": "zh_CN", "cs": "cs_CZ", "ru": "ru_RU", "uk": "uk_UA", "ar": "ar_AR",
        "id": "id_ID", "sv": "sv_SE", "ro": "ro_RO", "lv": "lv_LV", "fi": "fi_FI", "tr": "tr_TR", "ko": "ko_KR",
        "en": "en_XX",
    },
    "m2m100": {
        lang: lang for lang in ("pt", "de", "es", "fr", "nl", "ja", "zh", "pl", "it", "cs", "ru", "uk", "ar", "hu", "id",
                                "ca", "sv", "ro", "lv", "fi", "tr", "ko", "en")
    } | {"zh-Hant": "zh"},
    # FLORES-200 codes
    "nllb": {
        "pt": "por_Latn", "de": "deu_Latn", "es": "spa_Latn", "fr": "fra_Latn", "nl": "nld_Latn", "ja": "jpn_Jpan",
        "zh": "zho_Hans", "pl": "pol_Latn", "it": "ita_Latn", "zh-Hant": "zho_Hant", "cs": "ces_Latn", "ru": "rus_Cyrl",
        "uk": "ukr_Cyrl", "ar": "arb_Arab", "hu": "hun_Latn", "id": "ind_Latn", "ca": "cat_Latn", "sv": "swe_Latn",
        "ro": "ron_Latn", "lv": "lvs_Latn", "fi": "fin_Latn", "tr": "tur_Latn", "ko": "kor_Hang", "en": "eng_Latn",
    },
    # T5/mT5: the language's English name, for the task prefix
    "t5": {
        "pt": "Portuguese", "de": "German", "es": "Spanish", "fr": "French", "nl": "Dutch", "ja": "Japanese",
        "zh": "Chinese", "pl": "Polish", "it": "Italian", "zh-Hant": "Traditional Chinese", "cs": "Czech",
        "ru": "Russian", "uk": "Ukrainian", "ar": "Arabic", "hu": "Hungarian", "id": "Indonesian", "ca": "Catalan",
        "sv": "Swedish", "ro": "Romanian", "lv": "Latvian", "fi": "Finnish", "tr": "Turkish", "ko": "Korean",
        "en": "English",
    },
}

#: the tokenizer class that decides a family (subclasses and ``...Fast`` aliases included)
TOKENIZER_FAMILIES = {"MBart50Tokenizer": "mbart50", "M2M100Tokenizer": "m2m100", "NllbTokenizer": "nllb", "T5Tokenizer": "t5"}
#: T5's own prefix format ("translate German to English: ")
T5_PREFIX = "translate {language} to English: "


def family_of(tokenizer: Any) -> str:
    """``mbart50`` / ``m2m100`` / ``nllb`` / ``t5`` from the tokenizer's class, else ``plain``."""
    for cls in type(tokenizer).__mro__:
        name = cls.__name__.removesuffix("Fast")
        if name in TOKENIZER_FAMILIES:
            return TOKENIZER_FAMILIES[name]
    return "plain"


@dataclass
class LanguageScheme:
    """How one checkpoint is told the source language and forced into English (module docstring)."""

    family: str
    codes: dict[str, str] = field(default_factory=dict)  # corpus language id -> the model's code (t5: name)
    english: Optional[str] = None  # the model's code of the English target; None: no code
    prefix: str = ""  # source text prefix template, may use {language} (t5: T5_PREFIX)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, model_cfg: Any) -> "LanguageScheme":
        """The scheme of ``tokenizer``'s family, with ``model.language_codes`` /
        ``model.target_code`` / ``model.source_prefix`` over the defaults."""
        family = family_of(tokenizer)
        codes = dict(LANGUAGE_CODES.get(family, {}))
        english = codes.pop("en", None) if family != "t5" else None
        codes.update(getattr(model_cfg, "language_codes", None) or {})
        target = getattr(model_cfg, "target_code", None)
        if target is not None:
            english = target or None
        prefix = getattr(model_cfg, "source_prefix", None)
        if prefix is None:
            prefix = T5_PREFIX if family == "t5" else ""
        scheme = cls(family, codes, english, prefix)
        if english is not None:
            scheme.token_id(tokenizer, english, "model.target_code")
        return scheme

    @property
    def uses_codes(self) -> bool:
        """Whether each source language needs its code (``src_lang``) or a name in the prefix."""
        return self.family in ("mbart50", "m2m100", "nllb") or "{language}" in self.prefix

    def code(self, lang: Optional[str]) -> Optional[str]:
        """The model's code (t5: the name) of corpus language ``lang``; a clear error when unknown."""
        if not self.uses_codes:
            return None
        if lang is None:
            raise ConfigError(
                f"the {self.family} checkpoint needs the source language of the text it encodes, and none was given "
                "(episodes and validation give it; other callers name it, e.g. translate --lang)"
            )
        if lang not in self.codes:
            raise ConfigError(
                f"model.language_codes: no {self.family} code for language {lang!r}; "
                f"set model.language_codes.{lang} (known: {', '.join(sorted(self.codes))})"
            )
        return self.codes[lang]

    @staticmethod
    def token_id(tokenizer: Any, token: str, key: str) -> int:
        """The id of a language token, which must be in the vocabulary (not ``<unk>``)."""
        lookup = getattr(tokenizer, "get_lang_id", None) if "__" not in token else None
        try:
            tid = lookup(token) if lookup is not None else tokenizer.convert_tokens_to_ids(token)
        except KeyError:
            tid = None
        if tid is None or tid == tokenizer.unk_token_id:
            raise ConfigError(f"{key}: {token!r} is not a language code of the checkpoint's tokenizer ({type(tokenizer).__name__})")
        return int(tid)

    def prepare_target(self, tokenizer: Any) -> None:
        """English as the tokenizer's target language: its target mode then begins labels with the
        English code where the family's training did (mBART-50, M2M100, NLLB)."""
        if self.english is not None and hasattr(tokenizer, "tgt_lang"):
            tokenizer.tgt_lang = self.english

    def forced_bos_id(self, tokenizer: Any) -> Optional[int]:
        """The token ``generate`` must put first (the English code), or None."""
        if self.english is None or self.family not in ("mbart50", "m2m100", "nllb"):
            return None
        return self.token_id(tokenizer, self.english, "model.target_code")

    def apply(self, tokenizer: Any, pairs: list[Pair], lang: Optional[str]) -> list[Pair]:
        """Ready ``tokenizer`` for sources of ``lang`` (``src_lang``) and return the pairs with the
        source prefix, if any; the English side is left as it is."""
        code = self.code(lang)
        if self.family in ("mbart50", "m2m100", "nllb"):
            self.token_id(tokenizer, code, f"model.language_codes.{lang}")
            if tokenizer.src_lang != code:
                tokenizer.src_lang = code
        if self.prefix:
            prefix = self.prefix.format(language=code if code is not None else lang)
            return [Pair(prefix + p.src, p.en) for p in pairs]
        return pairs


def sinusoidal_tables(model: nn.Module) -> list[str]:
    """Names of the fixed sinusoidal position tables, parameters or buffers, of any architecture:
    Marian's is a parameter ``weight`` of an ``nn.Embedding`` subclass, M2M100/NLLB's a
    non-persistent buffer ``weights`` (docs/design.md, "Frozen positions")."""
    names = []
    for prefix, module in model.named_modules():
        if type(module).__name__.endswith("SinusoidalPositionalEmbedding"):
            names += [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)]
            names += [f"{prefix}.{n}" for n, _ in module.named_buffers(recurse=False)]
    return names


def freeze_sinusoidal(model: nn.Module) -> list[str]:
    """Freeze every sinusoidal table that is a parameter (``from_pretrained`` in transformers 5
    re-creates Marian's trainable) and return the names of all tables; buffers are never trained."""
    names = sinusoidal_tables(model)
    tensors = {**dict(model.named_parameters(remove_duplicate=False))}
    for name in names:
        if name in tensors:
            tensors[name].requires_grad_(False)
    return names


@contextlib.contextmanager
def source_language(holder: Any, lang: Optional[str]) -> Iterator[None]:
    """Set ``holder._source_lang`` for a block, then restore it (nesting works)."""
    before = holder._source_lang
    holder._source_lang = lang
    try:
        yield
    finally:
        holder._source_lang = before
