"""Config of the evaluation concern: what is measured, how often, on how many examples."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, check_choices, option
from fedtune.eval.metrics import ROUGE_SCORERS


@dataclass
class EvalConfig:
    max_new_tokens: int = option(
        32, "Greedy generation budget per eval prompt (the FedKSeed/FedIT papers: 128, as the "
            "Dolly and NI configs set; 32 fits the generated suite's short answers)."
    )
    batch_size: int = option(
        16, "Prompts per generation batch and examples per eval-loss batch (on 2 CPU cores 16 "
            "generates 40 short answers about a third faster than 8; larger batches pad more).")
    max_examples: int = option(
        40,
        "Cap on the eval set: a subset of this size is sampled deterministically with eval.seed "
        "(original order kept). 0 = evaluate every held-out record.",
    )
    loss_interval: int = option(
        0, "Rounds between eval-loss measurements; 0 = only before round 1 and after the last."
    )
    rouge_interval: int = option(
        0,
        "Rounds between Rouge-L measurements (generation is the slow part); 0 = only before "
        "round 1 and after the last.",
    )
    evaluate_base: bool = option(
        True,
        "Measure the base model before round 1, so every run reports a before and an after.",
    )
    seed: int = option(0, "Seed of the eval subset sampling.")
    rouge: str = option(
        "rouge-score",
        "Rouge-L scorer: 'rouge-score' (Google's rouge_score package: lower-cased, punctuation "
        "dropped) or 'fedkseed' (the FedKSeed reference code's: the pltrdy rouge package, "
        "case-sensitive, sentences split at '.', 0 for an empty answer). The two give different "
        "numbers; compare with the FedKSeed paper's table only under 'fedkseed'.",
        choices=ROUGE_SCORERS,
    )
    guard: bool = option(
        True,
        "The damage guard: score general instructions the run never trains on (the built-in "
        "set of 64, or guard_path) before round 1 and after the last: eval loss, Rouge-L and the "
        "share of answers caught in a repetition loop; the run warns when the tuned model got "
        "worse on them. Cheap: one loss pass and guard_generations short answers each time.",
    )
    guard_path: str = option(
        "",
        "The guard's records: empty = fedtune's built-in general-instruction set "
        "(fedtune/eval/guard.jsonl: 64 questions, explanations, extraction, summaries, "
        "rewrites, lists and advice with one-or-two-sentence reference answers); or a JSONL "
        "file of records with 'instruction', optional 'input', and 'output' (or 'response').",
    )
    guard_generations: int = option(
        16, "Guard records answered greedily (the first N) for its Rouge-L and repetition "
            "share; the loss covers every guard record. 0 = loss only.")
    guard_max_new_tokens: int = option(
        40, "Generation budget of the guard's answers (loops show within it).")

    def validate(self, prefix: str = "eval") -> None:
        check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", self.max_new_tokens,
              "must be >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        check_choices(self, prefix)
        check(self.guard_max_new_tokens >= 1, f"{prefix}.guard_max_new_tokens",
              self.guard_max_new_tokens, "must be >= 1")
        for key in ("max_examples", "loss_interval", "rouge_interval", "guard_generations"):
            value = getattr(self, key)
            check(value >= 0, f"{prefix}.{key}", value, "must be >= 0 (0 = see the help)")
