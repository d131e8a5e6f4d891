"""The damage guard: does the tuned model still answer general instructions it was not tuned on?

A run's eval set says whether the model learnt the run's task; it cannot say what the tuning broke.
The guard scores a set of general instructions that no run trains on, before round 1 and after
the last, the same way as the eval set:

* ``guard_eval_loss``: the token-weighted cross-entropy of the reference answers (every record);
* ``guard_rougeL``: Rouge-L of greedy answers to the first ``evaluation.guard_generations``;
* ``guard_repetition``: the share of those answers caught in a repetition loop
  (:func:`fedtune.eval.stats.repetition_loop`), the first symptom of a damaged small model.

The built-in set (``guard.jsonl`` beside this module) holds 64 instructions written for fedtune:
8 each of factual questions, explanations, classification, extraction from a given passage,
one-sentence summaries, rewrites, short lists and practical advice, with one- or two-sentence
reference answers in an assistant's plain style, interleaved by category (so the first 16, the
ones answered by default, hold two of each). It shares no task with the generated suite.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedtune.data.loaders import load_jsonl
from fedtune.data.records import Record
from fedtune.eval.config import EvalConfig
from fedtune.eval.evaluate import evaluate

# a guard loss this much above the base model's, or more looping answers, earns a warning
LOSS_TOLERANCE = 0.02


def guard_records(path: str = "") -> list[Record]:
    """The guard's records: the built-in set, or the JSONL file at ``path`` (``instruction``,
    optional ``input``, and ``output`` or Dolly's ``response``)."""
    if not path:
        text = resources.files("fedtune.eval").joinpath("guard.jsonl").read_text()
        return [Record(r["instruction"], r.get("input", ""), r["output"], r.get("category", ""))
                for r in map(json.loads, text.splitlines()) if r]
    p = Path(path)
    first: dict[str, Any] = next((json.loads(line) for line in p.open() if line.strip()), {})
    output = "output" if "output" in first else "response"
    fields = {"instruction": "instruction", "output": output}
    for key in ("input", "category"):
        if key in first:
            fields[key] = key
    if "context" in first and "input" not in first:
        fields["input"] = "context"  # Dolly's records
    return load_jsonl(p, fields)


def measure_guard(model: Any, tokenizer: Any, records: Sequence[Record], ev: EvalConfig, *,
                  max_length: int, template: str, progress: bool = False,
                  answers: list[str] | None = None) -> dict[str, float]:
    """The guard's three numbers for ``model`` (see the module docstring); the greedy answers
    are appended to ``answers`` when a list is given."""
    if progress:
        tqdm.write(f"damage guard: {len(records)} general instructions the run does not train "
                   "on", file=sys.stderr)
    out = {"guard_eval_loss": evaluate(
        model, tokenizer, records, max_new_tokens=1, batch_size=ev.batch_size,
        max_length=max_length, rouge=False, loss=True, template=template,
        progress=progress)["eval_loss"]}
    asked = list(records[:ev.guard_generations])
    if asked:
        said: list[str] = []
        scores = evaluate(model, tokenizer, asked, max_new_tokens=ev.guard_max_new_tokens,
                          batch_size=ev.batch_size, max_length=max_length, rouge=True,
                          loss=False, template=template, progress=progress, answers=said,
                          scorer=ev.rouge)
        out["guard_rougeL"] = scores["rougeL"]
        out["guard_repetition"] = scores["repetition"]
        if answers is not None:
            answers.extend(said)
    return out


def guard_verdict(base: dict[str, Any], final: dict[str, Any]) -> str | None:
    """A warning line when the tuned model got worse on the guard: its loss more than
    :data:`LOSS_TOLERANCE` above the base model's, or a larger share of looping answers; None
    when neither (or when either side was not measured)."""
    worse = []
    lb, lf = base.get("eval_loss"), final.get("eval_loss")
    if lb is not None and lf is not None and lf > lb + LOSS_TOLERANCE:
        worse.append(f"eval loss {lb:.4f} -> {lf:.4f} ({lf - lb:+.4f})")
    rb, rf = base.get("repetition_share"), final.get("repetition_share")
    if rb is not None and rf is not None and rf > rb:
        worse.append(f"answers in a repetition loop {rb:.0%} -> {rf:.0%}")
    if not worse:
        return None
    return ("the tuned model got worse on general instructions it was not tuned on (the damage "
            "guard): " + "; ".join(worse))
