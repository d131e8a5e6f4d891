"""A device that trains its trainable tensors by MeZO: τ two-point zeroth-order steps, each with
a fresh seed (FedMeZO on LoRA adapters; FedZO on every parameter).

Each step draws a fresh 63-bit seed s (no pool, unlike FedKSeed: the seeds never leave the
device, the trained tensors do) and takes one two-point ZO step with z(s) over the trainable
tensors (:func:`fedtune.zo.zo_step`): two forward passes, no backprop, so memory stays at
inference level. Seeds and batches come from the client seed only (:mod:`fedtune.seeds`), so a
round replays exactly and ``--resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune import seeds
from fedtune.algorithms.fedavg.device import tensor_round
from fedtune.algorithms.local import run_steps, to_device
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.zo.step import zo_step

SEED_BITS = 63


def draw_fresh_seeds(tau: int, seed: int) -> list[int]:
    """τ perturbation seeds in [0, 2^63) from the client seed, a pure function of it."""
    rng = seeds.rng(seed, "fresh-seeds")
    return [int(s) for s in rng.integers(0, 1 << SEED_BITS, size=tau, dtype="uint64")]


def local_mezo_train(model: torch.nn.Module, params: Sequence[torch.Tensor],
                     examples: Sequence[TokenizedExample], *, tau: int, batch_size: int,
                     eps: float, lr: float, pad_id: int, seed: int) -> tuple[float, int]:
    """τ ZO-SGD steps on ``params`` in place; return (mean of (L⁺ + L⁻) / 2, skipped steps)."""
    fresh = draw_fresh_seeds(tau, seed)

    def step(i: int, batch: dict[str, torch.Tensor]) -> float | None:
        taken = zo_step(model, params, to_device(batch, model), fresh[i], eps, lr)
        return None if taken is None else taken.loss

    res = run_steps(model, examples, steps=tau, batch_size=batch_size, seed=seed,
                    collate=lambda b: collate(b, pad_id), step=step, train_mode=False,
                    what="ZO")
    return res.loss, res.skipped


class MeZODevice:
    """See :class:`fedtune.algorithms.base.Device`. ``delta``: reply with the change of the
    tensors (FedZO) instead of the tensors (FedMeZO)."""

    def __init__(self, tau: int, batch_size: int, eps: float, lr: float, pad_id: int, *,
                 delta: bool = False) -> None:
        self.tau, self.batch_size, self.eps, self.lr = tau, batch_size, eps, lr
        self.pad_id, self.delta = pad_id, delta

    def round(self, model: torch.nn.Module, payload: bytes,
              examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        def train(params: list[torch.nn.Parameter]) -> float:
            loss, _ = local_mezo_train(model, params, examples, tau=self.tau,
                                       batch_size=self.batch_size, eps=self.eps, lr=self.lr,
                                       pad_id=self.pad_id, seed=seed)
            return loss

        return tensor_round(model, payload, round_, len(examples), train, delta=self.delta)

    def kept_round(self, round_: int) -> int:
        return -1
