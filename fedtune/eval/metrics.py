"""Evaluation metrics: Rouge-L of generated responses and token-weighted eval loss.

Rouge-L is the F-measure of the longest common subsequence of words, by one of two scorers
(``evaluation.rouge``), because the papers differ and the two give different numbers:

* ``"rouge-score"`` (the default): Google's ``rouge_score`` package, ``RougeScorer(["rougeL"])``
  without stemming: lower-cased, punctuation dropped, one LCS over the whole answer;
* ``"fedkseed"``: what FedKSeed's reference code reports (its ``evaluations.py``): the ``rouge``
  package (pltrdy, 1.0.1), ``Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]`` on the decoded
  answer, 0 for an empty answer (or one the package refuses): case-sensitive, sentences split at
  ".", a summary-level union LCS. Tables compared with the FedKSeed paper's use this one.

The eval loss is
the mean cross-entropy per label token over the whole eval set, so batches with more response
tokens weigh more (a mean of per-batch means would not be comparable across batch sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import PreTrainedModel

IGNORE_INDEX = -100


ROUGE_SCORERS = ("rouge-score", "fedkseed")


def _fedkseed_rouge_l(prediction: str, reference: str) -> float:
    """FedKSeed's reference scorer: pltrdy ``rouge``'s Rouge-L F, 0 for an empty answer."""
    from rouge import Rouge

    if not prediction:
        return 0.0
    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores(prediction, reference)[0]
                     ["rouge-l"]["f"])
    except ValueError:  # the package refuses answers with no words (e.g. only ".")
        return 0.0


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str],
                   scorer: str = "rouge-score") -> list[float]:
    """Rouge-L F-measure of each prediction against its reference, in [0, 1], by ``scorer``
    (one of :data:`ROUGE_SCORERS`; the module docstring says how they differ).

    Raises ``ValueError`` when the lengths differ or the scorer is unknown.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references"
        )
    pairs = zip(predictions, references, strict=True)
    if scorer == "fedkseed":
        return [_fedkseed_rouge_l(prediction, reference) for prediction, reference in pairs]
    if scorer != "rouge-score":
        raise ValueError(f"unknown Rouge-L scorer {scorer!r}; choose one of {ROUGE_SCORERS}")
    google = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [google.score(reference, prediction)["rougeL"].fmeasure
            for prediction, reference in pairs]


def rouge_l(predictions: Sequence[str], references: Sequence[str],
            scorer: str = "rouge-score") -> float:
    """Mean Rouge-L F-measure of ``predictions`` against ``references``, in [0, 1].

    Raises ``ValueError`` when the lengths differ; an empty input scores 0.0.
    """
    scores = rouge_l_scores(predictions, references, scorer)
    return sum(scores) / len(scores) if scores else 0.0


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropies over label tokens != -100, and their count.

    ``logits`` (B, K, V) are those of the last K positions of ``labels`` (B, T), K <= T.
    """
    keep = logits.shape[1]
    shift_logits = logits[:, :-1, :].float()  # (B, K-1, V): position t predicts t+1
    shift_labels = labels[:, labels.shape[1] - keep + 1:]  # (B, K-1)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(total), int((shift_labels != IGNORE_INDEX).sum())


def logits_window(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the one before the first label on.

    A (B, T, V) logits tensor is large for a real vocabulary (8 x 512 x 49,152 float32 = 805 MB)
    while the answer is a short tail of a long prompt: computing only the window cuts that.
    """
    has = labels != IGNORE_INDEX  # (B, T)
    if not bool(has.any()):
        return 1
    first = int(has.float().argmax(dim=1)[has.any(dim=1)].min())  # earliest label position
    return labels.shape[1] - max(first - 1, 0)


def eval_loss(model: PreTrainedModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy over all label tokens (!= -100) of ``batches``.

    Each batch holds ``input_ids``, ``attention_mask`` and ``labels`` (labels aligned with the
    inputs; the shift for next-token prediction happens here, as in Hugging Face causal LMs).
    Only the positions from the one before the batch's first label on get logits
    (``logits_to_keep``). Runs under ``torch.inference_mode()`` in eval mode and restores the
    model's previous mode. Returns ``nan`` when there is no label token at all.
    """
    was_training = model.training
    total, count = 0.0, 0
    try:
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                input_ids = batch["input_ids"].to(model.device)
                attention_mask = batch["attention_mask"].to(model.device)
                labels = batch["labels"].to(model.device)
                logits = model(input_ids=input_ids, attention_mask=attention_mask,
                               logits_to_keep=logits_window(labels)).logits
                batch_sum, batch_count = token_loss_sum(logits, labels)
                total += batch_sum
                count += batch_count
    finally:
        model.train(was_training)
    return total / count if count else float("nan")
