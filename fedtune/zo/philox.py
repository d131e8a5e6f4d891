"""Generator version 2: z from the counter-based generator Philox4x32-10 and an exact-op Box-Muller.

Every value of z(s) is a pure function of (seed, parameter index, position), computed from a
counter with no state in between, so any chunk of any parameter is drawn on its own: all threads
share every tensor, a device draws straight into a CUDA tensor, and nothing depends on torch's CPU
generator. The algorithm, exactly (another runtime reproduces it bit for bit from this text):

**Bits.** Philox4x32-10 (Salmon et al., SC 2011; the generator of Random123, JAX's ``rbg`` and
torch's CUDA generator): a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1), 32-bit
words; ten rounds of

    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0,  lo(M1 c2),  hi(M0 c0) ^ c3 ^ k1,  lo(M0 c0))
    (k0, k1)         <- (k0 + W0, k1 + W1)  mod 2^32

with M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85 and hi/lo the upper and
lower 32 bits of the 64-bit product; the output is the counter after the tenth round.
For value v of parameter i (its flat, row-major index) under pool seed s, stream t:

    key     = (s mod 2^32, floor(s / 2^32) mod 2^32)
    counter = (b mod 2^32, floor(b / 2^32), i, t),  b = floor(v / 4)   (the block)

so one block gives the four values 4b .. 4b+3 (the last block of a parameter is cut to its size).
Stream t = 0 is the dense z; low-rank perturbations draw their factors U and V as streams 1 and 2
(:mod:`fedtune.zo.lowrank`).

**Normals.** A block's words (x0, x1, x2, x3) give two Box-Muller pairs, (x0, x1) -> values 4b
and 4b+1, (x2, x3) -> 4b+2 and 4b+3. For a pair (a, c), every operation below in IEEE-754
binary32, round to nearest, each rounded on its own (no fused multiply-add):

    radius   u = (2 (a >> 9) + 1) 2^-24 in (0, 1):  write w = 2 (a >> 9) + 1 = 2^e m exactly,
             e an integer and m in [1, 2) (the float's exponent and mantissa); if m > 1.41421354
             (binary32 sqrt(2), 0x3FB504F3) then m <- m / 2, e <- e + 1.
             q = (m - 1) / (m + 1);  q2 = q * q
             P = (((1/9 * q2 + 1/7) * q2 + 1/5) * q2 + 1/3) * q2 + 1
             ln u = (2 * q) * P + (e - 24) * LN2         (LN2 = binary32 ln 2)
             r = sqrt(-2 * ln u)
    angle    j = ((c >> 9) + 2^20) mod 2^23;  k = j >> 21 (the quadrant);
             x = ((j mod 2^21) - 2^20) * D,  D = binary32(2 pi / 2^23),  x in [-pi/4, pi/4)
             x2 = x * x
             S = x + (x * x2) * (((x2 / 9! - 1/7!) * x2 + 1/5!) * x2 - 1/3!)
             C = 1 + x2 * ((((-x2 / 10! + 1/8!) * x2 - 1/6!) * x2 + 1/4!) * x2 - 1/2)
             (sin, cos) of the angle 2 pi (c >> 9) 2^-23 = k pi/2 + x: k = 0: (S, C);
             1: (C, -S); 2: (-S, -C); 3: (-C, S)
    values   r * cos, r * sin

Every constant is the binary32 rounding of the written value (``1/9`` is float32(1/9), the
factorials exact), and ``x2 / 9!`` above is written ``float32(1/9!) * x2``. The series are the
Taylor series, truncated where the remainder is below 2e-9 on [-pi/4, pi/4]: the values are the
standard normal's up to binary32 rounding and a 23-bit uniform (|z| <= 5.64). Only exactly
rounded operations appear (+, -, *, /, sqrt, integer bit operations), so the values are the same
bits on every IEEE machine that follows the text: this module's torch implementation (CPU and
CUDA) and its compiled CPU kernel are tested equal bit for bit on the CPU, and both against a
plain scalar reference in the tests. What a CUDA device adds is only whether its compiler keeps
the operations separate: torch's element-wise kernels do (one operation per kernel launch), so
CPU and CUDA draws are equal bit for bit too; that part is argued, not tested, on a machine
without a GPU.

**Speed.** On the CPU the draw is a compiled kernel (numba, ``nogil``, vectorised: a multiply
of 32-bit words and polynomials instead of library ``log``/``sin``/``cos``), called page by page
from threads; without numba the torch implementation gives the same bits more slowly.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

log = logging.getLogger(__name__)

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
DENSE, U_STREAM, V_STREAM = 0, 1, 2
SQRT2_BITS = 0x3FB504F3
_F = np.float32
LN2 = _F(math.log(2.0))
ANGLE_STEP = _F(2.0 * math.pi / 2**23)
LOG_COEFFS = tuple(_F(x) for x in (1 / 9, 1 / 7, 1 / 5, 1 / 3))
SIN_COEFFS = tuple(_F(x) for x in (1 / 362880, 1 / 5040, 1 / 120, 1 / 6))
COS_COEFFS = tuple(_F(x) for x in (1 / 3628800, 1 / 40320, 1 / 720, 1 / 24))


def split_key(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a pool seed (any integer in [0, 2^64))."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"a generator-2 seed must be in [0, 2^64), got {seed}")
    return seed & MASK32, (seed >> 32) & MASK32


# -- the torch implementation (any device) --------------------------------------------------------

def _philox_torch(b: torch.Tensor, k0: int, k1: int, c2: int, c3: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of the counters (b mod 2^32, b >> 32, c2, c3); words held in int64."""
    x0, x1 = b & MASK32, (b >> 32) & MASK32
    x2 = torch.full_like(b, c2 & MASK32)
    x3 = torch.full_like(b, c3 & MASK32)
    for _ in range(10):
        p0 = x0 * M0  # < 2^64: wraps in int64, but the bits are the unsigned product's
        p1 = x2 * M1
        x0, x1, x2, x3 = ((p1 >> 32) & MASK32) ^ x1 ^ k0, p1 & MASK32, \
            ((p0 >> 32) & MASK32) ^ x3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return x0, x1, x2, x3


