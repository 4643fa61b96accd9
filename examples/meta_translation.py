#!/usr/bin/env python
"""Meta-train a translation model inside a transformers pipeline, then fine-tune it on a
low-resource language and score it with sacreBLEU (in the style of transformers' run_translation.py).

    python examples/meta_translation.py --data_root ../shared/data/l10n --output_dir runs/hf-meta \\
        --max_steps 400 --meta_algorithm fomaml --inner_steps 3 --inner_lr 3e-4 --inner_optimizer adam \\
        --support_in_outer --meta_batch_size 4 --support_tokens 500 --query_tokens 500 --learning_rate 5e-4 \\
        --finetune_language ro --finetune_budget 4k

The corpus layout is the l10n one (gzip TSV, header ``lang<TAB>src<TAB>en<TAB>origin``, no quoting):
``meta_train/{lang}.tsv.gz`` (one task per file), ``finetune/{lang}.{budget}.tsv.gz`` and
``dev/{lang}.tsv.gz`` or ``test/{lang}.tsv.gz``. Everything goes through ``datasets``; the only
metanmt-specific lines are the MetaSeq2SeqTrainer and its arguments (and, without ``--tokenizer``,
the SentencePiece vocabulary trained on the corpus as ``metanmt meta-train`` does). Every
``Seq2SeqTrainingArguments`` flag applies to the meta-training stage; the fine-tuning stage is a plain
``Seq2SeqTrainer`` with the ``--finetune_*`` settings. Results go to ``{output_dir}/results.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import sacrebleu
from datasets import concatenate_datasets, load_dataset
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, GenerationConfig, HfArgumentParser,
                          MarianConfig, MarianMTModel, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed)

from metanmt.data.vocab import BOS_ID, EOS_ID, PAD_ID, cached_vocab
from metanmt.hf import MetaSeq2SeqTrainer, MetaSeq2SeqTrainingArguments

logger = logging.getLogger("meta_translation")


@dataclass
class DataArguments:
    data_root: str = field(metadata={"help": "The l10n corpus folder (meta_train/, finetune/, dev/, test/)."})
    train_languages: list[str] = field(default_factory=list, metadata={"help": "Meta-training languages (default: every meta_train/*.tsv.gz)."})
    max_train_samples_per_language: Optional[int] = field(default=None, metadata={"help": "Keep the first N pairs of each language (quick runs)."})
    finetune_language: str = field(default="ro", metadata={"help": "The low-resource language to fine-tune on."})
    finetune_budget: str = field(default="4k", metadata={"help": "Fills finetune/{lang}.{budget}.tsv.gz."})
    eval_split: str = field(default="dev", metadata={"help": "dev or test: the file the fine-tuned model is scored on."})
    max_eval_samples: Optional[int] = field(default=200, metadata={"help": "Score the first N segments (None: all)."})
    max_source_length: int = 128
    max_target_length: int = 128


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "A seq2seq checkpoint; default: a fresh Marian model of the sizes below."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "A saved tokenizer; default: SentencePiece trained on the meta-training text."})
    vocab_size: int = 8000
    d_model: int = 256
    layers: int = 3
    attention_heads: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1


@dataclass
class FinetuneArguments:
    finetune_epochs: float = 10.0
    finetune_max_steps: int = -1
    finetune_learning_rate: float = 3e-4
    finetune_batch_size: int = 32


def read_tsv(path: Path):
    """One l10n TSV file as a datasets.Dataset (no quoting, no NA parsing: 'NA' is a word here)."""
    return load_dataset("csv", data_files=str(path), delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                        split="train")


def build_model(model_args: ModelArguments, tokenizer, max_positions: int):
    if model_args.model_name_or_path:
        # eager attention: second-order MAML needs double backward, which sdpa on CPU lacks
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, attn_implementation="eager")
    else:
        config = MarianConfig(
            vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=model_args.d_model,
            encoder_layers=model_args.layers, decoder_layers=model_args.layers,
            encoder_attention_heads=model_args.attention_heads, decoder_attention_heads=model_args.attention_heads,
            encoder_ffn_dim=model_args.ffn_dim, decoder_ffn_dim=model_args.ffn_dim, dropout=model_args.dropout,
            activation_function="swish", max_position_embeddings=max_positions, scale_embedding=True,
            tie_word_embeddings=True, share_encoder_decoder_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
            # not the pad token: the pad row of the embedding would get no gradient
            decoder_start_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else BOS_ID,
            forced_eos_token_id=None, attn_implementation="eager",
        )
        model = MarianMTModel(config)
        model.generation_config = GenerationConfig(
            decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    # transformers re-creates sinusoidal position tables as trainable on load; they are constants
    for module in model.modules():
        if type(module).__name__.endswith("SinusoidalPositionalEmbedding"):
            module.weight.requires_grad_(False)
    return model


def main() -> int:
    parser = HfArgumentParser((DataArguments, ModelArguments, FinetuneArguments, MetaSeq2SeqTrainingArguments))
    data_args, model_args, ft_args, meta_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(meta_args.seed)
    root = Path(data_args.data_root)
    langs = data_args.train_languages or sorted(p.name[: -len(".tsv.gz")] for p in (root / "meta_train").glob("*.tsv.gz"))
    if not langs:
        print(f"{root / 'meta_train'}: no *.tsv.gz files", file=sys.stderr)
        return 2

    # -- data: one dataset, the task column is the file's language (the lang column keeps regional tags)
    parts = []
    for lang in langs:
        part = read_tsv(root / "meta_train" / f"{lang}.tsv.gz")
        if data_args.max_train_samples_per_language:
            part = part.select(range(min(len(part), data_args.max_train_samples_per_language)))
        parts.append(part.remove_columns("lang").add_column("lang", [lang] * len(part)))
    raw_train = concatenate_datasets(parts)
    finetune_file = root / "finetune" / f"{data_args.finetune_language}.{data_args.finetune_budget}.tsv.gz"
    eval_file = root / data_args.eval_split / f"{data_args.finetune_language}.tsv.gz"
    raw_finetune, raw_eval = read_tsv(finetune_file), read_tsv(eval_file)
    if data_args.max_eval_samples:
        raw_eval = raw_eval.select(range(min(len(raw_eval), data_args.max_eval_samples)))

    if model_args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer)
    elif model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    else:  # the shared SentencePiece vocabulary of metanmt meta-train (both sides, cached by a hash of the text)
        texts = [t for column in ("src", "en") for t in raw_train[column]]
        tokenizer = cached_vocab(texts, model_args.vocab_size, max_sentences=300000)
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (PAD_ID, EOS_ID)

    def preprocess(batch):
        inputs = tokenizer(batch["src"], max_length=data_args.max_source_length, truncation=True)
        inputs["labels"] = tokenizer(text_target=batch["en"], max_length=data_args.max_target_length, truncation=True)["input_ids"]
        return inputs

    keep_lang = [c for c in raw_train.column_names if c != "lang"]
    train = raw_train.map(preprocess, batched=True, remove_columns=keep_lang, desc="tokenizing meta-training data")
    finetune = raw_finetune.map(preprocess, batched=True, remove_columns=raw_finetune.column_names)
    evaluation = raw_eval.map(preprocess, batched=True, remove_columns=raw_eval.column_names)

    def compute_metrics(prediction):
        preds = np.where(prediction.predictions != -100, prediction.predictions, tokenizer.pad_token_id)
        labels = np.where(prediction.label_ids != -100, prediction.label_ids, tokenizer.pad_token_id)
        hyps = [s.strip() for s in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [s.strip() for s in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}

    max_positions = max(512, data_args.max_source_length, data_args.max_target_length)
    model = build_model(model_args, tokenizer, max_positions)
    collator = DataCollatorForSeq2Seq(tokenizer, model=model)

    # -- 1. meta-training: the only lines that differ from a plain Seq2SeqTrainer pipeline
    meta_trainer = MetaSeq2SeqTrainer(model=model, args=meta_args, train_dataset=train, processing_class=tokenizer,
                                      data_collator=collator)
    meta_result = meta_trainer.train(resume_from_checkpoint=meta_args.resume_from_checkpoint)
    meta_dir = Path(meta_args.output_dir) / "meta"
    meta_trainer.save_model(str(meta_dir))

    # -- 2. fine-tuning on the low-resource language: a plain Seq2SeqTrainer, then sacreBLEU
    ft_args = Seq2SeqTrainingArguments(
        output_dir=str(Path(meta_args.output_dir) / "finetune"), num_train_epochs=ft_args.finetune_epochs,
        max_steps=ft_args.finetune_max_steps, learning_rate=ft_args.finetune_learning_rate,
        per_device_train_batch_size=ft_args.finetune_batch_size, per_device_eval_batch_size=ft_args.finetune_batch_size,
        predict_with_generate=True, generation_max_length=data_args.max_target_length, generation_num_beams=1,
        save_strategy="no", report_to=meta_args.report_to, seed=meta_args.seed, use_cpu=meta_args.use_cpu,
        bf16=meta_args.bf16, logging_steps=meta_args.logging_steps, disable_tqdm=meta_args.disable_tqdm,
    )
    ft_trainer = Seq2SeqTrainer(model=meta_trainer.model, args=ft_args, train_dataset=finetune, eval_dataset=evaluation,
                                processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics)
    zero_shot = ft_trainer.evaluate(metric_key_prefix="zero_shot")
    ft_trainer.train()
    scores = ft_trainer.evaluate()
    ft_trainer.save_model(str(Path(meta_args.output_dir) / "finetuned"))

    results = {
        "meta_algorithm": meta_args.meta_algorithm, "meta_steps": meta_result.global_step,
        "meta_train_loss": meta_result.training_loss, "train_languages": langs,
        "finetune_language": data_args.finetune_language, "finetune_budget": data_args.finetune_budget,
        "finetune_pairs": len(finetune), "eval_file": str(eval_file), "eval_segments": len(evaluation),
        "zero_shot": {k: zero_shot[f"zero_shot_{k}"] for k in ("loss", "bleu", "chrf")},
        "finetuned": {k: scores[f"eval_{k}"] for k in ("loss", "bleu", "chrf")},
    }
    if meta_trainer.is_world_process_zero():
        os.makedirs(meta_args.output_dir, exist_ok=True)
        with open(Path(meta_args.output_dir) / "results.json", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
