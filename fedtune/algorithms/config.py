"""Config of the algorithm concern: which method, and its local training settings.

Fields shared by the backprop baselines sit at the top level of ``[algorithm]``; each method's own
knobs sit in a sub-table named after it (``[algorithm.lora]``), so one TOML file reads like the
paper's hyper-parameter table.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.algorithms import METHODS
from fedtune.algorithms.aggregate import AGGREGATIONS, WEIGHTINGS
from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedmezo.config import FedMeZOConfig
from fedtune.algorithms.fedprompt.config import PromptConfig
from fedtune.algorithms.fedpt.config import FedPTConfig
from fedtune.algorithms.fedzo.config import FedZOConfig
from fedtune.algorithms.local import SCHEDULES
from fedtune.algorithms.privacy import DPConfig
from fedtune.configbase import check, check_choices, option, section

ALGORITHMS = tuple(METHODS)
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class LoraConfig:
    r: int = option(8, "LoRA rank r.")
    alpha: int = option(16, "LoRA scaling numerator: the update is (alpha / r) * B A x.")
    dropout: float = option(0.05, "Dropout on the LoRA branch input during local training.")
    target_modules: list = option(
        ["q_proj", "v_proj"], "Module names that get LoRA adapters (FedIT: the attention q and v)."
    )

    def validate(self, prefix: str) -> None:
        check(self.r >= 1, f"{prefix}.r", self.r, "must be >= 1")
        check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be > 0")
        check(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        check(len(self.target_modules) > 0 and all(isinstance(m, str) for m in self.target_modules),
              f"{prefix}.target_modules", self.target_modules, "must be a non-empty list of names")


@dataclass
class RobustConfig:
    aggregation: str = option(
        "mean", "How the server combines the round's updates: 'mean' (weighted by "
                "algorithm.weighting, the papers'), or per coordinate (per seed for FedKSeed, per "
                "parameter for the others) 'trimmed-mean' or 'median', unweighted, which a "
                "minority of hostile clients cannot drag far (they keep every reply of a round "
                "in memory).", AGGREGATIONS)
    trim_fraction: float = option(
        0.2, "'trimmed-mean': the fraction of the values dropped at each end of every "
             "coordinate (ceil(fraction * replies) each side, leaving at least one).")
    max_update_norm: float = option(
        0.0, "Clip each client's update to this L2 norm on the server before aggregating "
             "(FedKSeed: its vector of per-seed sums of g; the others: its change to the "
             "trainable tensors). 0: no clip.")
    max_round_change: float = option(
        0.0, "Refuse a round whole (logged; the previous global state kept) if it would move "
             "the global state by more than this L2 norm (FedKSeed: the change of the K "
             "accumulators, whose model moves by about lr * sqrt(params) times it; the others: "
             "the change of the trainable tensors). 0: no bound. A non-finite round is always "
             "refused.")
    max_change_over_median: float = option(
        10.0, "The tensor methods (FedAvg, FedIT, FedMeZO, FedZO, the prompt methods, FedPT's "
              "devices), under the mean without a clip: refuse a round whole (logged; the "
              "previous global state kept) if it would move the trainable tensors by more than "
              "this many times the median L2 size of the round's own updates. Honest updates of "
              "one round are of one size and their mean is no longer than the longest, so this "
              "costs an honest run nothing and stops one client from poisoning the adapters "
              "(a reply with 1e6 on every value) so that every later round fails. 0: off. "
              "FedKSeed is bounded by algorithm.fedkseed.g_max instead.")

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        check(self.max_change_over_median == 0 or self.max_change_over_median >= 1,
              f"{prefix}.max_change_over_median", self.max_change_over_median,
              "must be 0 (off) or >= 1 (an honest mean can be as long as its longest update)")
        check(0 <= self.trim_fraction < 0.5, f"{prefix}.trim_fraction", self.trim_fraction,
              "must be in [0, 0.5)")
        check(self.max_update_norm >= 0, f"{prefix}.max_update_norm", self.max_update_norm,
              "must be >= 0 (0: no clip)")
        check(self.max_round_change >= 0, f"{prefix}.max_round_change",
              self.max_round_change, "must be >= 0 (0: no bound)")

    @property
    def active(self) -> bool:
        """Whether anything beyond the plain mean of the papers is asked for."""
        return (self.aggregation != "mean" or self.max_update_norm > 0
                or self.max_round_change > 0)


@dataclass
class AlgorithmConfig:
    name: str = option(
        "fedkseed",
        "Method: " + "; ".join(
            f"'{m.name}' ({m.summary}"
            + (f"; reads {', '.join(f'[algorithm.{s}]' for s in m.sections)})" if m.sections
               else ")")
            for m in METHODS.values())
        + ". The backprop settings below are read by fedavg, fedit, fedprompt and fedptuning; "
        "fedpt reads its device trainer's settings too.",
        ALGORITHMS,
    )
    local_steps: int = option(20, "Optimizer steps each sampled client takes per round.")
    batch_size: int = option(4, "Examples per local step.")
    lr: float = option(1e-3, "Local learning rate.")
    optimizer: str = option(
        "adamw", "Local optimizer, fresh on every client each round.", OPTIMIZERS
    )
    weight_decay: float = option(0.0, "Decoupled weight decay of the local optimizer.")
    max_grad_norm: float = option(1.0, "Clip the local gradient to this L2 norm; 0 disables.")
    lr_schedule: str = option(
        "constant", "Learning-rate schedule over a client's local optimizer steps of one round "
                    "(the optimizer is fresh each round, as in FedAvg and FedIT), from "
                    "transformers' get_scheduler.", SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up steps at the start of the schedule.")
    grad_accumulation: int = option(
        1, "Batches whose gradients are averaged into one optimizer step: a local step then "
           "sees grad_accumulation x batch_size examples at the memory of one batch.")
    gradient_checkpointing: bool = option(
        False, "Recompute activations during backprop instead of storing them: less memory "
               "for about one more forward of time (the backprop methods' devices).")
    weighting: str = option(
        "samples", "How the server weights the replies it averages: 'samples' (each client's "
        "reported sample count, as FedAvg, FedIT and FedKSeed do) or 'equal' (one client, one "
        "vote: a client cannot buy influence by claiming more samples).", WEIGHTINGS)
    max_sample_weight: int = option(
        0, "With weighting = 'samples': cap a reply's weight at this many samples (0: no cap). "
           "A reported count is only a claim; the cap bounds what one client can outweigh.")
    robust: RobustConfig = section(
        RobustConfig, "Bounded influence of hostile clients: robust aggregation rules, update "
                      "clipping and a bound on each round's move (every method).")
    dp: DPConfig = section(
        DPConfig, "Client-level differential privacy: clip each update, add Gaussian noise to "
                  "the sum, report (epsilon, delta) every round (every method).")
    lora: LoraConfig = section(LoraConfig, "LoRA adapter settings (used by 'fedit', 'fedmezo').")
    fedkseed: FedKSeedConfig = section(
        FedKSeedConfig, "FedKSeed / FedKSeed-Pro settings (used by 'fedkseed', 'fedkseed-pro').")
    fedmezo: FedMeZOConfig = section(
        FedMeZOConfig, "FedMeZO settings: MeZO local training of the LoRA adapters (used by "
                       "'fedmezo').")
    fedzo: FedZOConfig = section(
        FedZOConfig, "FedZO settings: zeroth-order full-parameter steps with fresh seeds (used by "
                     "'fedzo').")
    prompt: PromptConfig = section(
        PromptConfig, "Prompt-tuning settings (used by 'fedprompt', 'fedptuning').")
    fedpt: FedPTConfig = section(
        FedPTConfig, "FedPT settings: the large model, proxy-tuning and server distillation "
                     "(used by 'fedpt').")

    def validate(self, prefix: str = "algorithm") -> None:
        check_choices(self, prefix)
        check(self.local_steps >= 1, f"{prefix}.local_steps", self.local_steps, "must be >= 1")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        check(self.max_grad_norm >= 0, f"{prefix}.max_grad_norm", self.max_grad_norm,
              "must be >= 0")
        check(0 <= self.warmup_steps <= self.local_steps, f"{prefix}.warmup_steps",
              self.warmup_steps, f"must be in [0, local_steps = {self.local_steps}]")
        check(self.grad_accumulation >= 1, f"{prefix}.grad_accumulation",
              self.grad_accumulation, "must be >= 1")
        check(self.max_sample_weight >= 0, f"{prefix}.max_sample_weight",
              self.max_sample_weight, "must be >= 0 (0: no cap)")
        self.robust.validate(f"{prefix}.robust")
        self.dp.validate(f"{prefix}.dp")
        if self.dp.enabled:
            check(self.name != "fedkseed-pro", f"{prefix}.name", self.name,
                  "differential privacy covers the per-seed sums, not FedKSeed-Pro's seed "
                  "statistics (which travel in the clear); use 'fedkseed'")
            check(self.weighting == "equal", f"{prefix}.weighting", self.weighting,
                  "must be 'equal' with differential privacy (algorithm.dp.noise_multiplier "
                  "> 0): a reply's weight must not depend on what the client says")
            check(self.robust.aggregation == "mean", f"{prefix}.robust.aggregation",
                  self.robust.aggregation, "must be 'mean' with differential privacy (the "
                  "noise is calibrated to a sum of clipped updates)")
        self.lora.validate(f"{prefix}.lora")
        self.fedkseed.validate(f"{prefix}.fedkseed")
        self.fedmezo.validate(f"{prefix}.fedmezo")
        self.fedzo.validate(f"{prefix}.fedzo")
        self.prompt.validate(f"{prefix}.prompt")
        self.fedpt.validate(f"{prefix}.fedpt")