def _pair_torch(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Box-Muller pair (r cos, r sin) of the words (a, c), as the module doc writes it."""
    f32 = torch.float32
    w = (((a >> 9) << 1) | 1).to(f32)  # exact: < 2^24
    bits = w.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 127
    mbits = (bits & 0x7FFFFF) | 0x3F800000
    big = mbits > SQRT2_BITS
    mbits = torch.where(big, mbits - (1 << 23), mbits)
    e = e + big.to(torch.int64) - 24
    m = mbits.to(torch.int32).view(f32)
    q = (m - 1.0) / (m + 1.0)
    q2 = q * q
    p = q2 * float(LOG_COEFFS[0]) + float(LOG_COEFFS[1])
    for coef in (*LOG_COEFFS[2:], _F(1.0)):
        p = p * q2 + float(coef)
    lnu = (q * 2.0) * p + e.to(f32) * float(LN2)
    # sqrt through float64: torch's float32 CPU sqrt is not correctly rounded (seen: 1 ulp off),
    # its float64 one is, and rounding that to float32 gives the correctly rounded float32 root
    r = torch.sqrt((lnu * -2.0).double()).to(f32)

    j = ((c >> 9) + (1 << 20)) & ((1 << 23) - 1)
    k = j >> 21
    x = ((j & ((1 << 21) - 1)) - (1 << 20)).to(f32) * float(ANGLE_STEP)
    x2 = x * x
    sp = x2 * float(SIN_COEFFS[0]) - float(SIN_COEFFS[1])
    sp = sp * x2 + float(SIN_COEFFS[2])
    sp = sp * x2 - float(SIN_COEFFS[3])
    s = x + (x * x2) * sp
    cp = x2 * float(-COS_COEFFS[0]) + float(COS_COEFFS[1])
    cp = cp * x2 - float(COS_COEFFS[2])
    cp = cp * x2 + float(COS_COEFFS[3])
    cp = cp * x2 - 0.5
    co = x2 * cp + 1.0
    odd = (k & 1) == 1
    sin = torch.where(odd, co, s)
    cos = torch.where(odd, s, co)
    sin = torch.where(k >= 2, -sin, sin)
    cos = torch.where((k == 1) | (k == 2), -cos, cos)
    return r * cos, r * sin


def draw_torch(n: int, seed: int, index: int, stream: int = DENSE, offset: int = 0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Values offset .. offset+n-1 of z(seed) on parameter ``index`` (``offset`` % 4 == 0), as a
    float32 tensor on ``device``, computed there with torch operations."""
    if offset % 4:
        raise ValueError(f"offset must be a multiple of 4, got {offset}")
    k0, k1 = split_key(seed)
    nblocks = -(-n // 4)
    b = torch.arange(offset // 4, offset // 4 + nblocks, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = _philox_torch(b, k0, k1, index, stream)
    c0, s0 = _pair_torch(x0, x1)
    c1, s1 = _pair_torch(x2, x3)
    return torch.stack((c0, s0, c1, s1), dim=1).reshape(-1)[:n]


# -- the compiled CPU kernel ----------------------------------------------------------------------

@lru_cache(maxsize=1)
def _kernel():  # type: ignore[no-untyped-def]
    """The module of numba kernels (:mod:`fedtune.zo._philox_numba`: ``fill``, ``fill_rows``,
    ``axpy``), loaded on first use from numba's on-disk cache, or None without numba."""
    try:
        from fedtune.zo import _philox_numba
    except ImportError:  # pragma: no cover - numba is a dependency; a platform may lack it
        log.warning("numba is not installed: generator-2 draws use torch operations (the same "
                    "values, several times slower on a CPU)")
        return None
    return _philox_numba


PAGE_BLOCKS = 1024  # blocks a kernel call computes at a time (its scratch stays in L1/L2)


class _Scratch:
    """Per-thread scratch of the kernel (uint32 words, float32 temporaries, one tail block)."""

    def __init__(self) -> None:
        self.w = [np.empty(2 * PAGE_BLOCKS, np.uint32) for _ in range(2)]
        self.f = [np.empty(2 * PAGE_BLOCKS, np.float32), np.empty(2 * PAGE_BLOCKS, np.uint32),
                  np.empty(2 * PAGE_BLOCKS, np.float32), np.empty(2 * PAGE_BLOCKS, np.float32)]
        self.page = np.empty(4 * PAGE_BLOCKS, np.float32)
        self.tail = np.empty(4, np.float32)


_scratch_local = threading.local()


def compiled() -> bool:
    """Whether the compiled CPU kernel is available (numba installed)."""
    return _kernel() is not None


def _cpu(t: torch.Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.is_contiguous()
                         and t.dtype == torch.float32)


def draw_(seed: int, index: int, *, out: torch.Tensor | None = None,
          add_to: torch.Tensor | None = None, scale: float = 1.0, stream: int = DENSE,
          offset: int = 0, carry: float = 0.0) -> None:
    """Values offset, offset+1, ... of stream ``stream`` of parameter ``index`` under ``seed``:
    written into ``out``, and/or added to ``add_to`` times ``scale`` (as :func:`axpy_` does),
    in one pass (float32 tensors of one length; ``offset`` % 4 == 0). ``carry`` (with both
    ``out`` and ``add_to``): first add_to ← add_to + carry · out, the values ``out`` holds
    before the draw, page by page as the new values replace them (a step's deferred last move
    made in the pass that draws the next step's z)."""
    if offset % 4:
        raise ValueError(f"offset must be a multiple of 4, got {offset}")
    if out is None and add_to is None:
        raise ValueError("draw_ needs out, add_to or both")
    for t in (out, add_to):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"z is drawn in float32, got a {t.dtype} tensor")
    n = (out if out is not None else add_to).numel()  # type: ignore[union-attr]
    if add_to is not None and add_to.numel() != n:
        raise ValueError(f"out has {n} values, add_to {add_to.numel()}")
    kernel = _kernel() if _cpu(out) and _cpu(add_to) else None
    if carry and (out is None or add_to is None):
        raise ValueError("carry needs both out and add_to")
    if kernel is None:
        if carry and out is not None and add_to is not None:
            axpy_(add_to, out.view(add_to.shape), carry)
        device = (out if out is not None else add_to).device  # type: ignore[union-attr]
        z = draw_torch(n, seed, index, stream, offset, device)
        if out is not None:
            out.copy_(z.view(out.shape))
        if add_to is not None:
            axpy_(add_to, z.view(add_to.shape), scale)
        return
    k0, k1 = split_key(seed)
    s = _thread_scratch()
    none = s.tail[:0]
    if carry:
        kernel.refill(out.view(-1).numpy(), add_to.view(-1).numpy(),  # type: ignore[union-attr]
                      np.float32(carry), np.float32(scale), offset // 4, k0, k1, index, stream,
                      *s.w, *s.f, s.page, s.tail)
        return
    mode = 0 if add_to is None else (1 if out is None else 2)
    kernel.fill(none if out is None else out.view(-1).numpy(),
           none if add_to is None else add_to.view(-1).numpy(), np.float32(scale), mode,
           offset // 4, k0, k1, index, stream, *s.w, *s.f, s.page, s.tail)


def _thread_scratch() -> _Scratch:
    s = getattr(_scratch_local, "s", None)
    if s is None:
        s = _scratch_local.s = _Scratch()
    return s


def fill_(out: torch.Tensor, seed: int, index: int, stream: int = DENSE, offset: int = 0
          ) -> torch.Tensor:
    """Write values offset .. offset+out.numel()-1 of stream ``stream`` of parameter ``index``
    under ``seed`` into ``out`` (float32; ``offset`` % 4 == 0) and return it."""
    draw_(seed, index, out=out, stream=stream, offset=offset)
    return out


def fill_rows_(out: torch.Tensor, seeds: Sequence[int] | np.ndarray, index: int,
               stream: int = DENSE) -> torch.Tensor:
    """Row g of ``out`` (G, L) <- values 0 .. L-1 of stream ``stream`` of parameter ``index``
    under ``seeds[g]``: many seeds' draws in one call (a low-rank rebuild's factors). ``seeds``
    may be a uint64 array (:func:`seed_array`), which saves converting it on every call."""
    if out.dim() != 2 or out.shape[0] != len(seeds):
        raise ValueError(f"out must be ({len(seeds)}, L), got {tuple(out.shape)}")
    kernel = _kernel() if _cpu(out) else None
    if kernel is None:
        for g, seed in enumerate(seeds):
            draw_(seed, index, out=out[g], stream=stream)
        return out
    keys = seed_array(seeds)
    s = _thread_scratch()
    kernel.fill_rows(out.numpy(), (keys & MASK32).astype(np.int64),
                     (keys >> np.uint64(32)).astype(np.int64), index, stream, *s.w, *s.f,
                     s.page, s.tail)
    return out


def accumulate_(acc: torch.Tensor, seeds: Sequence[int] | np.ndarray,
                coeffs: Sequence[float] | np.ndarray,
                index: int, stream: int = DENSE, offset: int = 0) -> torch.Tensor:
    """acc ← acc + coeffs[g] · z(seeds[g]) for g = 0, 1, ... in turn, z the values offset ..
    of stream ``stream`` of parameter ``index``: each addition bitwise torch's
    ``acc.add_(z, alpha=coeffs[g])``, all of them in one call of the compiled kernel."""
    if offset % 4:
        raise ValueError(f"offset must be a multiple of 4, got {offset}")
    if len(coeffs) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(coeffs)} coefficients")
    kernel = _kernel() if _cpu(acc) else None
    if kernel is None:
        for seed, c in zip(seeds, coeffs, strict=True):
            draw_(int(seed), index, add_to=acc, scale=float(c), stream=stream, offset=offset)
        return acc
    keys = seed_array(seeds)
    s = _thread_scratch()
    kernel.accumulate(acc.view(-1).numpy(), (keys & MASK32).astype(np.int64),
                      (keys >> np.uint64(32)).astype(np.int64),
                      np.asarray(coeffs, dtype=np.float32), offset // 4, index, stream,
                      *s.w, *s.f, s.page, s.tail)
    return acc


def seed_array(seeds: Sequence[int] | np.ndarray) -> np.ndarray:
    """Pool seeds as a uint64 array (each must be in [0, 2^64), as :func:`split_key` asks)."""
    if isinstance(seeds, np.ndarray) and seeds.dtype == np.uint64:
        return seeds
    for seed in seeds:
        split_key(int(seed))
    return np.array([int(seed) for seed in seeds], dtype=np.uint64)


def axpy_(theta: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """theta <- theta + float32(scale) * z as torch's ``theta.add_(z, alpha=scale)`` computes
    it (one fused multiply-add per value where the CPU has one), bit for bit: the compiled
    kernel on the CPU, torch's ``add_`` elsewhere. :func:`draw_` with ``add_to`` adds the same
    way as it draws, so a move made while drawing equals one made afterwards with torch."""
    kernel = _kernel() if _cpu(theta) and _cpu(z) else None
    if kernel is None:
        theta.add_(z, alpha=scale)
        return
    kernel.axpy(theta.view(-1).numpy(), 0, z.view(-1).numpy(), 0, theta.numel(),
                    np.float32(scale))
