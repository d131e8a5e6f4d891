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
    """The numba kernel ``fill(out, first_block, k0, k1, c2, c3, *scratch)``,
    compiled on first use (cached on disk), or None without numba."""
    try:
        import numba  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - numba is a dependency; a platform may lack it
        log.warning("numba is not installed: generator-2 draws use torch operations (the same "
                    "values, several times slower on a CPU)")
        return None
    u32, u64, i32, f32 = np.uint32, np.uint64, np.int32, np.float32
    m0, m1, w0, w1 = u64(M0), u64(M1), u32(W0), u32(W1)
    lo, s32 = u64(MASK32), u64(32)
    ln2, step = LN2, ANGLE_STEP
    l0, l1, l2, l3 = LOG_COEFFS
    sa, sb, sc, sd = SIN_COEFFS
    ca, cb, cc, cd = COS_COEFFS
    one, half, two, mtwo = f32(1.0), f32(0.5), f32(2.0), f32(-2.0)
    jit = numba.njit(nogil=True, cache=True, fastmath=False, error_model="numpy",
                     boundscheck=False, no_cpython_wrapper=False)

    @jit
    def philox(first, nb, k0, k1, c2, c3, wa, wc):  # wa = [x0 | x2], wc = [x1 | x3]
        for b in range(nb):
            blk = u64(first) + u64(b)
            x0, x1, x2, x3 = u32(blk & lo), u32(blk >> s32), u32(c2), u32(c3)
            a0, a1 = u32(k0), u32(k1)
            for _ in range(10):
                p0 = u64(x0) * m0
                p1 = u64(x2) * m1
                y0 = u32(u32(p1 >> s32) ^ x1 ^ a0)
                y2 = u32(u32(p0 >> s32) ^ x3 ^ a1)
                x1, x3, x0, x2 = u32(p1 & lo), u32(p0 & lo), y0, y2
                a0, a1 = u32(a0 + w0), u32(a1 + w1)
            wa[b], wc[b], wa[nb + b], wc[nb + b] = x0, x1, x2, x3

    @jit
    def exact_float(n, wa, fw):
        for i in range(n):
            fw[i] = f32(i32(((wa[i] >> u32(9)) << u32(1)) | u32(1)))

    @jit
    def split(n, bits, mb, fe):
        for i in range(n):
            bb = bits[i]
            m = (bb & u32(0x7FFFFF)) | u32(0x3F800000)
            big = m > u32(SQRT2_BITS)
            mb[i] = m - (u32(1 << 23) if big else u32(0))
            fe[i] = f32(i32(bb >> u32(23)) - i32(127) + (i32(1) if big else i32(0)) - i32(24))

    @jit
    def radius(n, fm, fe, r):
        for i in range(n):
            m = fm[i]
            q = (m - one) / (m + one)
            q2 = q * q
            p = ((((l0 * q2 + l1) * q2 + l2) * q2 + l3) * q2 + one)
            lnu = (two * q) * p + fe[i] * ln2
            r[i] = np.sqrt(mtwo * lnu)

    @jit
    def sincos(n, wc, zs, zc):
        for i in range(n):
            j = ((wc[i] >> u32(9)) + u32(1 << 20)) & u32((1 << 23) - 1)
            k = j >> u32(21)
            x = f32(i32(j & u32((1 << 21) - 1)) - i32(1 << 20)) * step
            x2 = x * x
            s = x + (x * x2) * (((sa * x2 - sb) * x2 + sc) * x2 - sd)
            co = one + x2 * (((((-ca) * x2 + cb) * x2 - cc) * x2 + cd) * x2 - half)
            odd = (k & u32(1)) == u32(1)
            sn = co if odd else s
            cs = s if odd else co
            zs[i] = -sn if k >= u32(2) else sn
            zc[i] = -cs if (k == u32(1) or k == u32(2)) else cs

    @jit
    def store(nb, r, zs, zc, out, at):
        base = u64(at)
        for b in range(u64(nb)):
            o = base + u64(4) * b
            out[o] = r[b] * zc[b]
            out[o + u64(1)] = r[b] * zs[b]
            out[o + u64(2)] = r[u64(nb) + b] * zc[u64(nb) + b]
            out[o + u64(3)] = r[u64(nb) + b] * zs[u64(nb) + b]

    @jit
    def block(first, nb, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, out, at):
        n = 2 * nb
        philox(first, nb, k0, k1, c2, c3, wa, wc)
        exact_float(n, wa, fw)
        split(n, fw.view(np.uint32), mb, fe)
        radius(n, mb.view(np.float32), fe, r)
        sincos(n, wc, fw, fe)
        store(nb, r, fw, fe, out, at)

    @jit
    def axpy(dst, dst_at, src, src_at, n, s):  # dst[i] <- dst[i] + s * src[i], two roundings
        a, b = u64(dst_at), u64(src_at)
        for i in range(u64(n)):
            dst[a + i] = dst[a + i] + s * src[b + i]

    @jit
    def fill(out, theta, s, mode, first, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, page, tail):
        # mode 0: out <- z;  1: theta <- theta + s z (out unused: z passes through `page`);
        # 2: both. out / theta hold values first*4 ...; n is the length of the one in use.
        npage = wa.size // 2
        n = theta.size if mode == 1 else out.size
        full = n // 4
        done = 0
        while done < full:
            nb = min(npage, full - done)
            if mode == 1:
                block(first + done, nb, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, page, 0)
                axpy(theta, 4 * done, page, 0, 4 * nb, s)
            else:
                block(first + done, nb, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, out, 4 * done)
                if mode == 2:
                    axpy(theta, 4 * done, out, 4 * done, 4 * nb, s)
            done += nb
        rest = n - 4 * full
        if rest:
            block(first + full, 1, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, tail, 0)
            if mode != 1:
                for i in range(rest):
                    out[4 * full + i] = tail[i]
            if mode != 0:
                axpy(theta, 4 * full, tail, 0, rest, s)

    @jit
    def fill_rows(out, k0s, k1s, c2, c3, wa, wc, fw, mb, fe, r, page, tail):
        # row g of out <- values 0 .. of the stream under key (k0s[g], k1s[g])
        for g in range(out.shape[0]):
            fill(out[g], tail[:0], f32(0.0), 0, 0, k0s[g], k1s[g], c2, c3, wa, wc, fw, mb, fe,
                 r, page, tail)

    fill.parts = (philox, block, axpy, fill_rows)
    return fill


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
          offset: int = 0) -> None:
    """Values offset, offset+1, ... of stream ``stream`` of parameter ``index`` under ``seed``:
    written into ``out``, and/or added to ``add_to`` times ``scale`` (as :func:`axpy_` does),
    in one pass (float32 tensors of one length; ``offset`` % 4 == 0)."""
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
    if kernel is None:
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
    mode = 0 if add_to is None else (1 if out is None else 2)
    kernel(none if out is None else out.view(-1).numpy(),
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


def fill_rows_(out: torch.Tensor, seeds: Sequence[int], index: int, stream: int = DENSE
               ) -> torch.Tensor:
    """Row g of ``out`` (G, L) <- values 0 .. L-1 of stream ``stream`` of parameter ``index``
    under ``seeds[g]``: many seeds' draws in one call (a low-rank rebuild's factors)."""
    if out.dim() != 2 or out.shape[0] != len(seeds):
        raise ValueError(f"out must be ({len(seeds)}, L), got {tuple(out.shape)}")
    kernel = _kernel() if _cpu(out) else None
    if kernel is None:
        for g, seed in enumerate(seeds):
            draw_(seed, index, out=out[g], stream=stream)
        return out
    keys = np.array([split_key(seed) for seed in seeds], dtype=np.int64).reshape(-1, 2)
    s = _thread_scratch()
    kernel.parts[3](out.numpy(), keys[:, 0].copy(), keys[:, 1].copy(), index, stream, *s.w,
                    *s.f, s.page, s.tail)
    return out


def axpy_(theta: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """theta <- theta + float32(scale) * z, the product and the sum each rounded to float32
    (what :func:`draw_` with ``add_to`` does as it draws). On the CPU the compiled kernel;
    elsewhere torch's ``add_``, whose vectorised loops fuse the two roundings into one (equal
    within rounding, not bit for bit). :mod:`fedtune.zo.perturb`'s moves use torch's ``add_``
    everywhere: it measured faster than this kernel on 2 threads (0.034 s against 0.060 s a pass
    over SmolLM2)."""
    kernel = _kernel() if _cpu(theta) and _cpu(z) else None
    if kernel is None:
        theta.add_(z, alpha=scale)
        return
    kernel.parts[2](theta.view(-1).numpy(), 0, z.view(-1).numpy(), 0, theta.numel(),
                    np.float32(scale))
