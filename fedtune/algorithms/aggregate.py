"""Aggregation maths shared by the methods: the sample-weighted mean.

FedAvg (McMahan et al. 2017) and FedKSeed both aggregate with weights w_i = n_i / sum_k n_k, the
clients' sample counts: x = sum_i w_i x_i, a *mean* (a sum would grow the step with the number of
clients, a bug of one FedKSeed port).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def weighted_mean(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i, accumulated in float64, returned in the dtype of ``values``."""
    if len(values) != len(weights) or not values:
        raise ValueError("weighted_mean needs as many weights as values, and at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    acc = torch.zeros(values[0].shape, dtype=torch.float64)
    for v, w in zip(values, weights, strict=True):
        acc.add_(v.to(torch.float64), alpha=float(w))
    return (acc / total).to(values[0].dtype)


class WeightedMean:
    """Streaming form of :func:`weighted_mean` over named tensors.

    Replies are folded in as they arrive, so the server never holds every client's model at
    once; the result equals :func:`weighted_mean` over the same replies (float64 accumulator).
    """

    def __init__(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        for name, t in tensors.items():
            if name not in self._acc:
                self._acc[name] = torch.zeros(t.shape, dtype=torch.float64)
                self._dtypes[name] = t.dtype
            self._acc[name].add_(t.detach().to("cpu", torch.float64), alpha=float(weight))
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no replies were aggregated")
        return {k: (v / self.total_weight).to(self._dtypes[k]) for k, v in self._acc.items()}


WEIGHTINGS = ("samples", "equal")


def reply_weight(num_samples: int, weighting: str = "samples", cap: int = 0) -> float:
    """A reply's weight in the mean: its sample count (the papers'), capped at ``cap`` when
    ``cap`` > 0, or 1 for every reply (``equal``). The count is what the client *says*; the cap
    bounds how much one client's claim can outweigh the others."""
    if weighting == "equal":
        return 1.0
    if weighting != "samples":
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return float(min(num_samples, cap) if cap > 0 else num_samples)
