"""Greedy, batched generation of responses for evaluation.

Generation config (the same for every method, so Rouge-L numbers are comparable):

* greedy decoding: ``do_sample=False``, ``num_beams=1``; sampling knobs a checkpoint's own
  generation config may carry (temperature, top-p, top-k) are neutralised;
* at most ``max_new_tokens`` new tokens (128 by default, the FedKSeed/FedIT budget), stopping
  early at the tokenizer's EOS;
* prompts are encoded with the tokenizer's special tokens (a leading BOS for tokenizers that add
  one; fedtune's tiny tokenizer adds none) minus a trailing EOS the tokenizer may append, the
  same rule as :func:`fedtune.data.prompts.prompt_ids`, so generation conditions on exactly the
  prompt ids training used;
* batches are LEFT-padded (every row's last prompt token at the end) with the attention mask
  passed, so a prompt's output does not depend on the batch it is in;
* ``pad_token_id`` and ``eos_token_id`` are passed explicitly;
* only the new tokens are returned, decoded with ``skip_special_tokens=True`` and stripped;
* a prompt longer than the model's context leaves room for the new tokens by losing its oldest
  tokens (left truncation keeps the "### Response:" cue the answer follows); the number of
  prompts cut is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

T = TypeVar("T")


def _batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``batch_size`` elements."""
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int | None]:
    """(pad id, eos id) for generation; a missing pad falls back to EOS."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token; call ensure_pad_token")
    return int(pad_id), (int(eos_id) if eos_id is not None else None)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's leading specials but never a trailing EOS it appended."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        if len(ids) > len(tokenizer(prompt, add_special_tokens=False)["input_ids"]):
            ids = ids[:-1]
    return ids


def fit_context(model: PreTrainedModel, prompt_ids: Sequence[Sequence[int]],
                max_new_tokens: int) -> list[list[int]]:
    """Left-truncate prompts so prompt + ``max_new_tokens`` fits the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return [list(ids) for ids in prompt_ids]
    keep = limit - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens} leaves no room for a prompt in the "
                         f"model's {limit} positions")
    cut = sum(len(ids) > keep for ids in prompt_ids)
    if cut:
        log.warning("%d of %d prompts are longer than the %d tokens the model's context leaves "
                    "them; their oldest tokens were dropped", cut, len(prompt_ids), keep)
    return [list(ids)[-keep:] for ids in prompt_ids]


@torch.no_grad()
def greedy_generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of already-encoded prompts (new text only), in order.

    The tokenizer's padding side and the model's train/eval mode are restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id, eos_id = _special_ids(tokenizer)
    prompt_ids = fit_context(model, prompt_ids, max_new_tokens)
    was_training = model.training
    padding_side = tokenizer.padding_side
    outputs: list[str] = []
    try:
        model.eval()
        tokenizer.padding_side = "left"
        for batch in _batches(prompt_ids, batch_size):
            enc = tokenizer.pad(
                {"input_ids": [list(ids) for ids in batch]}, padding=True, return_tensors="pt"
            )
            input_ids = enc["input_ids"].to(model.device)  # (B, T), left-padded
            attention_mask = enc["attention_mask"].to(model.device)  # (B, T)
            generated = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            new_tokens = generated[:, input_ids.shape[1]:]  # (B, <= max_new_tokens)
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            outputs.extend(text.strip() for text in texts)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, stripped), in order, batched."""
    ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    return greedy_generate_ids(
        model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
