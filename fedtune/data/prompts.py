"""Prompt templates and tokenisation with the loss on the answer tokens only.

Two templates (``data.template``):

* ``alpaca``: the template Alpaca (and FedKSeed's reference) uses; the model sees
  ``prompt + response + EOS``;
* ``chat``: the tokenizer's own chat template (``apply_chat_template``) with one user turn
  (instruction, a blank line, then the input when there is one) and, for training, the assistant
  turn: ``render([user], add_generation_prompt=True) + response + END_OF_TURN``, where the
  end-of-turn token is the first token the template writes after an assistant message
  (``<|im_end|>`` for ChatML); the template's text after it (a newline) is not trained;
* ``auto`` (the default): ``chat`` when the tokenizer has a chat template, ``alpaca`` otherwise.

Either way the labels are ``-100`` on every prompt token, so the loss is the mean cross-entropy
over the answer tokens and the closing EOS / end-of-turn token only, and generation stops at that
token. Chat prompts are encoded without the tokenizer's added specials (a chat template writes its
own, e.g. Llama 3's ``<|begin_of_text|>``); Alpaca prompts with them, minus a trailing EOS.

Too long an example keeps its answer: the prompt loses tokens from its middle (the template's head
and the instruction at the start, the last of the input and the answer cue at the end stay), down
to half of ``max_length``; only then is the answer cut (:func:`fit_example`).
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
TEMPLATES = ("auto", "alpaca", "chat")

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_MARK = "\x00fedtune-answer\x00"  # a stand-in answer, to find where the template closes a turn


def format_prompt(record: Record) -> str:
    """The Alpaca prompt text for ``record``: everything the model conditions on."""
    template = _WITH_INPUT if record.input.strip() else _NO_INPUT
    return template.format(instruction=record.instruction, input=record.input)


def user_message(record: Record) -> str:
    """The user turn of the chat template: the instruction, then the input after a blank line."""
    if record.input.strip():
        return f"{record.instruction}\n\n{record.input}"
    return record.instruction


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> str:
    """'alpaca' or 'chat' for ``template``; 'chat' without a chat template is refused."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise ValueError("data.template = 'chat' but the tokenizer has no chat template; use "
                         "'alpaca' or 'auto'")
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {list(TEMPLATES)}")
    return template


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
            generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> int:
    """The token that ends an answer: EOS for Alpaca, the chat template's end of turn for chat.

    Derived each call from the tokenizer as it is now (one render and one short encoding), so a
    tokenizer whose template changes is never answered from a stale cache; callers that tokenise
    many records compute it once (:func:`tokenize_records`).
    """
    eos = tokenizer.eos_token_id
    if resolve_template(tokenizer, template) == "alpaca":
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token first")
        return int(eos)
    user = {"role": "user", "content": "Hi"}
    full = _render(tokenizer, [user, {"role": "assistant", "content": _MARK}], False)
    ids = _encode(tokenizer, full[full.index(_MARK) + len(_MARK):], special=False)
    if ids and ids[0] in set(tokenizer.all_special_ids):
        return int(ids[0])
    if eos is not None:
        return int(eos)
    raise ValueError("the chat template closes a turn with no special token and the tokenizer "
                     "has no EOS: no token can end an answer")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> list[int]:
    """Token ids that end generation: the end-of-turn token and EOS (once each)."""
    ids = [end_of_turn_id(tokenizer, template)]
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def middle_cut(ids: Sequence[int], keep: int) -> list[int]:
    """``ids`` shortened to ``keep`` tokens by dropping its middle (head and tail stay)."""
    if len(ids) <= keep:
        return list(ids)
    if keep < 1:
        return []
    head = keep // 2
    return list(ids[:head]) + list(ids[len(ids) - (keep - head):])


def fit_example(prompt: Sequence[int], response: Sequence[int], max_length: int
                ) -> tuple[list[int], list[int]]:
    """(prompt, response) within ``max_length`` tokens, the answer kept before the prompt.

    The prompt keeps max(max_length - len(response), max_length // 2) tokens (all, if it is
    shorter) by :func:`middle_cut`; the response is then cut from the right to what is left,
    which is at least ``max_length - max_length // 2`` tokens.
    """
    if len(prompt) + len(response) <= max_length:
        return list(prompt), list(response)
    keep = min(len(prompt), max(max_length - len(response), max_length // 2))
    return middle_cut(prompt, keep), list(response[:max_length - keep])


def generation_prompt_budget(max_length: int, max_new_tokens: int) -> int:
    """Prompt tokens kept at evaluation: what training keeps for an answer of the full budget."""
    return max(max_length - max_new_tokens, max_length // 2)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + response (+ EOS) and labels with the prompt masked out."""

    input_ids: list[int]
    labels: list[int]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    """Token ids of ``text``, with or without the tokenizer's special tokens."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(record: Record, tokenizer: PreTrainedTokenizerBase,
               template: str = "auto") -> list[int]:
    """Ids of the prompt in ``template`` (see the module docstring), never a trailing EOS.

    Alpaca: with the tokenizer's leading specials (BOS). Some tokenizers' post-processors append
    EOS to every encoding; an EOS between prompt and response would teach the model to stop
    before answering, so a trailing EOS the tokenizer *added* (the encoding with specials is
    longer than without) is stripped. Chat: the rendered user turn and the assistant cue, encoded
    without added specials. Generation uses the same ids, so train and eval condition on
    identical prompts.
    """
    if resolve_template(tokenizer, template) == "chat":
        text = _render(tokenizer, [{"role": "user", "content": user_message(record)}], True)
        return _encode(tokenizer, text, special=False)
    text = format_prompt(record)
    ids = _encode(tokenizer, text, special=True)
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        if len(ids) > len(_encode(tokenizer, text, special=False)):
            ids = ids[:-1]
    return ids


def tokenize_record(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int, template: str = "auto",
    *, end: int | None = None,
) -> TokenizedExample:
    """``prompt + response + END``, labels ``-100`` on the prompt, fitted by :func:`fit_example`.

    input_ids = prompt ids ⧺ tok(output, no specials) ⧺ [END], END = EOS (Alpaca) or the chat
    template's end-of-turn token; labels = [-100] * len(prompt ids) ⧺ the response ids ⧺ [END].
    ``end`` may be passed when already known (:func:`end_of_turn_id`).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if end is None:
        end = end_of_turn_id(tokenizer, template)
    prompt, response = fit_example(
        prompt_ids(record, tokenizer, template),
        _encode(tokenizer, record.output, special=False) + [end], max_length)
    return TokenizedExample(input_ids=prompt + response,
                            labels=[IGNORE_INDEX] * len(prompt) + response)


def tokenize_records(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int,
    *, quiet: bool = False, template: str = "auto",
) -> list[TokenizedExample]:
    """:func:`tokenize_record` over ``records``; logs how many had to be shortened.

    ``quiet`` leaves the logging to the caller, e.g. to report one line for 200 clients rather
    than one per client.
    """
    end = end_of_turn_id(tokenizer, template)  # once, not per record
    out = [tokenize_record(record, tokenizer, max_length, template, end=end) for record in records]
    cut = sum(len(ex.input_ids) >= max_length for ex in out)
    if cut and not quiet:
        logger.info("%d of %d examples reach max_length=%d: their prompts lost middle tokens "
                    "(the answer is kept first)", cut, len(records), max_length)
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
