"""Config of FedZO: the ``[algorithm.fedzo]`` sub-table (names as FedMeZO's)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.algorithms.fedmezo.config import validate_zo_local
from fedtune.configbase import option


@dataclass
class FedZOConfig:
    tau: int = option(20, "τ, zeroth-order steps each sampled client takes per round.")
    zo_eps: float = option(1e-3, "ε, the scale of the two-point perturbation θ ± εz.")
    lr: float = option(1e-4, "Zeroth-order SGD learning rate on all parameters (full-parameter "
                             "ZO, as FedKSeed's: a few 1e-5 on the real model, larger on the "
                             "tiny test models).")
    batch_size: int = option(4, "Examples per zeroth-order step.")

    def validate(self, prefix: str) -> None:
        validate_zo_local(self, prefix)
