"""Aggregation maths shared by the methods: the weighted mean, and the robust and private rules.

FedAvg (McMahan et al. 2017) and FedKSeed both aggregate with weights w_i = n_i / sum_k n_k, the
clients' sample counts: x = sum_i w_i x_i, a *mean* (a sum would grow the step with the number of
clients, a bug of one FedKSeed port).

Beside the mean, over the clients' *updates* u_i (the change each proposes to the global state):

* **clipping** (``clip_l2``): u_i <- u_i * min(1, C / ||u_i||_2), the norm over all of a reply's
  tensors together, so no one reply moves the mean by more than C w_i / sum w;
* **coordinate-wise trimmed mean** (Yin et al., ICML 2018): per coordinate, drop the
  ceil(beta m) smallest and largest of the m values and average the rest (ceil: with 3 replies
  and beta = 0.2 one value is still dropped at each end);
* **coordinate-wise median** (same paper; the mean of the two middle values when m is even);
* **Gaussian noise** on the clipped sum before dividing (DP-FedAvg, McMahan et al., ICLR 2018):
  (sum_i w_i clip(u_i) + N(0, std^2 I)) / sum_i w_i.

The robust rules are unweighted (one client, one value per coordinate) and keep every reply of
a round in memory (m copies of the update); the mean streams.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedtune.seeds import derive


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
AGGREGATIONS = ("mean", "trimmed-mean", "median")


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all ``tensors`` together, as one vector (float64)."""
    return float(sum(float(t.double().pow(2).sum()) for t in tensors.values())) ** 0.5


def clip_l2(tensors: Mapping[str, torch.Tensor], bound: float
            ) -> tuple[dict[str, torch.Tensor], bool]:
    """Scale ``tensors`` jointly to L2 norm at most ``bound`` (> 0); return them and whether
    they were scaled. A non-finite norm cannot be scaled to anything meaningful: ValueError."""
    norm = l2_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("cannot clip a non-finite update")
    if norm <= bound:
        return dict(tensors), False
    scale = bound / norm
    return {k: t * scale for k, t in tensors.items()}, True


