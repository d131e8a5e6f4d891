"""The one local loop: ``steps`` steps over seeded batches, a step function, a mean loss.

Every method's local training is this loop with its own step: backprop (FedAvg, FedIT, the
prompt methods), a two-point zeroth-order step (FedKSeed, FedMeZO, FedZO) or a distillation step
(FedPT's server). The loop owns what they share: batches drawn by an epoch-wise seeded reshuffle
(the ``batches`` stream of :mod:`fedtune.seeds`), the model's mode (``train`` for dropout,
``eval`` where both forwards of a ZO step must see one function), dropout seeded with the
client seed in a forked torch RNG (global RNG state is never touched), steps whose loss is
not finite skipped and counted, and the mean loss of the taken steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from fedtune import seeds

log = logging.getLogger(__name__)
T = TypeVar("T")
B = TypeVar("B")


@dataclass(frozen=True)
class LoopResult:
    loss: float  # mean loss of the taken steps (nan when every step was skipped)
    taken: int
    skipped: int


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into ``n`` items: a seeded reshuffle every epoch."""
    rng = seeds.rng(seed, "batches")
    while True:
        order = rng.permutation(n).tolist()
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def run_steps(model: torch.nn.Module, items: Sequence[T], *, steps: int, batch_size: int,
              seed: int, collate: Callable[[list[T]], B], step: Callable[[int, B], float | None],
              train_mode: bool, what: str = "local") -> LoopResult:
    """Run ``step(i, batch)`` for i in 0..steps-1 on seeded batches of ``items``.

    ``step`` returns the step's loss, or None (or a non-finite loss) when it skipped the step
    and changed nothing. ``train_mode``: the model's mode during the loop (restored after).
    """
    if not items:
        raise ValueError(f"{what} training needs at least one example")
    batches = batch_indices(len(items), batch_size, seed)
    device = next(model.parameters()).device
    losses: list[float] = []
    skipped = 0
    was_training = model.training
    model.train(train_mode)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)  # dropout: the client seed itself (fedtune.seeds)
            for i in range(steps):
                loss = step(i, collate([items[j] for j in next(batches)]))
                if loss is None or not math.isfinite(loss):
                    skipped += 1
                else:
                    losses.append(loss)
    finally:
        model.train(was_training)
    if skipped:
        log.warning("skipped %d of %d %s steps with a non-finite loss", skipped, steps, what)
    return LoopResult(float(np.mean(losses)) if losses else float("nan"), len(losses), skipped)


def to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def lm_loss(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The language-model loss of a collated batch (input_ids, attention_mask, labels)."""
    return lambda batch: model(**to_device(batch, model)).loss


def backprop_step(params: Sequence[torch.nn.Parameter], opt: torch.optim.Optimizer,
                  max_grad_norm: float, loss_fn: Callable[[B], torch.Tensor], *,
                  accumulate: int = 1, scheduler: LRScheduler | None = None
                  ) -> Callable[[int, B], float | None]:
    """A step function for :func:`run_steps`: backprop of ``loss_fn(batch)``, and one optimizer
    (and ``scheduler``) step every ``accumulate`` batches on the mean of their gradients.

    A batch whose loss is not finite is skipped (no backward; its window steps on the others).
    """
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")

    def step(i: int, batch: B) -> float | None:
        loss = loss_fn(batch)
        value = float(loss.item())
        finite = math.isfinite(value)
        if finite:
            (loss / accumulate if accumulate > 1 else loss).backward()
        if (i + 1) % accumulate == 0:
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if any(p.grad is not None for p in params):
                opt.step()
            if scheduler is not None:
                scheduler.step()
            opt.zero_grad(set_to_none=True)
        return value if finite else None

    return step


SCHEDULES = ("constant", "linear", "cosine")


def make_scheduler(opt: torch.optim.Optimizer, name: str, warmup: int, steps: int
                   ) -> LRScheduler | None:
    """transformers' schedule ``name`` over ``steps`` optimizer steps after ``warmup`` linear
    warm-up steps (None: a constant rate without warm-up, nothing to schedule)."""
    if name == "constant" and warmup == 0:
        return None
    from transformers import get_scheduler

    kind = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(kind, opt, num_warmup_steps=warmup,  # type: ignore[no-any-return]
                         num_training_steps=steps)


def make_optimizer(params: Sequence[torch.nn.Parameter], name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")
