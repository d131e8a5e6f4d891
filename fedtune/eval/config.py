"""Config of the evaluation concern: what is measured, how often, on how many examples."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, option


@dataclass
class EvalConfig:
    max_new_tokens: int = option(
        32, "Greedy generation budget per eval prompt (the FedKSeed/FedIT papers: 128, as the "
            "Dolly and NI configs set; 32 fits the generated suite's short answers)."
    )
    batch_size: int = option(8, "Prompts per generation batch and examples per eval-loss batch.")
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

    def validate(self, prefix: str = "eval") -> None:
        check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", self.max_new_tokens,
              "must be >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        for key in ("max_examples", "loss_interval", "rouge_interval"):
            value = getattr(self, key)
            check(value >= 0, f"{prefix}.{key}", value, "must be >= 0 (0 = see the help)")
