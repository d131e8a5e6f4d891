"""One evaluation pass of a model on held-out records: Rouge-L of greedy outputs and eval loss.

Prompts are the run's template (``data.template``: the tokenizer's chat template or Alpaca),
encoded exactly as for training (:func:`fedtune.data.prompts.prompt_ids`) and shortened from the
middle to :func:`fedtune.data.prompts.generation_prompt_budget` tokens; generation stops at the
template's end-of-turn token; references are the records' outputs. The eval loss uses the
training tokenisation (:func:`fedtune.data.prompts.tokenize_records`, loss on the answer tokens
and the end token only, examples batched by length), so it is directly comparable with the
training loss.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.data.prompts import (
    TokenizedExample,
    collate,
    generation_prompt_budget,
    middle_cut,
    prompt_ids,
    stop_token_ids,
    tokenize_records,
)
from fedtune.data.records import Record
from fedtune.eval.generation import greedy_generate_ids
from fedtune.eval.metrics import eval_loss, rouge_l, rouge_l_scores
from fedtune.eval.stats import repetition_share


def select_eval_records(
    records: Sequence[Record], max_examples: int, seed: int
) -> list[Record]:
    """A deterministic subset of at most ``max_examples`` records, in their original order.

    ``max_examples = 0`` (or at least ``len(records)``) keeps every record. The subset depends
    only on ``len(records)``, ``max_examples`` and ``seed`` (a private ``random.Random``).
    """
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    if max_examples == 0 or max_examples >= len(records):
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), max_examples))
    return [records[i] for i in chosen]


def loss_batches(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    max_length: int,
    template: str = "auto",
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated (input_ids, attention_mask, labels) batches of the training tokenisation,
    examples sorted by length so a batch pads little (the token-weighted mean ignores order)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token; call ensure_pad_token")
    examples: list[TokenizedExample] = tokenize_records(records, tokenizer, max_length,
                                                        template=template)
    examples.sort(key=lambda ex: len(ex.input_ids))
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], int(pad_id))


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    rouge: bool = True,
    loss: bool = True,
    template: str = "auto",
    progress: bool = False,
    answers: list[str] | None = None,
    scorer: str = "rouge-score",
) -> dict[str, float]:
    """Evaluate ``model`` on ``records`` with prompts in ``template``; Rouge-L by ``scorer``
    (:data:`fedtune.eval.metrics.ROUGE_SCORERS`).

    ``answers``: when a list is given and Rouge-L is measured, the greedy answers are appended to
    it, in the order of ``records``.

    Returns ``num_examples``; with ``rouge``, ``rougeL`` (mean Rouge-L F of the greedy outputs,
    in [0, 1]) and ``repetition`` (the share of answers caught in a repetition loop,
    :func:`fedtune.eval.stats.repetition_loop`); with ``loss``, ``eval_loss`` (token-weighted
    mean cross-entropy on the responses; ``nan`` if every prompt fills ``max_length``). The
    model's train/eval mode is restored.
    """
    results: dict[str, float] = {"num_examples": float(len(records))}
    if loss:
        _phase(progress, f"eval: loss on {len(records)} examples")
        batches: Iterable[dict[str, torch.Tensor]] = loss_batches(
            records, tokenizer, batch_size=batch_size, max_length=max_length, template=template)
        if progress:
            batches = tqdm(batches, total=math.ceil(len(records) / batch_size),
                           desc="eval: loss", unit="batch", leave=False, dynamic_ncols=True)
        results["eval_loss"] = eval_loss(model, batches)
    if rouge:
        _phase(progress, f"eval: generating {len(records)} answers (at most {max_new_tokens} "
                         "tokens each) for Rouge-L")
        predictions = generate_answers(model, tokenizer, records, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, max_length=max_length,
                                       template=template, progress=progress)
        results["rougeL"] = rouge_l(predictions, [record.output for record in records], scorer)
        results["repetition"] = repetition_share(predictions)
        if answers is not None:
            answers.extend(predictions)
    return results


def _phase(progress: bool, line: str) -> None:
    """A line per evaluation phase (on stderr, above any progress bar) when ``progress``."""
    if progress:
        tqdm.write(line, file=sys.stderr)


def write_predictions(path: Path, records: Sequence[Record], predictions: Sequence[str],
                      scorer: str = "rouge-score") -> None:
    """``fedtune eval --predictions``: one JSON line per example (instruction, input, category,
    reference, prediction, its Rouge-L F by ``scorer``), in eval order."""
    scores = rouge_l_scores(predictions, [r.output for r in records], scorer)
    with path.open("w") as f:
        for r, p, score in zip(records, predictions, scores, strict=True):
            f.write(json.dumps({"instruction": r.instruction, "input": r.input,
                                "category": r.category, "reference": r.output,
                                "prediction": p, "rougeL": score}) + "\n")


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    template: str = "auto",
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``records`` as evaluation produces them (prompts, budget, stop tokens)."""
    keep = generation_prompt_budget(max_length, max_new_tokens)
    ids = [middle_cut(prompt_ids(record, tokenizer, template), keep) for record in records]
    return greedy_generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, stop_ids=stop_token_ids(tokenizer, template),
                               progress=progress)
