"""The keys of a translation task suite (``tasks/*.yaml``, a run config's ``task:``) and of its
``model:``; the schema :func:`metanmt.config.from_dict` checks, with no torch import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ...data.corpus import Columns
from ..language_embedding_config import LanguageEmbeddingConfig

SPLITS = ("train", "dev", "test")


@dataclass
class TranslationTaskConfig:
    """The keys of a translation task suite (``tasks/*.yaml``) and of a run config's ``task:``.

    File patterns are relative to ``data.root`` and may use ``{lang}`` (the task language),
    ``{side}`` (Moses: the language of one side, ``{lang}`` or ``target_language``), ``{budget}``
    (fine-tuning sets) and globs (``locale/{lang}/LC_MESSAGES/*.po``). A pattern without
    ``{lang}`` names one file holding several languages, grouped by the ``columns.lang`` column.
    """

    # -- where the data is
    source: Literal["files", "cldr", "datasets"] = "files"
    format: Literal["auto", "tsv", "jsonl", "moses", "gettext"] = "auto"
    train_languages: list[str] = field(default_factory=list)
    dev_languages: list[str] = field(default_factory=list)
    test_languages: list[str] = field(default_factory=list)
    train_path: str = "meta_train/{lang}.tsv.gz"
    dev_path: str = "dev/{lang}.tsv.gz"
    test_path: str = "test/{lang}.tsv.gz"
    finetune_path: str = "finetune/{lang}.{budget}.tsv.gz"  # "" : split the dev set instead
    target_language: str = "en"
    columns: Columns = field(default_factory=Columns)  # TSV header fields, JSON keys, dataset columns; lang: null when absent
    bad_rows: Literal["raise", "skip"] = "raise"  # skip: count bad rows in the log instead of stopping
    dataset: Optional[str] = None  # source=datasets: "json" / "csv" / "parquet" (local files) or a hub name
    dataset_config: Optional[str] = None  # hub config name, may use {lang} (e.g. "{lang}-en")
    dataset_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation", "test": "test"})
    # -- episodes
    support_tokens: int = 1000  # target (English) tokens per support batch, </s> included
    query_tokens: int = 1000
    # An episode is a run of consecutive pairs of the language's length-sorted order, from a random
    # start (docs/design.md, "Episode batches"). Both defaults are what runs made before these keys
    # existed use; new configs should set `tokens` and `length`.
    # episode_order: "tokens" sorts by subword counts, target then source (encodes the language once,
    # a few seconds, the first time it is sampled) and pads ~1.6x fewer positions than "chars"
    episode_order: Literal["chars", "tokens"] = "chars"
    # episode_start: "length" draws the start in proportion to its pair's target tokens, so every pair
    # is equally likely to be trained on, as in an epoch; "uniform" favours short pairs (a pair's
    # chance is ~1/its length: episodes' pairs average 7.8 English tokens where the corpus has 13.4)
    episode_start: Literal["uniform", "length"] = "uniform"
    task_sampling: Literal["uniform", "temperature"] = "uniform"
    temperature: float = 5.0  # p(language) ~ pairs ** (1 / temperature); 1 = proportional to data size
    max_source_length: int = 128
    max_target_length: int = 128
    # -- vocabulary
    vocab_size: int = 8000
    vocab_max_sentences: int = 300000
    vocab: Optional[str] = None  # a folder with a saved tokenizer to reuse instead of training one
    vocab_cache: bool = True  # and the token counts of the episodes' length order (batching.token_lengths)
    # -- validation during meta-training: fine-tune a copy on the dev language, then score its dev set
    dev_budget: str = "4k"  # fills {budget} in finetune_path
    dev_finetune_steps: int = 20
    dev_finetune_lr: float = 3e-4
    dev_finetune_tokens: int = 1000
    dev_adapt: list[str] = field(default_factory=lambda: ["*"])
    dev_max_segments: int = 200  # first N dev segments are translated and scored
    dev_metric: Literal["bleu", "chrf", "loss"] = "bleu"  # the `score` that picks the best checkpoint
    dev_seed: int = 0
    num_beams: int = 1
    max_new_tokens: int = 128


@dataclass
class LoraSettings:
    """``model.lora``: LoRA adapters (through ``peft``) become the meta-learned and adapted parameters,
    the base model stays frozen. ``target_modules`` null: peft's default for the architecture (T5:
    ``q`` and ``v``), and ``q_proj`` / ``v_proj`` for Marian, mBART, M2M100 and NLLB, which peft has
    no default for."""

    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # 0 keeps the meta-gradient deterministic (and exact against finite differences)
    target_modules: Optional[list[str]] = None  # module names (suffixes) that get adapters
    modules_to_save: list[str] = field(default_factory=list)  # whole modules trained (and saved) with the adapters


@dataclass
class TranslationModelConfig:
    """The keys of a run config's ``model:`` for translation: a Marian Transformer from these sizes,
    or ``pretrained:`` a local folder or Hub name of any ``AutoModelForSeq2SeqLM`` checkpoint with its
    tokenizer (then the sizes are ignored; Marian, mBART-50, M2M100, NLLB, T5/mT5:
    :mod:`~.pretrained`)."""

    pretrained: Optional[str] = None
    # corpus language id -> the checkpoint's source code (pt: pt_XX / pt / por_Latn; T5: the name in the
    # prefix), over the defaults of the checkpoint's family (pretrained.LANGUAGE_CODES)
    language_codes: dict[str, str] = field(default_factory=dict)
    target_code: Optional[str] = None  # the checkpoint's English code; None: the family's (en_XX, en, eng_Latn); "": none
    source_prefix: Optional[str] = None  # prepended to every source, may use {language}; None: T5's "translate {language} to English: " for T5, else none
    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 3
    attention_heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "swish"
    tie_embeddings: bool = True
    scale_embedding: bool = True
    max_positions: int = 512
    init_std: float = 0.02
    # eager (the default) everywhere: every committed result was made with it, and sdpa's logits differ
    # by rounding. auto: eager where gradients are differentiated (second-order MAML: sdpa has no double
    # backward, docs/design.md, "Attention and double backward"), else transformers' default, sdpa
    attn_implementation: Literal["auto", "eager", "sdpa"] = "eager"
    dtype: Literal["float32", "float64"] = "float32"
    # MetaNMT's per-language tables + universal lexical representation (docs/language_embeddings.md)
    language_embeddings: LanguageEmbeddingConfig = field(default_factory=LanguageEmbeddingConfig)
    # fnmatch patterns over parameter names: frozen tensors are neither meta-learned, adapted nor fine-tuned
    freeze: list[str] = field(default_factory=list)
    lora: Optional[LoraSettings] = None  # adapters as the meta-parameters (metanmt/tasks/translation/adapters.py)
