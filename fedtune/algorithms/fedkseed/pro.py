"""FedKSeed-Pro: probability-differentiated seed sampling, as pure functions.

The server keeps, per seed j, sufficient statistics of the history of every g reported for it:
Σ g, Σ |clip(g, −c, c)| and the count. As in the reference, every history starts with one 0.0
entry, so the count starts at 1 and the sums at 0 (an untouched seed has importance 0, not 0/0).

    ψ_j = Σ |clip(g, −c, c)| / count_j                     importance (mean |clipped g|)
    ψ̃  = (ψ − min ψ) / (max ψ − min ψ)                     in [0, 1]; all equal -> all 0
    p   = softmax(ψ̃ / T)                                   T = 1 is the paper (no temperature)

With T = 1 the likeliest seed is at most e ≈ 2.72 times likelier than the least.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]


def initial_stats(k_seeds: int) -> tuple[F64, F64, F64]:
    """(Σ g, Σ |clip g|, count) for K seeds with the reference's initial 0.0 entry."""
    return np.zeros(k_seeds), np.zeros(k_seeds), np.ones(k_seeds)


def clipped_abs(g: float, clip: float) -> float:
    """|clip(g, −c, c)|."""
    return min(abs(g), clip)


def importance(sum_abs_clip: F64, count: F64) -> F64:
    """ψ_j = Σ |clip g| / count_j."""
    if np.any(count < 1):
        raise ValueError("every seed's count must be >= 1 (the initial 0.0 entry)")
    return np.asarray(sum_abs_clip, dtype=np.float64) / np.asarray(count, dtype=np.float64)


def minmax_normalise(psi: F64) -> F64:
    """(ψ − min) / (max − min); all-equal ψ gives all zeros (so p is uniform)."""
    lo, hi = float(np.min(psi)), float(np.max(psi))
    if hi == lo:
        return np.zeros_like(psi, dtype=np.float64)
    return (psi - lo) / (hi - lo)


def softmax(x: F64) -> F64:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def seed_probabilities(sum_abs_clip: F64, count: F64, temperature: float = 1.0) -> F64:
    """p = softmax(minmax(ψ) / T), float64, summing to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(minmax_normalise(importance(sum_abs_clip, count)) / temperature)
