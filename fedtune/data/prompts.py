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
token.

A chat record (``Record.messages``: system, user and assistant turns) is trained on *every*
assistant turn: the conversation is cut into pieces, each assistant answer (plus its end token)
trained and everything between (system prompt, user turns, the template's role headers) masked.
With the chat template, piece k is ``render(turns before answer k, add_generation_prompt=True)``
minus what the pieces before it cover, so the ids are the template's own rendering; a template
that renders earlier turns differently once more follow is refused. Without one (``alpaca``), the
conversation is laid out as the system prompt (else Alpaca's preamble), then for each user turn
``### Instruction:`` and ``### Response:``, each answer followed by EOS; a one-turn conversation
without a system prompt is exactly the Alpaca prompt of a record without input. The prompt of a
chat record (for generation and evaluation, whose reference is the last answer) is everything
before its last answer.

Chat prompts are encoded without the tokenizer's added specials (a chat template writes its own,
e.g. Llama 3's ``<|begin_of_text|>``); Alpaca prompts with them, minus a trailing EOS.

Too long an example keeps its answer: the prompt loses tokens from its middle (the template's head
and the instruction at the start, the last of the input and the answer cue at the end stay), down
to half of ``max_length``; only then is the answer cut (:func:`fit_example`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from fedtune.data.records import Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEMPLATES = ("auto", "alpaca", "chat")
T = TypeVar("T")

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.")
_NO_INPUT = _PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
_TURN = "### Instruction:\n{content}\n\n### Response:\n"
_MARK = "\x00fedtune-answer\x00"  # a stand-in answer, to find where the template closes a turn

Segments = list[tuple[str, bool]]  # (text, trained): a conversation cut at its answers


def alpaca_segments(messages: Sequence[tuple[str, str]]) -> Segments:
    """A conversation in the Alpaca layout (module docstring), cut into (text, trained) pieces
    that alternate prompt, answer, prompt, ..., answer."""
    head = messages[0][1] if messages and messages[0][0] == "system" else _PREAMBLE
    out: Segments = []
    text = head + "\n\n"
    for role, content in messages:
        if role == "user":
            text += _TURN.format(content=content)
        elif role == "assistant":
            out += [(text, False), (content, True)]
            text = "\n\n"
    return out


def format_prompt(record: Record) -> str:
    """The Alpaca prompt text for ``record``: everything the model conditions on."""
    if record.messages:
        return "".join(text for text, _ in alpaca_segments(record.messages)[:-1])
    template = _WITH_INPUT if record.input.strip() else _NO_INPUT
    return template.format(instruction=record.instruction, input=record.input)


def record_text(record: Record) -> str:
    """The whole Alpaca text of ``record``, prompt and answers (e.g. to train a tokenizer on)."""
    if record.messages:
        return "".join(text for text, _ in alpaca_segments(record.messages))
    return format_prompt(record) + record.output


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


def middle_cut(ids: Sequence[T], keep: int) -> list[T]:
    """``ids`` shortened to ``keep`` tokens by dropping its middle (head and tail stay)."""
    if len(ids) <= keep:
        return list(ids)
    if keep < 1:
        return []
    head = keep // 2
    return list(ids[:head]) + list(ids[len(ids) - (keep - head):])


def fit_example(prompt: Sequence[T], response: Sequence[int], max_length: int
                ) -> tuple[list[T], list[int]]:
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


def _encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, template: str) -> list[int]:
    """Ids of prompt text that opens a sequence: chat without added specials; Alpaca with them
    but never with a trailing EOS the tokenizer added (see :func:`prompt_ids`)."""
    if template == "chat":
        return _encode(tokenizer, text, special=False)
    ids = _encode(tokenizer, text, special=True)
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        if len(ids) > len(_encode(tokenizer, text, special=False)):
            ids = ids[:-1]
    return ids


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: Sequence[tuple[str, str]],
                  end: int) -> Segments:
    """A conversation rendered by the tokenizer's chat template, cut into (text, trained) pieces
    (module docstring). ``end`` is the end-of-turn token (:func:`end_of_turn_id`): its text
    after an answer belongs to neither piece, the token itself is appended to the answer."""
    turns = [{"role": role, "content": content} for role, content in messages]
    end_text = str(tokenizer.decode([end]))
    out: Segments = []
    done = ""  # the rendered text the pieces so far stand for
    for i, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        prefix = _render(tokenizer, turns[:i], True)
        full = _render(tokenizer, turns[:i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError(f"the chat template renders the turns before assistant turn "
                             f"{i + 1} differently once more turns follow, so the conversation "
                             "cannot be trained turn by turn; use data.template = 'alpaca'")
        rest = full[len(prefix):]
        answer = content if rest.startswith(content) else content.strip()
        if not rest.startswith(answer):
            raise ValueError(f"the chat template does not write assistant turn {i + 1} as it "
                             "is; use data.template = 'alpaca'")
        out += [(prefix[len(done):], False), (answer, True)]
        done = prefix + answer + (end_text if rest[len(answer):].startswith(end_text) else "")
    return out


def _conversation(record: Record, tokenizer: PreTrainedTokenizerBase, template: str, end: int
                  ) -> tuple[list[tuple[int, int]], list[int]]:
    """A chat record as ``(context, answer)``: (id, label) pairs of everything before its last
    answer (earlier answers labelled, the rest -100) and the last answer's ids plus ``end``."""
    chat = resolve_template(tokenizer, template) == "chat"
    pieces = (chat_segments(tokenizer, record.messages, end) if chat
              else alpaca_segments(record.messages))
    context: list[tuple[int, int]] = []
    answer: list[int] = []
    for k, (text, trained) in enumerate(pieces):
        if trained:
            answer = _encode(tokenizer, text, special=False) + [end]
            if k < len(pieces) - 1:
                context += [(i, i) for i in answer]
        elif k == 0:
            context += [(i, IGNORE_INDEX) for i in
                        _encode_prompt(tokenizer, text, "chat" if chat else "alpaca")]
        else:
            context += [(i, IGNORE_INDEX) for i in _encode(tokenizer, text, special=False)]
    return context, answer


def prompt_ids(record: Record, tokenizer: PreTrainedTokenizerBase,
               template: str = "auto") -> list[int]:
    """Ids of the prompt in ``template`` (see the module docstring), never a trailing EOS.

    Alpaca: with the tokenizer's leading specials (BOS). Some tokenizers' post-processors append
    EOS to every encoding; an EOS between prompt and response would teach the model to stop
    before answering, so a trailing EOS the tokenizer *added* (the encoding with specials is
    longer than without) is stripped. Chat: the rendered user turn and the assistant cue, encoded
    without added specials. A chat record's prompt is its conversation before the last answer.
    Generation uses the same ids, so train and eval condition on identical prompts.
    """
    resolved = resolve_template(tokenizer, template)
    if record.messages:
        end = end_of_turn_id(tokenizer, template)
        return [i for i, _ in _conversation(record, tokenizer, template, end)[0]]
    if resolved == "chat":
        text = _render(tokenizer, [{"role": "user", "content": user_message(record)}], True)
        return _encode(tokenizer, text, special=False)
    return _encode_prompt(tokenizer, format_prompt(record), "alpaca")


def tokenize_record(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int, template: str = "auto",
    *, end: int | None = None,
) -> TokenizedExample:
    """``prompt + response + END``, labels ``-100`` on the prompt, fitted by :func:`fit_example`.

    input_ids = prompt ids ⧺ tok(output, no specials) ⧺ [END], END = EOS (Alpaca) or the chat
    template's end-of-turn token; labels = [-100] * len(prompt ids) ⧺ the response ids ⧺ [END].
    A chat record: labels = its ids on every answer and END, -100 elsewhere; too long, it keeps
    its last answer first, as any record (the context before it loses its middle).
    ``end`` may be passed when already known (:func:`end_of_turn_id`).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if end is None:
        end = end_of_turn_id(tokenizer, template)
    if record.messages:
        pairs, answer = _conversation(record, tokenizer, template, end)
        context, response = fit_example(pairs, answer, max_length)
        return TokenizedExample(input_ids=[i for i, _ in context] + response,
                                labels=[label for _, label in context] + response)
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
