"""Every random stream of a run, derived in one place from (seed, purpose, round, client).

The scheme: a stream is numpy's ``SeedSequence(entropy)`` with

    entropy = [root, *indices, *TAGS[purpose]]

``root`` is the run seed (``federation.seed``), a client seed, FedPT's ``distill_seed`` or
FedKSeed's pool seed (``algorithm.fedkseed.seed``); ``indices`` are the round and the client id
where the purpose has them. A client's streams hang below its client seed, itself the stream
``client`` of (run seed, round, client), so a device that is sent only its client seed derives
every stream it needs without knowing the run seed. Each purpose's tag is fixed for good (a new
purpose takes a new tag, so adding one never changes another's stream); the five purposes that
predate this table have short or empty tags, which keeps every earlier run reproducible.

=================== ========================  =====  ==========================================
purpose             root, indices             tag    used for
=================== ========================  =====  ==========================================
``clients``         run seed, round           ()     which clients a round samples
``client``          run seed, round, client   ()     the client seed (first 32-bit word)
``batches``         client seed               ()     local batch order (epoch-wise reshuffles)
``seed-indices``    client seed               (1,)   FedKSeed's pool indices (and FedPT's ZO
                                                     distillation's, from its step seed)
``fresh-seeds``     client seed               (2,)   MeZO / FedZO perturbation seeds
``pool``            FedKSeed seed, K          ()     the K seeds of the pool (63-bit words)
``distill-prompts`` distill seed, round       (7,)   FedPT's distillation prompts
``distill-steps``   distill seed, round       (8,)   FedPT's distillation step seed
``dp-noise``        DP noise seed, round      (9,)   the Gaussian noise of differential privacy
=================== ========================  =====  ==========================================

Dropout during local training is seeded with the client seed itself (``torch.manual_seed`` in a
forked RNG). Nothing here reads global RNG state, so a resumed run draws exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np

TAGS: dict[str, tuple[int, ...]] = {
    "clients": (), "client": (), "batches": (), "seed-indices": (1,), "fresh-seeds": (2,),
    "pool": (), "distill-prompts": (7,), "distill-steps": (8,),
    "dp-noise": (9,)}


def sequence(root: int, purpose: str, *indices: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of one stream (see the module table)."""
    if purpose not in TAGS:
        raise ValueError(f"unknown seed purpose {purpose!r}; add it to fedtune.seeds.TAGS")
    if root < 0 or any(i < 0 for i in indices):
        raise ValueError(f"seed parts must be >= 0, got {root} and {indices}")
    return np.random.SeedSequence([int(root), *map(int, indices), *TAGS[purpose]])


def rng(root: int, purpose: str, *indices: int) -> np.random.Generator:
    """A numpy generator on one stream."""
    return np.random.default_rng(sequence(root, purpose, *indices))


def derive(root: int, purpose: str, *indices: int) -> int:
    """One 63-bit integer seed of a stream."""
    return int(sequence(root, purpose, *indices).generate_state(1, np.uint64)[0]) >> 1


def sample_clients(num_clients: int, k: int, seed: int, round_: int) -> list[int]:
    """``k`` distinct client ids out of ``num_clients`` for ``round_``, sorted."""
    if not 1 <= k <= num_clients:
        raise ValueError(f"cannot sample {k} clients out of {num_clients}")
    choice = rng(seed, "clients", round_).choice(num_clients, size=k, replace=False)
    return sorted(int(i) for i in choice)


def client_seed(seed: int, round_: int, client_id: int) -> int:
    """The seed of one client's local randomness in one round."""
    return int(sequence(seed, "client", round_, client_id).generate_state(1)[0])


def seed_pool(seed: int, k_seeds: int) -> list[int]:
    """FedKSeed's K distinct 63-bit seeds, a pure function of (seed, K)."""
    state = sequence(seed, "pool", k_seeds).generate_state(k_seeds, np.uint64)
    seeds = [int(s) >> 1 for s in state]
    if len(set(seeds)) != k_seeds:  # 63-bit collisions: astronomically unlikely, never silent
        raise ValueError(f"seed pool of run seed {seed} has a duplicate; pick another seed")
    return seeds
