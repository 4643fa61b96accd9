"""The translation model: a Marian Transformer built from the config or any ``AutoModelForSeq2SeqLM``
checkpoint, the settings every model needs here, saving and loading, and its forward pass.

    model = build_marian(model_cfg, tokenizer, num_beams=1, max_new_tokens=128)
    decoder_start = prepare(model, tokenizer)
    logits = forward(model, params, batch)             # params=None: the model's own tensors
    loss = token_cross_entropy(logits, batch["labels"])
    save(model, tokenizer, Path("runs/x"))             # AutoModelForSeq2SeqLM / AutoTokenizer load it
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.vocab import BOS_ID, EOS_ID, PAD_ID, check_special_ids, save_tokenizer
from ...errors import DataError
from .. import language_embeddings as lang_emb
from .batching import IGNORE
from .config import TranslationModelConfig
from .pretrained import freeze_sinusoidal


def torch_dtype(model_cfg: TranslationModelConfig) -> torch.dtype:
    return torch.float64 if model_cfg.dtype == "float64" else torch.float32


def attention(model_cfg: TranslationModelConfig, double_backward: bool) -> Optional[str]:
    """The ``attn_implementation`` to build or load with: eager when the run differentiates through
    gradients (second-order MAML; sdpa's kernels have no double backward), else the config's; ``auto``
    is None, transformers' default (sdpa where the model has it, else eager)."""
    chosen = model_cfg.attn_implementation
    if double_backward:
        if chosen == "sdpa":
            logging.getLogger(__name__).warning("model.attn_implementation: sdpa has no double backward; "
                                                "second-order MAML runs with eager attention")
        return "eager"
    return None if chosen == "auto" else chosen


def build_marian(model_cfg: TranslationModelConfig, tokenizer: Any, num_beams: int, max_new_tokens: int,
                 double_backward: bool = True) -> nn.Module:
    """A freshly initialized Marian model of the config's sizes, its vocabulary the tokenizer's
    (seeded by the caller); call :func:`prepare` on it. ``double_backward``: see :func:`attention`."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    m = model_cfg
    check_special_ids(tokenizer)
    config = MarianConfig(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=m.d_model,
        encoder_layers=m.encoder_layers,
        decoder_layers=m.decoder_layers,
        encoder_attention_heads=m.attention_heads,
        decoder_attention_heads=m.attention_heads,
        encoder_ffn_dim=m.ffn_dim,
        decoder_ffn_dim=m.ffn_dim,
        dropout=m.dropout,
        attention_dropout=m.attention_dropout,
        activation_dropout=m.activation_dropout,
        activation_function=m.activation_function,
        max_position_embeddings=m.max_positions,
        init_std=m.init_std,
        scale_embedding=m.scale_embedding,
        tie_word_embeddings=m.tie_embeddings,
        share_encoder_decoder_embeddings=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        # not the pad id: the pad row of the embedding gets no gradient (docs/design.md, "The decoder start token")
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
        attn_implementation=attention(m, double_backward),
    )
    model = MarianMTModel(config).to(torch_dtype(m))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
    )
    return model


def load_pretrained(name_or_path: str | Path, model_cfg: TranslationModelConfig, local_files_only: bool = False,
                    double_backward: bool = True) -> nn.Module:
    """``AutoModelForSeq2SeqLM.from_pretrained`` with the config's attention (:func:`attention`) and
    dtype; call :func:`prepare` on it."""
    from transformers import AutoModelForSeq2SeqLM

    kwargs = {"local_files_only": True} if local_files_only else {}
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(
            str(name_or_path), attn_implementation=attention(model_cfg, double_backward), dtype=torch_dtype(model_cfg), **kwargs
        )
    except OSError as exc:  # neither a local checkpoint nor a Hub model that can be fetched now
        what = f"{name_or_path}: cannot load the saved model" if local_files_only else \
            f"model.pretrained: cannot load {name_or_path!r} (a folder with config.json and weights, or a Hub name while online)"
        raise DataError(f"{what}: {str(exc).splitlines()[0]}") from None


def load_pretrained_tokenizer(name_or_path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local folder or Hub name, with the error naming the key."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as exc:
        raise DataError(f"model.pretrained: cannot load the tokenizer of {name_or_path!r}: {str(exc).splitlines()[0]}") from None


def prepare(model: nn.Module, tokenizer: Any) -> int:
    """Settings every model needs here, fresh or loaded; returns the decoder start id.

    ``padding_idx`` only masks the gradient of the pad row; a checkpoint whose decoder starts
    from the pad token (Marian's convention) needs that row's gradient for correct
    meta-gradients (docs/design.md, "The decoder start token"), so the mask is removed. Forward
    results are unchanged. Sinusoidal position tables are frozen, loaded or fresh.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.padding_idx = None
    # sinusoidal tables are frozen at construction, but from_pretrained (transformers 5) re-creates
    # Marian's with requires_grad=True: freeze them again; M2M100/NLLB keep theirs as a buffer
    # (docs/design.md, "Frozen positions")
    freeze_sinusoidal(model)
    if len(tokenizer) > model.config.vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} pieces but the model only {model.config.vocab_size} embeddings")
    start = model.config.decoder_start_token_id
    return BOS_ID if start is None else int(start)


def save(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """``model.save_pretrained`` + the tokenizer, so ``AutoModelForSeq2SeqLM`` and
    ``AutoTokenizer.from_pretrained(directory)`` load the folder offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP if the caller did not
    lang_emb.save_pretrained(model, directory)  # save_pretrained + the language tables, if any
    save_tokenizer(tokenizer, directory)


def forward(model: nn.Module, params: Optional[dict[str, Tensor]], batch: dict[str, Tensor]) -> Tensor:
    """Logits of a teacher-forced batch, with the model's tensors replaced by ``params`` (None: its own)."""
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": batch["decoder_input_ids"],
        "use_cache": False,
        "return_dict": True,
    }
    with lang_emb.batch_language(model, batch):  # language-embeddings hook: the batch's lang_ids
        if params is None:
            return model(**inputs).logits
        # tie_weights: one entry for model.shared.weight also replaces the tied decoder/output weights
        return torch.func.functional_call(model, params, args=(), kwargs=inputs, tie_weights=True, strict=False).logits


def token_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy over the real target tokens (``IGNORE`` labels left out): their mean, or sum."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


@contextlib.contextmanager
def restored_train_mode(model: nn.Module, training: Optional[bool] = None) -> Iterator[nn.Module]:
    """Set the model's train/eval mode for a block (``training``; None: leave it), then restore the mode it had."""
    was_training = model.training
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)
