"""The compiled CPU kernel of generator 2 (:mod:`fedtune.zo.philox` documents the algorithm).

Module-level functions with the constants as globals, so numba's on-disk cache
(``cache=True``) is found again by every later process: compiled once per machine, then loaded in
a fraction of a second. (Closures over local constants, the earlier form, missed that cache and
recompiled in every process: 3-6 s at the first draw.) Imported only by
:func:`fedtune.zo.philox._kernel`, and only when numba is installed.

The draw runs page by page (``PAGE_BLOCKS`` blocks of four values) through small per-thread
scratch arrays that stay in L1/L2, in simple loops that vectorise: Philox, the exact float of
the radius word, its split into exponent and mantissa, then radius, sine, cosine and the store of
both pairs of a block in one loop. ``axpy`` lets the compiler contract ``dst + s * src`` into a
fused multiply-add, which is what torch's ``add_(src, alpha=s)`` computes on the CPU (vectorised
loop and tail alike; tested bit for bit), so a move made as z is drawn equals a move made
afterwards with torch.
"""

from __future__ import annotations

import numba  # type: ignore[import-untyped]
import numpy as np

from fedtune.zo.philox import (
    ANGLE_STEP,
    COS_COEFFS,
    LN2,
    LOG_COEFFS,
    M0,
    M1,
    MASK32,
    SIN_COEFFS,
    SQRT2_BITS,
    W0,
    W1,
)

u32, u64, i32, f32 = np.uint32, np.uint64, np.int32, np.float32
_M0, _M1, _W0, _W1 = u64(M0), u64(M1), u32(W0), u32(W1)
_LO, _S32 = u64(MASK32), u64(32)
_SQRT2 = u32(SQRT2_BITS)
_L0, _L1, _L2, _L3 = LOG_COEFFS
_SA, _SB, _SC, _SD = SIN_COEFFS
_CA, _CB, _CC, _CD = COS_COEFFS
_ONE, _HALF, _TWO, _MTWO = f32(1.0), f32(0.5), f32(2.0), f32(-2.0)

_jit = numba.njit(nogil=True, cache=True, fastmath=False, error_model="numpy",
                  boundscheck=False)
_jit_fma = numba.njit(nogil=True, cache=True, fastmath={"contract"}, error_model="numpy",
                      boundscheck=False)


@_jit
def philox_words(first, nb, k0, k1, c2, c3, x0s, x1s, x2s, x3s):  # type: ignore[no-untyped-def]
    """Blocks first .. first+nb-1 of the stream under key (k0, k1), counter words (., ., c2,
    c3): block b's output words into x0s[b], x1s[b], x2s[b], x3s[b]."""
    for b in range(nb):
        blk = u64(first) + u64(b)
        x0, x1, x2, x3 = u32(blk & _LO), u32(blk >> _S32), u32(c2), u32(c3)
        a0, a1 = u32(k0), u32(k1)
        for _ in range(10):
            p0 = u64(x0) * _M0
            p1 = u64(x2) * _M1
            y0 = u32(u32(p1 >> _S32) ^ x1 ^ a0)
            y2 = u32(u32(p0 >> _S32) ^ x3 ^ a1)
            x1, x3, x0, x2 = u32(p1 & _LO), u32(p0 & _LO), y0, y2
            a0, a1 = u32(a0 + _W0), u32(a1 + _W1)
        x0s[b], x1s[b], x2s[b], x3s[b] = x0, x1, x2, x3


@_jit
def philox(first, nb, k0, k1, c2, c3, wa, wc):  # type: ignore[no-untyped-def]
    """Blocks first .. first+nb-1: wa = [x0 | x2], wc = [x1 | x3] (nb words each half)."""
    philox_words(first, nb, k0, k1, c2, c3, wa[:nb], wc[:nb], wa[nb:2 * nb], wc[nb:2 * nb])


@_jit
def exact_float(n, wa, fw):  # type: ignore[no-untyped-def]
    for i in range(n):
        fw[i] = f32(i32(((wa[i] >> u32(9)) << u32(1)) | u32(1)))


@_jit
def split(n, bits, mb, fe):  # type: ignore[no-untyped-def]
    for i in range(n):
        bb = bits[i]
        m = (bb & u32(0x7FFFFF)) | u32(0x3F800000)
        big = m > _SQRT2
        mb[i] = m - (u32(1 << 23) if big else u32(0))
        fe[i] = f32(i32(bb >> u32(23)) - i32(127) + (i32(1) if big else i32(0)) - i32(24))


@_jit
def radius(m, e):  # type: ignore[no-untyped-def]
    """sqrt(-2 ln u) of the uniform u = 2^e m (m in [1/sqrt 2, sqrt 2), e the float e - 24)."""
    q = (m - _ONE) / (m + _ONE)
    q2 = q * q
    p = ((((_L0 * q2 + _L1) * q2 + _L2) * q2 + _L3) * q2 + _ONE)
    return np.sqrt(_MTWO * ((_TWO * q) * p + e * LN2))


@_jit
def sincos(w):  # type: ignore[no-untyped-def]
    """(sin, cos) of the angle of the word w."""
    j = ((w >> u32(9)) + u32(1 << 20)) & u32((1 << 23) - 1)
    k = j >> u32(21)
    x = f32(i32(j & u32((1 << 21) - 1)) - i32(1 << 20)) * ANGLE_STEP
    x2 = x * x
    s = x + (x * x2) * (((_SA * x2 - _SB) * x2 + _SC) * x2 - _SD)
    co = _ONE + x2 * (((((-_CA) * x2 + _CB) * x2 - _CC) * x2 + _CD) * x2 - _HALF)
    odd = (k & u32(1)) == u32(1)
    sn = co if odd else s
    cs = s if odd else co
    return (-sn if k >= u32(2) else sn), (-cs if (k == u32(1) or k == u32(2)) else cs)


