"""The device side of FedAvg / FedIT: plain local training by backprop, in place.

``local_train`` runs ``steps`` optimizer steps on batches drawn from the client's examples (an
epoch-wise seeded shuffle, cycling), with a fresh optimizer each round as in FedAvg and FedIT.
Dropout and batch order come from ``seed`` only (a forked torch RNG), so a round can be replayed
exactly, which is what makes ``--resume`` reproduce an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedtune.data.prompts import TokenizedExample, collate

log = logging.getLogger(__name__)


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into ``n`` examples: a seeded reshuffle every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n).tolist()
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def local_train(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                examples: Sequence[TokenizedExample], *, steps: int, batch_size: int, lr: float,
                optimizer: str, weight_decay: float, max_grad_norm: float, pad_id: int,
                seed: int) -> tuple[float, int]:
    """Train ``params`` of ``model`` in place; return (mean train loss, skipped steps).

    Steps whose loss is not finite are skipped (no update) and counted.
    """
    if not examples:
        raise ValueError("a client with no examples cannot train")
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    device = next(model.parameters()).device
    batches = batch_indices(len(examples), batch_size, seed)
    losses: list[float] = []
    skipped = 0
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            batch = collate([examples[i] for i in next(batches)], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            if not math.isfinite(loss.item()):
                skipped += 1
                opt.zero_grad(set_to_none=True)
                continue
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.train(was_training)
    if skipped:
        log.warning("skipped %d of %d local steps with a non-finite loss", skipped, steps)
    return (float(np.mean(losses)) if losses else float("nan")), skipped