def trimmed_mean(stack: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise trimmed mean over dim 0 of ``stack`` (m, ...): per coordinate the
    ceil(trim * m) smallest and largest values are dropped and the rest averaged. ``trim`` in
    [0, 0.5); at least one value always remains."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    m = stack.shape[0]
    k = min(math.ceil(trim * m - 1e-9), (m - 1) // 2)  # 1e-9: 0.3 * 10 is 3.0000000000000004
    ordered = torch.sort(stack, dim=0).values
    return ordered[k:m - k].mean(dim=0)


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dim 0 of ``stack`` (m, ...); the mean of the two middle values
    when m is even (``torch.median`` would return the lower one)."""
    m = stack.shape[0]
    ordered = torch.sort(stack, dim=0).values
    return (ordered[(m - 1) // 2] + ordered[m // 2]) / 2


class Aggregator:
    """One round's aggregate of updates under a rule: ``mean`` (weighted, streamed), or the
    unweighted ``trimmed-mean`` / ``median``; each update first clipped to L2 norm ``clip``
    (0: not clipped); with ``noise_std`` > 0 (mean only) Gaussian noise of that standard
    deviation from ``generator`` is added to the weighted sum before it is divided.

    Accumulates in float64; ``result`` returns float64 tensors.
    """

    def __init__(self, rule: str = "mean", trim: float = 0.0, clip: float = 0.0,
                 noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        if rule not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {rule!r}; expected one of {AGGREGATIONS}")
        if noise_std > 0 and (rule != "mean" or generator is None):
            raise ValueError("noise needs the mean rule and a seeded generator")
        self.rule, self.trim, self.clip = rule, trim, clip
        self.noise_std, self.generator = noise_std, generator
        self._mean = WeightedMean()
        self._kept: list[dict[str, torch.Tensor]] = []
        self.clipped = 0

    @property
    def count(self) -> int:
        return self._mean.count if self.rule == "mean" else len(self._kept)

    def add(self, update: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        update = {k: v.detach().to("cpu", torch.float64) for k, v in update.items()}
        if self.clip > 0:
            update, was = clip_l2(update, self.clip)
            self.clipped += was
        if self.rule == "mean":
            self._mean.add(update, weight)
        else:
            self._kept.append(update)

    def result(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no replies were aggregated")
        if self.rule != "mean":
            combine = (coordinate_median if self.rule == "median"
                       else lambda s: trimmed_mean(s, self.trim))
            return {k: combine(torch.stack([u[k] for u in self._kept]))
                    for k in self._kept[0]}
        out = self._mean.result()
        if self.noise_std > 0:
            total = self._mean.total_weight
            for name in sorted(out):  # (sum + noise) / total; sorted: a fixed order of draws
                v = out[name]
                noise = torch.randn(v.shape, generator=self.generator, dtype=torch.float64)
                v.add_(noise, alpha=self.noise_std / total)
        return out


def reply_weight(num_samples: int, weighting: str = "samples", cap: int = 0) -> float:
    """A reply's weight in the mean: its sample count (the papers'), capped at ``cap`` when
    ``cap`` > 0, or 1 for every reply (``equal``). The count is what the client *says*; the cap
    bounds how much one client's claim can outweigh the others."""
    if weighting == "equal":
        return 1.0
    if weighting != "samples":
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return float(min(num_samples, cap) if cap > 0 else num_samples)


def refusal(update: Mapping[str, torch.Tensor], bound: float, norm: float | None = None
            ) -> str | None:
    """Why a round's aggregate ``update`` must not commit (None: it may): it is not finite, or
    it would move the global state by more than ``bound`` (L2; 0: no bound). ``norm``: the
    update's L2 norm when the caller has it already."""
    norm = l2_norm(update) if norm is None else norm
    if not math.isfinite(norm):
        return "the aggregate is not finite"
    if bound > 0 and norm > bound * (1 + 1e-9):
        return f"it would move the global state by {norm:.4g} (L2), more than the bound {bound:g}"
    return None


def lower_median(values: Sequence[float]) -> float:
    """The lower middle of ``values`` (of two, the smaller): a value one outlier cannot raise."""
    if not values:
        raise ValueError("no values")
    return sorted(values)[(len(values) - 1) // 2]


def outlier_refusal(change: float, norms: Sequence[float], factor: float) -> str | None:
    """Why a round whose aggregate moves the state by ``change`` (L2) must not commit when its
    replies' own updates have L2 norms ``norms`` (None: it may): the move is longer than
    ``factor`` times their lower median. A mean of honest updates is no longer than the longest
    of them, and honest updates of one round are of one size; one reply of a far larger size
    (1e6 on every value) makes the mean long, and the lower median of the sizes ignores it.
    ``factor`` 0 or no norms: no check."""
    if factor <= 0 or not norms:
        return None
    bound = factor * lower_median(norms)
    if change > bound * (1 + 1e-9):
        return (f"it would move the global state by {change:.4g} (L2), more than {factor:g} x "
                f"{bound / factor:.4g}, the median L2 size of its {len(norms)} updates")
    return None


@dataclass(frozen=True)
class Rules:
    """How a server turns one round's replies into its next state: the weights of the mean,
    the aggregation rule, the clip of each update, the privacy noise and the bound on a round's
    move (``algorithm.weighting``, ``[algorithm.robust]``, ``[algorithm.dp]``)."""

    weighting: str = "samples"
    max_sample_weight: int = 0
    aggregation: str = "mean"
    trim: float = 0.0
    clip: float = 0.0  # 0: no clip
    noise_std: float = 0.0  # 0: no noise
    noise_seed: int = 0
    max_change: float = 0.0  # 0: no bound
    outlier_factor: float = 0.0  # 0: no check against the replies' median size

    @property
    def watches_sizes(self) -> bool:
        """Whether the round's move is checked against the median size of its updates: only
        for a mean without a clip (a clip bounds every update already; the per-coordinate
        rules ignore a minority by construction)."""
        return self.outlier_factor > 0 and self.aggregation == "mean" and self.clip == 0

    @property
    def plain(self) -> bool:
        """The papers' weighted mean and nothing else (the state is aggregated directly)."""
        return (self.aggregation == "mean" and self.clip == 0 and self.noise_std == 0
                and self.max_change == 0)

    def weight(self, num_samples: int) -> float:
        return reply_weight(num_samples, self.weighting, self.max_sample_weight)

    def check_total(self, num_samples: Sequence[int], total_weight: float) -> str | None:
        """Why ``total_weight`` is not the weight of a mean of replies with these sample counts
        (None: it is), for a mean the server did not compute itself (secure aggregation)."""
        want = float(sum(self.weight(n) for n in num_samples))
        if not num_samples or not math.isclose(total_weight, want, rel_tol=1e-9):
            return (f"a mean of weight {total_weight:g} over {len(num_samples)} replies whose "
                    f"sample counts give {want:g}")
        return None

    def aggregator(self, round_: int) -> Aggregator:
        """The round's aggregator; its noise stream depends on (noise seed, round) only, so a
        resumed run draws what an uninterrupted one would."""
        gen = (torch.Generator().manual_seed(derive(self.noise_seed, "dp-noise", round_))
               if self.noise_std > 0 else None)
        return Aggregator(self.aggregation, self.trim, self.clip, self.noise_std, gen)
