"""Decoding: greedy or beam search through ``generate``, batched by similar length, in input order.

    texts = generate(model, tokenizer, [src_ids, ...], pad_id=0, start_id=2, num_beams=4, max_new_tokens=128)
    hyps = translate_batch(family, model, ["Hyvää huomenta"], num_beams=4)   # with a progress bar

Sources are sorted by length and cut into blocks, so padding stays small and a tqdm bar advances
block by block; the output comes back in input order, detokenized by the SentencePiece decoder
(no Moses detokenizer involved). Empty source lines translate to empty lines.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch import nn

from ...errors import UserError
from .batching import pad_stack
from .model import restored_train_mode

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, sources: list[list[int]], pad_id: int, start_id: int, batch_size: int,
             num_beams: int, max_new_tokens: int) -> list[str]:
    """Detokenized translations of encoded ``sources``, batched by similar length, in input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    with restored_train_mode(model, False):
        for begin in range(0, len(order), batch_size):
            idx = order[begin : begin + batch_size]
            rows = [sources[i] for i in idx]
            generated = model.generate(
                input_ids=pad_stack(rows, pad_id).to(device),
                attention_mask=pad_stack([[1] * len(r) for r in rows], 0).to(device),
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                decoder_start_token_id=start_id,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                do_sample=False,
            )
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(idx, texts):
                out[i] = text.strip()
    return out


def translate_batch(family: Any, model: nn.Module, sources: list[str], batch_size: int = 32, num_beams: int = 1,
                    max_new_tokens: Optional[int] = None, progress: bool = True, desc: str = "translate") -> list[str]:
    """Detokenized translations of ``sources`` in input order, through :meth:`TranslationFamily.translate`,
    block by block with a progress bar; empty sources give empty lines."""
    from tqdm.auto import tqdm

    if batch_size < 1 or num_beams < 1:
        raise UserError(f"batch size and beam must be at least 1, got {batch_size} and {num_beams}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and max_new_tokens and max_new_tokens >= limit:
        # decoder positions past the table would index out of range
        log.warning("max_new_tokens %d lowered to %d (the model has %d positions)", max_new_tokens, limit - 1, limit)
        max_new_tokens = limit - 1
    out = [""] * len(sources)
    todo = sorted((i for i, s in enumerate(sources) if s.strip()), key=lambda i: len(sources[i]))
    block = batch_size * 4  # the family sorts within a block by token length; the bar moves per block
    disable = not progress or os.environ.get("METANMT_PROGRESS", "1") == "0"
    with tqdm(total=len(todo), desc=desc, unit="seg", disable=disable, leave=False) as bar:
        for begin in range(0, len(todo), block):
            idx = todo[begin : begin + block]
            texts = family.translate(model, [sources[i] for i in idx], batch_size=batch_size, num_beams=num_beams,
                                     max_new_tokens=max_new_tokens)
            for i, text in zip(idx, texts):
                out[i] = text
            bar.update(len(idx))
    return out
