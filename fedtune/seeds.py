"""Every random stream of a run, derived in one place from (run seed, purpose, round, client).

The scheme: a stream is numpy's ``SeedSequence([root, PURPOSES[purpose], *indices])``, where
``root`` is the run seed (``federation.seed``; for FedPT's server steps ``distill_seed``; for the
FedKSeed pool ``algorithm.fedkseed.seed``) and ``indices`` the round and the client id where the
purpose has them. A client's streams hang below its client seed, itself the stream
``("client", round, client)`` of the run seed, so a device that is sent only its client seed
derives every stream it needs (batches, dropout, ZO seeds) without knowing the run seed.

The purpose codes are fixed numbers, never reordered (a new purpose takes the next number): a
purpose's stream does not change when another purpose is added. Nothing here reads global RNG
state, so a resumed run draws exactly what an uninterrupted one would have.

=================  ====  ==========================================  =========================
purpose            code  root, indices                               used for
=================  ====  ==========================================  =========================
``clients``        1     run seed, round                             which clients a round samples
``client``         2     run seed, round, client                     the client seed
``batches``        3     client seed                                 local batch order
``dropout``        4     client seed                                 torch seed of local dropout
``seed-indices``   5     client seed                                 FedKSeed's pool indices
``fresh-seeds``    6     client seed                                 MeZO / FedZO perturbation seeds
``distill-prompts`` 7    distill seed, round                         FedPT's distillation prompts
``distill-steps``  8     distill seed, round                         FedPT's distillation batches
``pool``           9     FedKSeed seed, K                            the K seeds of the pool
=================  ====  ==========================================  =========================
"""

from __future__ import annotations

import numpy as np

PURPOSES = {"clients": 1, "client": 2, "batches": 3, "dropout": 4, "seed-indices": 5,
            "fresh-seeds": 6, "distill-prompts": 7, "distill-steps": 8, "pool": 9}


def sequence(root: int, purpose: str, *indices: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of one stream (see the module table)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; add it to fedtune.seeds.PURPOSES")
    if root < 0 or any(i < 0 for i in indices):
        raise ValueError(f"seed parts must be >= 0, got {root} and {indices}")
    return np.random.SeedSequence([int(root), PURPOSES[purpose], *map(int, indices)])


def rng(root: int, purpose: str, *indices: int) -> np.random.Generator:
    """A numpy generator on one stream."""
    return np.random.default_rng(sequence(root, purpose, *indices))


def derive(root: int, purpose: str, *indices: int) -> int:
    """One 63-bit integer seed of a stream (a client seed, a torch seed)."""
    return int(sequence(root, purpose, *indices).generate_state(1, np.uint64)[0]) >> 1


def sample_clients(num_clients: int, k: int, seed: int, round_: int) -> list[int]:
    """``k`` distinct client ids out of ``num_clients`` for ``round_``, sorted."""
    if not 1 <= k <= num_clients:
        raise ValueError(f"cannot sample {k} clients out of {num_clients}")
    choice = rng(seed, "clients", round_).choice(num_clients, size=k, replace=False)
    return sorted(int(i) for i in choice)


def client_seed(seed: int, round_: int, client_id: int) -> int:
    """The seed of one client's local randomness in one round."""
    return derive(seed, "client", round_, client_id)


def seed_pool(seed: int, k_seeds: int) -> list[int]:
    """FedKSeed's K distinct 63-bit seeds, a pure function of (seed, K)."""
    state = sequence(seed, "pool", k_seeds).generate_state(k_seeds, np.uint64)
    seeds = [int(s) >> 1 for s in state]
    if len(set(seeds)) != k_seeds:  # 63-bit collisions: astronomically unlikely, never silent
        raise ValueError(f"seed pool of run seed {seed} has a duplicate; pick another seed")
    return seeds
