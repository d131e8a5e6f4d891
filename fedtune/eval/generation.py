"""Greedy, batched generation of responses for evaluation.

Generation config (the same for every method, so Rouge-L numbers are comparable):

* greedy decoding: ``do_sample=False``, ``num_beams=1``; sampling knobs a checkpoint's own
  generation config may carry (temperature, top-p, top-k) are neutralised;
* at most ``max_new_tokens`` new tokens (128 by default, the FedKSeed/FedIT budget), stopping
  early at the tokenizer's EOS or at the chat template's end-of-turn token (``stop_ids``);
* prompts are encoded with the tokenizer's special tokens (a leading BOS for tokenizers that add
  one; fedtune's tiny tokenizer adds none) minus a trailing EOS the tokenizer may append, the
  same rule as :func:`fedtune.data.prompts.prompt_ids`, so generation conditions on exactly the
  prompt ids training used;
* ``fedtune generate`` may sample instead (:class:`Sampling`: temperature, top-p, a seed); the
  draw uses a forked torch RNG seeded with that seed, so it is reproducible and leaves the global
  RNG as it was. Evaluation never samples;
* batches are LEFT-padded (every row's last prompt token at the end) with the attention mask
  passed, so a prompt's output does not depend on the batch it is in (up to float rounding);
* prompts are batched by length (longest first) and the outputs returned in the callers' order:
  a batch pads to its longest prompt, and Dolly's prompts run from 20 to 1,000+ tokens;
* decoding runs under ``torch.inference_mode`` with the model's KV cache;
* ``pad_token_id`` and ``eos_token_id`` are passed explicitly;
* only the new tokens are returned, decoded with ``skip_special_tokens=True`` and stripped;
* a prompt longer than the model's context leaves room for the new tokens by losing its oldest
  tokens (left truncation keeps the "### Response:" cue the answer follows); the number of
  prompts cut is logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm
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


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length (ties in input order): the longest batch first, so a memory
    problem shows at once and the progress bar's estimate only improves."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: ``temperature`` 0 is greedy (argmax); above 0, sample from
    softmax(logits / temperature) restricted to the smallest set of tokens whose probability
    reaches ``top_p`` (nucleus sampling), with a torch RNG seeded by ``seed``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
        if self.greedy and self.top_p < 1:
            raise ValueError(f"top_p = {self.top_p} needs a temperature > 0 (greedy decoding "
                             "takes the most likely token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict[str, Any]:
        """``model.generate`` arguments; a checkpoint's own sampling defaults are overridden
        (top-k off: only top-p narrows the draw)."""
        if self.greedy:
            return {"do_sample": False, "num_beams": 1, "temperature": None, "top_p": None,
                    "top_k": None}
        return {"do_sample": True, "num_beams": 1, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": 0}


def greedy_generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    stop_ids: Sequence[int] | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of already-encoded prompts (new text only), in order.

    ``stop_ids``: tokens that end a continuation (default: the tokenizer's EOS). ``progress``
    shows a bar over the prompts (on a terminal). The tokenizer's padding side and the model's
    train/eval mode are restored afterwards.
    """
    return generate_ids(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, stop_ids=stop_ids, progress=progress)


def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    stop_ids: Sequence[int] | None = None,
    progress: bool = False,
    sampling: Sampling = Sampling(),
) -> list[str]:
    """Continuations of already-encoded prompts (new text only), in order: greedy, or sampled
    as ``sampling`` says (the rest as in :func:`greedy_generate_ids`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id, eos_id = _special_ids(tokenizer)
    stops = list(stop_ids) if stop_ids else ([eos_id] if eos_id is not None else None)
    prompt_ids = fit_context(model, prompt_ids, max_new_tokens)
    order = length_order([len(ids) for ids in prompt_ids])
    was_training = model.training
    padding_side = tokenizer.padding_side
    outputs: list[str] = [""] * len(prompt_ids)
    bar = tqdm(total=len(order), desc="eval: generating", unit="prompt", leave=False,
               disable=not progress or None, dynamic_ncols=True)
    rng = contextlib.ExitStack()
    try:
        if not sampling.greedy:
            rng.enter_context(torch.random.fork_rng())
            torch.manual_seed(sampling.seed)
        model.eval()
        tokenizer.padding_side = "left"
        for batch in _batches(order, batch_size):
            enc = tokenizer.pad(
                {"input_ids": [list(prompt_ids[i]) for i in batch]}, padding=True,
                return_tensors="pt",
            )
            input_ids = enc["input_ids"].to(model.device)  # (B, T), left-padded
            attention_mask = enc["attention_mask"].to(model.device)  # (B, T)
            with torch.inference_mode():
                generated = model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    **sampling.generate_kwargs(),
                    use_cache=True,
                    pad_token_id=pad_id,
                    eos_token_id=stops,
                )
            new_tokens = generated[:, input_ids.shape[1]:]  # (B, <= max_new_tokens)
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                outputs[i] = text.strip()
            bar.update(len(batch))
    finally:
        rng.close()
        bar.close()
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