@_jit
def finish(nb, fm, fe, wc, out, at):  # type: ignore[no-untyped-def]
    """Both Box-Muller pairs of each of nb blocks into out[at + 4 b .. at + 4 b + 3]: one loop
    (measured 5 % faster than a loop per stage through scratch arrays)."""
    base, half = u64(at), u64(nb)
    for b in range(u64(nb)):
        o = base + u64(4) * b
        r0, r1 = radius(fm[b], fe[b]), radius(fm[half + b], fe[half + b])
        s0, c0 = sincos(wc[b])
        s1, c1 = sincos(wc[half + b])
        out[o] = r0 * c0
        out[o + u64(1)] = r0 * s0
        out[o + u64(2)] = r1 * c1
        out[o + u64(3)] = r1 * s1


@_jit
def transform(nb, wa, wc, fw, mb, fe, r, out, at):  # type: ignore[no-untyped-def]
    """The normals of nb blocks of words (wa, wc) into out[at .. at + 4 nb)."""
    n = 2 * nb
    exact_float(n, wa, fw)
    split(n, fw.view(np.uint32), mb, fe)
    finish(nb, mb.view(np.float32), fe, wc, out, at)


@_jit
def block(first, nb, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, out, at):  # type: ignore[no-untyped-def]
    """Blocks first .. first+nb-1 of the stream into out[at .. at + 4 nb)."""
    philox(first, nb, k0, k1, c2, c3, wa, wc)
    transform(nb, wa, wc, fw, mb, fe, r, out, at)


@_jit_fma
def axpy(dst, dst_at, src, src_at, n, s):  # type: ignore[no-untyped-def]
    """dst[i] <- dst[i] + s * src[i], contracted to a fused multiply-add as torch's add_."""
    a, b = u64(dst_at), u64(src_at)
    for i in range(u64(n)):
        dst[a + i] = dst[a + i] + s * src[b + i]


@_jit
def fill(out, theta, s, mode, first, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, page, tail):  # type: ignore[no-untyped-def]
    """mode 0: out <- z;  1: theta <- theta + s z (z passes through ``page`` only);  2: both.
    out / theta hold the values 4 first ...; n is the length of the one in use."""
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


@_jit
def refill(out, theta, carry, s, first, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, page, tail):  # type: ignore[no-untyped-def]
    """Page by page: theta <- theta + carry * out (the z out holds), out <- the new z,
    theta <- theta + s * out. One pass for the last move of a step and the first of the
    next; each addition as :func:`axpy`'s, in that order, so the bits are those of three
    separate passes."""
    npage = wa.size // 2
    n = out.size
    full = n // 4
    done = 0
    while done < full:
        nb = min(npage, full - done)
        axpy(theta, 4 * done, out, 4 * done, 4 * nb, carry)
        block(first + done, nb, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, out, 4 * done)
        axpy(theta, 4 * done, out, 4 * done, 4 * nb, s)
        done += nb
    rest = n - 4 * full
    if rest:
        axpy(theta, 4 * full, out, 4 * full, rest, carry)
        block(first + full, 1, k0, k1, c2, c3, wa, wc, fw, mb, fe, r, tail, 0)
        for i in range(rest):
            out[4 * full + i] = tail[i]
        axpy(theta, 4 * full, tail, 0, rest, s)


@_jit
def philox_rows(q, nb, bpr, k0s, k1s, c2, c3, wa, wc):  # type: ignore[no-untyped-def]
    """Blocks q .. q+nb-1 of rows of ``bpr`` blocks, row g under the key (k0s[g], k1s[g]):
    block q is block q % bpr of row q // bpr. Words laid out as :func:`philox`'s."""
    done = 0
    while done < nb:
        g, b0 = (q + done) // bpr, (q + done) % bpr
        cnt = min(bpr - b0, nb - done)
        e = done + cnt
        philox_words(b0, cnt, k0s[g], k1s[g], c2, c3, wa[done:e], wc[done:e],
                     wa[nb + done:nb + e], wc[nb + done:nb + e])
        done = e


@_jit
def fill_rows(out, k0s, k1s, c2, c3, wa, wc, fw, mb, fe, r, page, tail):  # type: ignore[no-untyped-def]
    """Row g of out (G, L) <- values 0 .. L-1 of the stream under the key (k0s[g], k1s[g]).
    Rows of a multiple of 4 values are one run of blocks, paged through as one stream is;
    other rows are drawn one by one."""
    rows, length = out.shape
    if length % 4:
        for g in range(rows):
            fill(out[g], tail[:0], f32(0.0), 0, 0, k0s[g], k1s[g], c2, c3, wa, wc, fw, mb, fe,
                 r, page, tail)
        return
    flat = out.reshape(-1)
    npage = wa.size // 2
    bpr = length // 4
    total = rows * bpr
    done = 0
    while done < total:
        nb = min(npage, total - done)
        philox_rows(done, nb, bpr, k0s, k1s, c2, c3, wa, wc)
        transform(nb, wa, wc, fw, mb, fe, r, flat, 4 * done)
        done += nb


@_jit
def accumulate(acc, k0s, k1s, cs, first, c2, c3, wa, wc, fw, mb, fe, r, page, tail):  # type: ignore[no-untyped-def]
    """acc <- acc + cs[g] z_g for each key g in turn (values 4 first ... of each stream), every
    addition as :func:`axpy`'s: a replay's accumulator in one call instead of one per seed."""
    for g in range(k0s.size):
        fill(tail[:0], acc, cs[g], 1, first, k0s[g], k1s[g], c2, c3, wa, wc, fw, mb, fe, r,
             page, tail)
