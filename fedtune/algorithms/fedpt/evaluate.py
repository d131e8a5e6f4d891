"""Evaluating the proxy-tuned large model: the same protocol as every other method.

Rouge-L: the same prompts (:func:`fedtune.data.prompts.prompt_ids`), greedy decoding of at most
``max_new_tokens`` under s̃, the same Rouge-L F. Eval loss: the training tokenisation, teacher
forced through the same interface (the reference tokens appended in one ``extend`` per model),
so it is the cross-entropy of softmax(s̃) on the response tokens and EOS, comparable with any
model's eval loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.algorithms.fedpt.proxy import ProxyModel, proxy_forced_logits, proxy_generate_ids
from fedtune.data.prompts import (
    IGNORE_INDEX,
    end_of_turn_id,
    generation_prompt_budget,
    middle_cut,
    prompt_ids,
    tokenize_records,
)
from fedtune.data.records import Record
from fedtune.eval.metrics import rouge_l


def _fitting_batches(pairs: list[tuple[list[int], list[int]]], batch_size: int,
                     limit: int | None) -> list[list[tuple[list[int], list[int]]]]:
    """Batches in which every row fits the context for the batch's whole decoding.

    Rows step in lockstep, so a row that is done keeps advancing while the longest response is
    fed: each batch needs max(prompt) + max(response) - 1 <= ``limit`` positions. Pairs are taken
    by response length so similar ones share a batch (the mean loss does not depend on order).
    """
    out: list[list[tuple[list[int], list[int]]]] = []
    cur: list[tuple[list[int], list[int]]] = []
    for pair in sorted(pairs, key=lambda pr: (len(pr[1]), len(pr[0]))):
        widest = max([len(p) for p, _ in cur] + [len(pair[0])])
        longest = max([len(r) for _, r in cur] + [len(pair[1])])
        if cur and (len(cur) == batch_size or (limit is not None and widest + longest - 1 > limit)):
            out.append(cur)
            cur = []
        cur.append(pair)
    return out + ([cur] if cur else [])


def proxy_eval_loss(proxy: ProxyModel, examples: Sequence[Any], *, pad_id: int,
                    batch_size: int) -> float:
    """Token-weighted mean cross-entropy of s̃ on each example's labelled tokens."""
    pairs = []
    for ex in examples:
        cut = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
        if proxy.max_positions is None or len(ex.input_ids) <= proxy.max_positions:
            pairs.append((ex.input_ids[:cut], ex.input_ids[cut:]))
    total, n = 0.0, 0
    for batch in _fitting_batches(pairs, min(batch_size, proxy.max_batch), proxy.max_positions):
        logits = proxy_forced_logits(proxy, [p for p, _ in batch], [r for _, r in batch], pad_id)
        for (_, resp), row in zip(batch, logits, strict=True):
            total += float(torch.nn.functional.cross_entropy(row, torch.tensor(resp),
                                                             reduction="sum"))
            n += len(resp)
    return total / n if n else float("nan")


def evaluate_proxy(proxy: ProxyModel, tokenizer: Any, records: Sequence[Record], *,
                   max_new_tokens: int, batch_size: int, max_length: int, rouge: bool = True,
                   loss: bool = True, template: str = "auto", scorer: str = "rouge-score"
                   ) -> dict[str, float]:
    """``num_examples``, ``rougeL`` and ``eval_loss`` of the proxy-tuned model on ``records``
    (prompts in ``template``, as :func:`fedtune.eval.evaluate.evaluate` builds them)."""
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                 else tokenizer.eos_token_id)
    results: dict[str, float] = {"num_examples": float(len(records))}
    if loss:
        examples = tokenize_records(records, tokenizer, max_length, template=template)
        results["eval_loss"] = proxy_eval_loss(proxy, examples, pad_id=pad_id,
                                               batch_size=batch_size)
    if rouge:
        keep = generation_prompt_budget(max_length, max_new_tokens)
        prompts = [middle_cut(prompt_ids(r, tokenizer, template), keep) for r in records]
        ids = proxy_generate_ids(proxy, prompts, max_new_tokens=max_new_tokens,
                                 eos_id=end_of_turn_id(tokenizer, template),
                                 pad_id=pad_id, batch_size=batch_size)
        texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        results["rougeL"] = rouge_l(texts, [r.output for r in records], scorer)
    return results
