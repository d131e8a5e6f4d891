"""Config of the prompt-tuning baselines: the ``[algorithm.prompt]`` sub-table."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, option

INITS = ("sample-vocab", "random")


@dataclass
class PromptConfig:
    num_virtual_tokens: int = option(
        20, "Virtual tokens prepended to every input (FedPrompt: their embeddings train; "
            "FedPTuning: a prompt encoder produces them).")
    init: str = option(
        "sample-vocab", "FedPrompt's initial virtual-token embeddings: 'sample-vocab' (embeddings "
        "of random vocabulary tokens, the scale the model expects) or 'random' (N(0, 1)).", INITS)
    encoder_hidden_size: int = option(
        128, "FedPTuning: hidden size of the MLP prompt encoder (Liu et al. 2021).")

    def validate(self, prefix: str) -> None:
        check(self.num_virtual_tokens >= 1, f"{prefix}.num_virtual_tokens",
              self.num_virtual_tokens, "must be >= 1")
        check(self.encoder_hidden_size >= 1, f"{prefix}.encoder_hidden_size",
              self.encoder_hidden_size, "must be >= 1")
