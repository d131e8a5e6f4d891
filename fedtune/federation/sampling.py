"""Seeded randomness of the federation: which clients a round samples, and each client's seed.

Both are pure functions of (seed, round[, client]) through numpy's SeedSequence, never of global
RNG state, so a resumed run samples exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np


def sample_clients(num_clients: int, k: int, seed: int, round_: int) -> list[int]:
    """``k`` distinct client ids out of ``num_clients`` for ``round_``, sorted."""
    if not 1 <= k <= num_clients:
        raise ValueError(f"cannot sample {k} clients out of {num_clients}")
    rng = np.random.default_rng([seed, round_])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def client_seed(seed: int, round_: int, client_id: int) -> int:
    """The seed of one client's local randomness in one round (batches, dropout)."""
    return int(np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0])
