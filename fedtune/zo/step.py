"""One two-point zeroth-order step (MeZO, Malladi et al. 2023), in place and without autograd.

    θ ← θ + εz;  L⁺ = L(θ; B)
    θ ← θ − 2εz; L⁻ = L(θ; B)
    g = (L⁺ − L⁻) / (2ε)                    the projected gradient, a scalar
    θ ← θ + (ε − lr·g) z                   restore and SGD update fused in one pass

with z = z(seed) from :mod:`fedtune.zo.perturb`. The model must be in ``eval()`` mode so both
forward passes see the same function (no dropout). Three generations of z per step and no copy of
the model: memory stays at inference level, as in MeZO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedtune.zo.perturb import perturb_, restore_and_update_


@torch.no_grad()
def zo_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    """The model's mean token loss on ``batch`` (input_ids, attention_mask, labels)."""
    return float(model(**batch).loss.item())


@torch.no_grad()
def zo_step(model: torch.nn.Module, params: Sequence[torch.Tensor],
            batch: Mapping[str, torch.Tensor], seed: int, eps: float, lr: float,
            losses: list[float] | None = None) -> float | None:
    """One ZO-SGD step on ``params`` (the model's trainable parameters, in index order).

    Returns g, or None when L⁺ or L⁻ is not finite: then θ is restored with +εz and nothing is
    updated (the step is skipped). If ``losses`` is given, (L⁺ + L⁻) / 2 of a taken step is
    appended to it, for the reported train loss.
    """
    if model.training:
        raise RuntimeError("zo_step needs the model in eval() mode (dropout off)")
    perturb_(params, seed, eps)
    loss_plus = zo_loss(model, batch)
    perturb_(params, seed, -2.0 * eps)
    loss_minus = zo_loss(model, batch)
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        perturb_(params, seed, eps)
        return None
    g = (loss_plus - loss_minus) / (2.0 * eps)
    restore_and_update_(params, seed, eps, lr, g)
    if losses is not None:
        losses.append(0.5 * (loss_plus + loss_minus))
    return g
