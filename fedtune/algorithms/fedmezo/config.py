"""Config of FedMeZO: the ``[algorithm.fedmezo]`` sub-table.

FedMeZO (the baseline named by FedKSeed, Qin et al. 2024) is FedIT's protocol with MeZO local
training (Malladi et al. 2023): LoRA adapters (``[algorithm.lora]``) go down and up as tensors and
are averaged by sample count, but the device updates them by two-point zeroth-order SGD. Names
follow the papers: τ local steps (``tau``), the perturbation scale ε (``zo_eps``).

Default lr = 1e-2, above MeZO's usual 1e-4..1e-3 for LoRA on purpose: the adapters of the tiny
random CPU model have small gradients (LoRA B starts at 0), and plain ZO-SGD has no Adam-style
normalisation. Measured on the tiny default run (``fedtune run --set algorithm.name=fedmezo``,
eval loss of rounds 0..4, fp32 CPU): lr 1e-3 6.298 -> 6.272 (barely moves), 3e-3 -> 6.208,
1e-2 -> 6.055 (monotone). Real models want a sweep over 1e-4..1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.configbase import check, option


@dataclass
class FedMeZOConfig:
    tau: int = option(20, "τ, zeroth-order steps each sampled client takes per round.")
    zo_eps: float = option(1e-3, "ε, the scale of the two-point perturbation θ ± εz (MeZO 1e-3).")
    lr: float = option(1e-2, "Zeroth-order SGD learning rate on the LoRA adapters. 1e-2 suits "
                             "the tiny default model (its eval loss falls from 6.30 to 6.06 in 4 "
                             "rounds); MeZO with LoRA on real models: 1e-4..1e-3.")
    batch_size: int = option(4, "Examples per zeroth-order step (both forward passes see the "
                                "same batch).")

    def validate(self, prefix: str) -> None:
        validate_zo_local(self, prefix)


def validate_zo_local(cfg: FedMeZOConfig | Any, prefix: str) -> None:
    """The checks of a fresh-seed ZO section (``[algorithm.fedmezo]``, ``[algorithm.fedzo]``)."""
    check(cfg.tau >= 1, f"{prefix}.tau", cfg.tau, "must be >= 1")
    check(cfg.zo_eps > 0, f"{prefix}.zo_eps", cfg.zo_eps, "must be > 0")
    check(cfg.lr > 0, f"{prefix}.lr", cfg.lr, "must be > 0")
    check(cfg.batch_size >= 1, f"{prefix}.batch_size", cfg.batch_size, "must be >= 1")
