"""Low-rank seeded perturbations: z(s) = U(s) V(s)^T / sqrt(r) on every weight matrix.

LOZO (Chen et al., 2024, "Enhancing zeroth-order fine-tuning for language models with low-rank
structures") perturbs each weight matrix W (m x n) along a rank-r matrix U V^T instead of a
dense Gaussian. Here the factors come from the seed, so FedKSeed's pool still defines everything:

    U(s)_i = values 0 .. m r - 1 of stream 1 of parameter i, as an (m, r) row-major matrix
    V(s)_i = values 0 .. n r - 1 of stream 2 of parameter i, as an (n, r) row-major matrix
    z(s)_i = U V^T / sqrt(r)                       (a parameter of 2 or more dims, m = shape[0])
    z(s)_i = the dense generator-2 z               (a vector: norms, biases)

with the generator-2 values of :mod:`fedtune.zo.philox`. Each entry of U V^T / sqrt(r) has mean 0
and variance 1, as a dense z's, so ε and the learning rate keep their meaning across ranks. A step
draws (m + n) r values per matrix instead of m n, and the model of K seeds is one matrix product
per matrix,

    W = W0 - lr / sqrt(r) * [U_1 .. U_K] diag(A (x) 1_r) [V_1 .. V_K]^T,

instead of K dense draws. Products round differently from a sequence of additions, so a
low-rank replay equals the steps it summarises (and a perturb then restore equals the start) up
to float32 rounding, not bit for bit; the same rebuild on the same machine is deterministic.
Dense stays the default and the paper's method; LOZO also resamples V only every few steps,
which a fixed seed pool does not need.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import torch

from fedtune.zo import philox
from fedtune.zo.perturb import run_tasks

GROUP = 64  # seeds whose factors one matrix product of a replay stacks


def is_matrix(p: torch.Tensor) -> bool:
    """Whether a parameter is perturbed low-rank (2 or more dims) rather than densely."""
    return p.dim() >= 2


def _dims(p: torch.Tensor) -> tuple[int, int]:
    return p.shape[0], p.numel() // p.shape[0]


def factors(seed: int, index: int, p: torch.Tensor, rank: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) of parameter ``index`` under ``seed``: (m, r) and (n, r) float32 on p's device."""
    m, n = _dims(p)
    u = torch.empty(m * rank, dtype=torch.float32, device=p.device)
    v = torch.empty(n * rank, dtype=torch.float32, device=p.device)
    philox.fill_(u, seed, index, philox.U_STREAM)
    philox.fill_(v, seed, index, philox.V_STREAM)
    return u.view(m, rank), v.view(n, rank)


def z_lowrank(seed: int, index: int, p: torch.Tensor, rank: int) -> torch.Tensor:
    """z(seed) on parameter ``index`` in full (for tests and small models)."""
    if not is_matrix(p):
        return philox.fill_(torch.empty_like(p, dtype=torch.float32), seed, index)
    u, v = factors(seed, index, p, rank)
    return (u @ v.T).div_(math.sqrt(rank)).view(p.shape)


Drawn = list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor]


@torch.no_grad()
def draw(params: Sequence[torch.Tensor], seed: int, rank: int) -> Drawn:
    """z(seed) for every parameter in its compact form: (U, V) for a matrix, z for a vector."""
    out: Drawn = []
    for i, p in enumerate(params):
        if is_matrix(p):
            out.append(factors(seed, i, p, rank))
        else:
            out.append(philox.fill_(torch.empty_like(p, dtype=torch.float32), seed, i))
    return out


@torch.no_grad()
def add_(params: Sequence[torch.Tensor], drawn: Drawn, scale: float, rank: int) -> None:
    """θ ← θ + scale · z for a z drawn by :func:`draw` (one product per matrix)."""
    alpha = scale / math.sqrt(rank)
    for p, z in zip(params, drawn, strict=True):
        if isinstance(z, tuple):
            u, v = z
            p.view(u.shape[0], v.shape[0]).addmm_(u, v.T, alpha=alpha)
        else:
            p.add_(z, alpha=scale)


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float, rank: int) -> None:
    """θ ← θ + scale · z(seed)."""
    add_(params, draw(params, seed, rank), scale, rank)


@torch.no_grad()
def replay_(params: Sequence[torch.Tensor], coeffs: Mapping[int, float], rank: int, *,
            workers: int | None = None) -> None:
    """θ ← θ + Σ_s coeffs[s] · z(s): per matrix, products of ``GROUP`` seeds' stacked factors
    (seeds ascending); per vector, the dense sum as in :func:`fedtune.zo.perturb.replay_`."""
    seeds = sorted(s for s, c in coeffs.items() if c != 0.0)
    if not seeds:
        return
    scale = 1.0 / math.sqrt(rank)
    for i, p in enumerate(params):
        if not is_matrix(p):
            acc = torch.zeros_like(p, dtype=torch.float32)
            z = torch.empty_like(acc)
            for s in seeds:
                acc.add_(philox.fill_(z, s, i), alpha=float(coeffs[s]))
            p.add_(acc)
            continue
        m, n = _dims(p)
        flat = p.view(m, n)
        for g in range(0, len(seeds), GROUP):
            group = seeds[g:g + GROUP]
            us, vs = _stacked_factors(group, i, m, n, rank, p.device, workers)
            us.mul_(torch.tensor([float(coeffs[s]) for s in group], device=p.device)[:, None])
            k = len(group) * rank  # columns seed-major, as torch.cat of the seeds' U c_s
            flat.addmm_(us.view(-1, m, rank).permute(1, 0, 2).reshape(m, k),
                        vs.view(-1, n, rank).permute(1, 0, 2).reshape(n, k).T, alpha=scale)


def _stacked_factors(seeds: Sequence[int], index: int, m: int, n: int, rank: int,
                     device: torch.device, workers: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(seeds), m r) and (len(seeds), n r): every seed's U and V, rows drawn in one kernel
    call per task, U in two halves and V beside them on the threads."""
    us = torch.empty(len(seeds), m * rank, device=device)
    vs = torch.empty(len(seeds), n * rank, device=device)
    half = (len(seeds) + 1) // 2
    tasks = [(m * rank * half, partial(philox.fill_rows_, us[:half], seeds[:half], index,
                                       philox.U_STREAM)),
             (n * rank * len(seeds), partial(philox.fill_rows_, vs, seeds, index,
                                             philox.V_STREAM))]
    if half < len(seeds):
        tasks.append((m * rank * (len(seeds) - half),
                      partial(philox.fill_rows_, us[half:], seeds[half:], index,
                              philox.U_STREAM)))
    run_tasks(tasks, workers)
    return us, vs
