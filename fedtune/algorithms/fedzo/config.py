"""Config of FedZO: the ``[algorithm.fedzo]`` sub-table (names as FedMeZO's)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, option


@dataclass
class FedZOConfig:
    tau: int = option(20, "τ, zeroth-order steps each sampled client takes per round.")
    zo_eps: float = option(1e-3, "ε, the scale of the two-point perturbation θ ± εz.")
    lr: float = option(1e-4, "Zeroth-order SGD learning rate on all parameters (full-parameter "
                             "ZO, as FedKSeed's: a few 1e-5 on the real model, larger on the "
                             "tiny test models).")
    batch_size: int = option(4, "Examples per zeroth-order step.")

    def validate(self, prefix: str) -> None:
        check(self.tau >= 1, f"{prefix}.tau", self.tau, "must be >= 1")
        check(self.zo_eps > 0, f"{prefix}.zo_eps", self.zo_eps, "must be > 0")
        check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
