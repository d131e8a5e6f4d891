"""The device side of FedKSeed / FedKSeed-Pro: τ zeroth-order steps, seeds from the pool.

Each step draws a pool index j (uniformly, or from the Pro probabilities p), takes one two-point
ZO step with z(s_j) (:func:`fedtune.zo.zo_step`) and records g against j. The device keeps, per
touched seed, Σ g (what the server aggregates) and, for Pro, Σ|clip(g)| and the count; everything
else (the trained weights included) is discarded. Seed indices and batches come from the client
seed only (numpy generators, never global RNG state), so a round replays exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedtune.algorithms.fedavg.client import batch_indices
from fedtune.algorithms.fedkseed.pro import clipped_abs
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.zo.perturb import new_z_buffer
from fedtune.zo.step import zo_step

log = logging.getLogger(__name__)


@dataclass
class SeedStats:
    """Per touched pool index: Σ g, Σ |clip g|, count (float64 sums on the device)."""

    sum_g: dict[int, float] = field(default_factory=dict)
    sum_abs_clip: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)

    def add(self, j: int, g: float, clip: float) -> None:
        self.sum_g[j] = self.sum_g.get(j, 0.0) + g
        self.sum_abs_clip[j] = self.sum_abs_clip.get(j, 0.0) + clipped_abs(g, clip)
        self.count[j] = self.count.get(j, 0) + 1


def draw_seed_indices(k_seeds: int, tau: int, seed: int,
                      probs: np.ndarray | None = None) -> list[int]:
    """τ pool indices from the client seed: uniform, or from ``probs`` (renormalised in float64)."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from batch_indices' default_rng(seed)
    if probs is None:
        return [int(j) for j in rng.integers(0, k_seeds, size=tau)]
    p = np.asarray(probs, dtype=np.float64)
    return [int(j) for j in rng.choice(k_seeds, size=tau, p=p / p.sum())]


def local_zo_train(model: torch.nn.Module, params: Sequence[torch.Tensor], pool: Sequence[int],
                   examples: Sequence[TokenizedExample], *, tau: int, batch_size: int,
                   eps: float, lr: float, clip: float, pad_id: int, seed: int,
                   probs: np.ndarray | None = None, keep_z: bool = False
                   ) -> tuple[SeedStats, float, int]:
    """τ ZO-SGD steps on ``params`` in place; return (per-seed stats, mean loss, skipped steps).

    ``keep_z`` trades one float32 copy of ``params`` for two fewer generations of z per step.
    """
    if not examples:
        raise ValueError("a client with no examples cannot train")
    device = next(model.parameters()).device
    batches = batch_indices(len(examples), batch_size, seed)
    stats = SeedStats()
    losses: list[float] = []
    skipped = 0
    was_training = model.training
    model.eval()  # both forward passes must see the same function
    z_buffer = new_z_buffer(params) if keep_z else None
    for j in draw_seed_indices(len(pool), tau, seed, probs):
        batch = collate([examples[i] for i in next(batches)], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        g = zo_step(model, params, batch, pool[j], eps, lr, losses, keep_z=keep_z,
                    z_buffer=z_buffer)
        if g is None:
            skipped += 1
            continue
        stats.add(j, g, clip)
    model.train(was_training)
    if skipped:
        log.warning("skipped %d of %d ZO steps with a non-finite loss", skipped, tau)
    return stats, (float(np.mean(losses)) if losses else float("nan")), skipped
