"""The Alpaca-style prompt template and tokenisation with the loss on response tokens only.

The template is the one Alpaca (and FedKSeed's reference) uses; the model sees
``prompt + response + EOS`` and the labels are ``-100`` on every prompt token, so the loss is the
mean cross-entropy over the response tokens (and EOS) only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedtune.data.records import Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(record: Record) -> str:
    """The prompt text for ``record``: everything the model conditions on, up to the response."""
    template = _WITH_INPUT if record.input.strip() else _NO_INPUT
    return template.format(instruction=record.instruction, input=record.input)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + response (+ EOS) and labels with the prompt masked out."""

    input_ids: list[int]
    labels: list[int]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    """Token ids of ``text``, with or without the tokenizer's special tokens."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(record: Record, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the prompt: with the tokenizer's leading specials (BOS), never a trailing EOS.

    Some tokenizers' post-processors append EOS to every encoding; an EOS between prompt and
    response would teach the model to stop before answering, so a trailing EOS the tokenizer
    *added* (the encoding with specials is longer than without) is stripped. Generation uses the
    same ids, so train and eval condition on identical prompts.
    """
    text = format_prompt(record)
    ids = _encode(tokenizer, text, special=True)
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        if len(ids) > len(_encode(tokenizer, text, special=False)):
            ids = ids[:-1]
    return ids


def tokenize_record(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenizedExample | None:
    """``prompt + response + EOS`` ids, labels ``-100`` on the prompt, truncated from the right.

    input_ids = tok(prompt, specials) ⧺ tok(output, no specials) ⧺ [EOS], cut to ``max_length``;
    labels    = [-100] * len(prompt ids) ⧺ the response ids ⧺ [EOS], cut the same way.
    Returns None when the prompt alone fills ``max_length`` (no response token would be trained);
    :func:`tokenize_records` counts and logs those.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token first")
    prompt = prompt_ids(record, tokenizer)
    response = _encode(tokenizer, record.output, special=False) + [int(eos)]
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    if len(prompt) >= max_length:
        return None
    return TokenizedExample(input_ids=input_ids, labels=labels)


def tokenize_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int,
    *, quiet: bool = False,
) -> list[TokenizedExample]:
    """:func:`tokenize_record` over ``records``, dropping (and logging) prompt-only examples.

    ``quiet`` leaves the logging to the caller (which then counts ``len(records) - len(out)``),
    e.g. to report one line for 200 clients rather than one per client.
    """
    out: list[TokenizedExample] = []
    for record in records:
        ex = tokenize_record(record, tokenizer, max_length)
        if ex is not None:
            out.append(ex)
    dropped = len(records) - len(out)
    if dropped and not quiet:
        logger.warning(
            "dropped %d of %d records: the prompt alone fills max_length=%d, so no response "
            "token would be trained (raise data.max_length)", dropped, len(records), max_length,
        )
    return out


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example.

    Returns LongTensors ``input_ids``, ``attention_mask`` (1 on tokens, 0 on padding) and
    ``labels`` (``-100`` on padding, so padding never enters the loss), each of shape (B, T).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
