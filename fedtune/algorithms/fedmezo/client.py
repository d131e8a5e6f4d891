"""The device side of FedMeZO: τ MeZO steps on the LoRA adapters, each with a fresh seed.

Each step draws a fresh 63-bit seed s (no pool, unlike FedKSeed: the seeds never leave the
device, the trained adapters do) and takes one two-point ZO step with z(s) over the adapter
matrices (:func:`fedtune.zo.zo_step`): two forward passes, no backprop, so memory stays at
inference level. Seeds and batches come from the client seed only (numpy generators, never global
RNG state), so a round replays exactly and ``--resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from fedtune.algorithms.fedavg.client import batch_indices
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.zo.step import zo_step

log = logging.getLogger(__name__)

SEED_BITS = 63


def draw_fresh_seeds(tau: int, seed: int) -> list[int]:
    """τ perturbation seeds in [0, 2^63) from the client seed, a pure function of it."""
    rng = np.random.default_rng([seed, 2])  # a stream apart from batch_indices' default_rng(seed)
    return [int(s) for s in rng.integers(0, 1 << SEED_BITS, size=tau, dtype=np.uint64)]


def local_mezo_train(model: torch.nn.Module, params: Sequence[torch.Tensor],
                     examples: Sequence[TokenizedExample], *, tau: int, batch_size: int,
                     eps: float, lr: float, pad_id: int, seed: int) -> tuple[float, int]:
    """τ ZO-SGD steps on ``params`` in place; return (mean of (L⁺ + L⁻) / 2, skipped steps).

    Steps with a non-finite loss are skipped (params restored, no update) and counted.
    """
    if not examples:
        raise ValueError("a client with no examples cannot train")
    device = next(model.parameters()).device
    batches = batch_indices(len(examples), batch_size, seed)
    losses: list[float] = []
    skipped = 0
    was_training = model.training
    model.eval()  # both forward passes must see the same function (LoRA dropout off)
    for s in draw_fresh_seeds(tau, seed):
        batch = collate([examples[i] for i in next(batches)], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if zo_step(model, params, batch, s, eps, lr, losses) is None:
            skipped += 1
    model.train(was_training)
    if skipped:
        log.warning("skipped %d of %d ZO steps with a non-finite loss", skipped, tau)
    return (float(np.mean(losses)) if losses else float("nan")), skipped
