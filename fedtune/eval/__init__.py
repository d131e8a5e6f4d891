"""Evaluation: greedy generation, Rouge-L, eval loss and one evaluation pass over records."""

from fedtune.eval.config import EvalConfig
from fedtune.eval.evaluate import evaluate, loss_batches, select_eval_records
from fedtune.eval.generation import (
    Sampling,
    encode_prompt,
    generate_ids,
    greedy_generate,
    greedy_generate_ids,
)
from fedtune.eval.metrics import eval_loss, rouge_l

__all__ = [
    "EvalConfig",
    "Sampling",
    "encode_prompt",
    "eval_loss",
    "evaluate",
    "generate_ids",
    "greedy_generate",
    "greedy_generate_ids",
    "loss_batches",
    "rouge_l",
    "select_eval_records",
]
