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
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np
import torch

from fedtune.zo import philox
from fedtune.zo.perturb import run_tasks

INNER = 256  # the inner dimension (seeds x rank) of one matrix product of a replay


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
    """θ ← θ + Σ_s coeffs[s] · z(s), seeds ascending: per matrix, products of the stacked,
    coefficient-scaled factors of up to ``INNER // rank`` seeds at a time; per vector, the same
    seeds' dense z drawn as the rows of one matrix and summed by one matrix-vector product.
    The stacks live in buffers reused from matrix to matrix (fresh ones would page-fault)."""
    seeds = sorted(s for s, c in coeffs.items() if c != 0.0)
    if not seeds:
        return
    scale = 1.0 / math.sqrt(rank)
    group = max(1, INNER // rank)
    ws = _Workspace()
    keys = philox.seed_array(seeds)
    cs = torch.tensor([float(coeffs[s]) for s in seeds])
    for i, p in enumerate(params):
        for g in range(0, len(seeds), group):
            part = keys[g:g + group]
            c = cs[g:g + group].to(p.device)
            if not is_matrix(p):
                zs = ws.get("z", (len(part), p.numel()), p.device)
                run_tasks(_row_tasks(zs, part, i, philox.DENSE), workers)
                p.view(-1).addmv_(zs.T, c)
                continue
            m, n = _dims(p)
            k = len(part) * rank
            us, vs = ws.get("u", (len(part), m * rank), p.device), \
                ws.get("v", (len(part), n * rank), p.device)
            run_tasks(_row_tasks(us, part, i, philox.U_STREAM)
                      + _row_tasks(vs, part, i, philox.V_STREAM), workers)
            # columns seed-major (seed g's r columns side by side), V's scaled by the seed's c
            if rank == 1:
                ucols = us.T
            else:
                ucols = ws.get("uc", (m, k), p.device)
                ucols.view(m, len(part), rank).copy_(us.view(-1, m, rank).permute(1, 0, 2))
            vcols = ws.get("vc", (n, k), p.device)
            torch.mul(vs.view(-1, n, rank).permute(1, 0, 2), c[None, :, None],
                      out=vcols.view(n, len(part), rank))
            p.view(m, n).addmm_(ucols, vcols.T, alpha=scale)


class _Workspace:
    """Named float32 buffers, grown when a larger one is asked for, handed out as views."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self.bufs[name] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(shape)


def _row_tasks(out: torch.Tensor, seeds: np.ndarray, index: int, stream: int
               ) -> list[tuple[int, Callable[[], object]]]:
    """Tasks drawing row g of ``out`` as stream ``stream`` under seeds[g], in two halves."""
    half = (len(seeds) + 1) // 2
    cut = [(0, half), (half, len(seeds))] if half < len(seeds) else [(0, len(seeds))]
    return [((b - a) * out.shape[1],
             partial(philox.fill_rows_, out[a:b], seeds[a:b], index, stream)) for a, b in cut]
