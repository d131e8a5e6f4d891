"""Which z a zeroth-order method uses: the generator version, dense or low-rank, the rank.

Everything that turns seeds into a model (a step, a replay, a rebuild from a seed log) takes a
:class:`ZSpec`; FedKSeed's seed log, checkpoint and messages carry it, so a model is always
rebuilt with the z it was trained with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.zo import lowrank
from fedtune.zo.perturb import GENERATOR_VERSION, check_version, replay_

KINDS = ("dense", "lowrank")


@dataclass(frozen=True)
class ZSpec:
    """``generator`` 1 or 2 (:mod:`fedtune.zo.perturb`); ``kind`` "dense" (the papers') or
    "lowrank" (:mod:`fedtune.zo.lowrank`, generator 2 only) with ``rank`` r >= 1."""

    generator: int = GENERATOR_VERSION
    kind: str = "dense"
    rank: int = 0

    def __post_init__(self) -> None:
        check_version(self.generator)
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; known: {KINDS}")
        if self.kind == "lowrank" and (self.rank < 1 or self.generator != 2):
            raise ValueError(f"low-rank perturbations need generator 2 and rank >= 1, got "
                             f"generator {self.generator}, rank {self.rank}")

    @property
    def lowrank(self) -> bool:
        return self.kind == "lowrank"

    def describe(self) -> dict[str, Any]:
        """The fields a seed log records (rank only when low-rank)."""
        out: dict[str, Any] = {"generator_version": self.generator, "perturbation": self.kind}
        if self.lowrank:
            out["rank"] = self.rank
        return out

    @classmethod
    def from_log(cls, log: Mapping[str, Any]) -> ZSpec:
        """The spec a seed log was made with (a log from before versions existed: 1, dense)."""
        return cls(int(log.get("generator_version", 1)), str(log.get("perturbation", "dense")),
                   int(log.get("rank", 0)))


DEFAULT_Z = ZSpec()  # what new runs use: generator 2, dense


@torch.no_grad()
def replay_z_(params: Sequence[torch.Tensor], coeffs: Mapping[int, float], spec: ZSpec, *,
              workers: int | None = None) -> None:
    """θ ← θ + Σ_s coeffs[s] · z(s) with the z of ``spec``."""
    if spec.lowrank:
        lowrank.replay_(params, coeffs, spec.rank, workers=workers)
    else:
        replay_(params, coeffs, workers=workers, version=spec.generator)
