"""The methods, one folder each, and the registry the engines build them from."""

from __future__ import annotations

from typing import Any

from fedtune.algorithms.base import Algorithm
from fedtune.algorithms.config import AlgorithmConfig


def build_algorithm(cfg: AlgorithmConfig, pad_id: int, tokenizer: Any = None) -> Algorithm:
    """The algorithm named by ``cfg.name`` (FedPT also needs the small model's tokenizer)."""
    if cfg.name in ("fedavg", "fedit"):
        from fedtune.algorithms.fedavg import FedAvg

        return FedAvg(cfg, pad_id, lora=cfg.name == "fedit")
    if cfg.name in ("fedkseed", "fedkseed-pro"):
        from fedtune.algorithms.fedkseed.algorithm import FedKSeed

        return FedKSeed(cfg, pad_id, pro=cfg.name == "fedkseed-pro")
    if cfg.name == "fedmezo":
        from fedtune.algorithms.fedmezo.algorithm import FedMeZO

        return FedMeZO(cfg, pad_id)
    if cfg.name == "fedpt":
        from fedtune.algorithms.fedpt.algorithm import FedPT

        return FedPT(cfg, pad_id, tokenizer)
    raise ValueError(f"unknown algorithm {cfg.name!r}")
