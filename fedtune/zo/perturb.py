"""The perturbation z(s) of zeroth-order training, and the in-place maths built on it.

Generator (version 1; changing it changes every FedKSeed model ever replayed):

    ps(s, i) = SeedSequence([s, i]).generate_state(1, uint64)[0] >> 1      (a 63-bit integer)
    z(s)_i   = torch.randn(shape_i, generator=torch.Generator("cpu").manual_seed(ps(s, i)),
                           dtype=torch.float32)

where ``i`` is the index of the parameter in the list of trainable parameters (the order of
``model.named_parameters()``, tied weights once). z(s) is therefore a pure function of the seed:
the draw always happens on the CPU in float32 with its own generator, and is only then moved and
cast to the parameter's device and dtype, so a CPU and a GPU device, any thread count, any batch
size and any other parameter's shape agree on it. One stream per (seed, parameter) means z for
parameter 3 never needs the draws of parameters 0..2.

Glossary: s a seed of the pool, z(s) the standard-normal direction over all trainable parameters,
eps (ε) the perturbation scale, g the projected gradient, lr the learning rate.

Precision: the ±εz perturb/restore is exact only up to rounding, and at ZO learning rates (1e-7)
most single updates vanish in fp16/bf16. Every master weight these functions change must be
float32; the functions refuse anything else rather than silently drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch

GENERATOR_VERSION = 1


@lru_cache(maxsize=1 << 16)
def param_seed(seed: int, index: int) -> int:
    """The 63-bit seed of the stream of parameter ``index`` under pool seed ``seed``."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def z_for(seed: int, index: int, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """z(seed) restricted to parameter ``index``: float32 on the CPU, of ``shape``."""
    gen = torch.Generator("cpu").manual_seed(param_seed(seed, index))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _check_fp32(params: Sequence[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        if p.dtype != torch.float32:
            raise TypeError(f"parameter {i} is {p.dtype}; zeroth-order master weights must be "
                            "float32 (see fedtune.zo.perturb)")


def _z_like(seed: int, index: int, p: torch.Tensor) -> torch.Tensor:
    return z_for(seed, index, p.shape).to(p.device)


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """θ ← θ + scale · z(seed), in place, one parameter at a time (one z slice in memory)."""
    _check_fp32(params)
    for i, p in enumerate(params):
        p.add_(_z_like(seed, i, p), alpha=scale)


@torch.no_grad()
def restore_and_update_(params: Sequence[torch.Tensor], seed: int, eps: float, lr: float,
                        g: float) -> None:
    """θ ← θ + (ε − lr·g) · z(seed): undo the −ε perturbation and take the step in one pass.

    Called with θ at θ₀ − εz, this leaves θ₀ − lr·g·z (up to fp32 rounding), saving one full
    generation of z per step against a separate restore and update.
    """
    perturb_(params, seed, eps - lr * g)


@torch.no_grad()
def replay_(params: Sequence[torch.Tensor], coeffs: Mapping[int, float]) -> None:
    """θ ← θ + Σ_s coeffs[s] · z(s), fused per parameter.

    For each parameter, acc = Σ_s c_s z(s)_i is accumulated in float32 over the seeds in
    ascending order (so the result does not depend on the mapping's order: two replays of the
    same coefficients are bitwise equal), then added to θ once. Seeds with a zero coefficient
    are skipped (they add exactly nothing). FedKSeed calls this with c_j = −lr · A_j.
    Memory: one float32 buffer the size of the largest parameter.
    """
    _check_fp32(params)
    seeds = sorted(s for s, c in coeffs.items() if c != 0.0)
    if not seeds:
        return
    for i, p in enumerate(params):
        acc = torch.zeros(p.shape, dtype=torch.float32)
        for s in seeds:
            acc.add_(z_for(s, i, p.shape), alpha=float(coeffs[s]))
        p.add_(acc.to(p.device))
