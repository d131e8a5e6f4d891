"""FedKSeed messages in a compact binary layout: K numbers down, a few (index, Σg) pairs up.

FedKSeed's point is that a round costs a few KB, so its messages carry no self-describing
header (safetensors' JSON header alone would be ~300 B): a fixed little-endian struct, then bare
arrays. Seed indices are uint16 when K <= 65536 (else uint32), everything else float32.

Download (``FKS`` + version 1, 21-byte header)::

    magic "FKS\\x01" | flags u8 (1: probs follow, 2: sparse, z code << 4) | round u32 | K u32 |
    since u32 | n u32
    dense:  dA (K,) f32                      -- the change of A since round ``since``
    sparse: index (n,) u16/u32 ascending, dA (n,) f32
    probs (K,) f32                           -- FedKSeed-Pro only: this round's seed probabilities

``since = 0`` means "since w0", i.e. dA = A itself: what a device with no cached model needs. A
device that still holds the model of round ``since`` applies only dA (the paper's ΔA). The encoder
picks whichever of dense and sparse is smaller.

Upload (``FKS`` + version 2, 21-byte header)::

    magic "FKS\\x02" | flags u8 (1: Pro stats follow, z code << 4) | round u32 | num_samples u32 |
    train_loss f32 | n u32
    index (n,) u16/u32 strictly ascending, sum_g (n,) f32
    Pro:  sum_abs_clip (n,) f32, count (n,) u16

The z code (bits 4-6 of the flags) says which z the numbers are for: bits 4-5 the generator
version minus 1 (so a message from before the field, generator 1, reads 0), bit 6 low-rank.
A message made with another z than the receiver's is refused: the same accumulators define a
different model under another z. (The rank, like K's seeds and the learning rate, is config both
sides share.)

Bytes at the paper's K = 4096, τ = 200: 21 + 4·4096 down and 21 + 6·n up with n <= τ distinct
seeds, at most 17,990 B and about 17,600 B for the ~195 distinct seeds τ = 200 uniform draws hit;
the paper counts 4K + 8τ + 4 = 17,988 B.

Decoding validates before anything is returned (MessageError): the exact length for the declared
counts (so oversize or truncated payloads are refused before any array is read), magic and
version, unknown flags, the round, K, indices in [0, K) and strictly ascending (so distinct),
finite values, counts >= 1, 0 <= Σ|clip g| <= c · count, probabilities >= 0 summing to 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.wire import MAX_LOSS, MessageError
from fedtune.zo.spec import DEFAULT_Z, ZSpec

DOWN_MAGIC = b"FKS\x01"
UP_MAGIC = b"FKS\x02"
_DOWN = struct.Struct("<4sBIIII")  # magic, flags, round, K, since, n
_UP = struct.Struct("<4sBIIfI")  # magic, flags, round, num_samples, train_loss, n
FLAG_PROBS, FLAG_SPARSE = 1, 2
FLAG_PRO = 1
MAX_SAMPLES = 2**32 - 1
MAX_COUNT = 2**16 - 1
PROB_TOL = 1e-4
Z_SHIFT, Z_MASK = 4, 0x70


def z_code(z: ZSpec) -> int:
    """The flags' z bits of ``z``: (generator - 1) | 4 if low-rank, shifted by 4."""
    return ((z.generator - 1) | (4 if z.lowrank else 0)) << Z_SHIFT


def _describe_z(code: int) -> str:
    gen, low = ((code >> Z_SHIFT) & 3) + 1, bool(code & (4 << Z_SHIFT))
    return f"generator {gen}, {'low-rank' if low else 'dense'}"


def _check_z(flags: int, z: ZSpec, what: str) -> None:
    if flags & Z_MASK != z_code(z):
        raise MessageError(f"{what} is for z of {_describe_z(flags & Z_MASK)}; this side uses "
                           f"{_describe_z(z_code(z))} (algorithm.fedkseed.generator / "
                           "perturbation differ)")


def index_dtype(k_seeds: int) -> np.dtype:
    """uint16 indices for pools of up to 65536 seeds, uint32 above."""
    return np.dtype("<u2") if k_seeds <= 1 << 16 else np.dtype("<u4")


def _f32(x: torch.Tensor | np.ndarray) -> bytes:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


class _Reader:
    """Reads arrays from a payload whose total length was already checked."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def take(self, dtype: np.dtype | str, n: int) -> np.ndarray:
        dt = np.dtype(dtype)
        arr = np.frombuffer(self.data, dtype=dt, count=n, offset=self.offset)
        self.offset += n * dt.itemsize
        return arr


def _check_bytes(data: object, head: struct.Struct, magic: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise MessageError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) < head.size:
        raise MessageError(f"payload of {len(data)} bytes is shorter than the {head.size}-byte "
                           "header")
    if bytes(data[:4]) != magic:
        raise MessageError(f"wrong magic/version {bytes(data[:4])!r}, expected {magic!r}")
    return bytes(data)


def _check_length(data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise MessageError(f"payload is {len(data)} bytes, its header declares {expected}")


def _check_indices(index: np.ndarray, k_seeds: int) -> None:
    if index.size and int(index.max()) >= k_seeds:
        raise MessageError(f"seed index out of range [0, {k_seeds})")
    if index.size > 1 and not bool((np.diff(index.astype(np.int64)) > 0).all()):
        raise MessageError("seed indices must be strictly ascending (no duplicates)")


def _check_finite(name: str, values: np.ndarray) -> None:
    if not bool(np.isfinite(values).all()):
        raise MessageError(f"{name} holds non-finite values")


@dataclass
class Download:
    round: int
    accumulators: torch.Tensor  # (K,) float32: the change of A since round ``since`` (0: A)
    probs: torch.Tensor | None = None  # (K,) float32, FedKSeed-Pro only
    since: int = 0
    z: ZSpec = DEFAULT_Z

    def encode(self) -> bytes:
        a = self.accumulators.detach().cpu().to(torch.float32).numpy()
        k = a.size
        nz = np.flatnonzero(a)
        idt = index_dtype(k)
        sparse = nz.size * (idt.itemsize + 4) < 4 * k
        flags = ((FLAG_PROBS if self.probs is not None else 0) | (FLAG_SPARSE if sparse else 0)
                 | z_code(self.z))
        parts = [_DOWN.pack(DOWN_MAGIC, flags, self.round, k, self.since,
                            nz.size if sparse else k)]
        if sparse:
            parts += [nz.astype(idt).tobytes(), _f32(a[nz])]
        else:
            parts.append(_f32(a))
        if self.probs is not None:
            parts.append(_f32(self.probs))
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, k_seeds: int, pro: bool, *, expect_round: int,
               z: ZSpec = DEFAULT_Z) -> Download:
        data = _check_bytes(data, _DOWN, DOWN_MAGIC)
        _, flags, round_, k, since, n = _DOWN.unpack_from(data)
        if flags & ~(FLAG_PROBS | FLAG_SPARSE | Z_MASK):
            raise MessageError(f"unknown download flags {flags:#x}")
        _check_z(flags, z, "download")
        if round_ != expect_round:
            raise MessageError(f"download is for round {round_}, expected {expect_round}")
        if k != k_seeds:
            raise MessageError(f"download holds K = {k} seeds, this pool has {k_seeds}")
        if since >= round_:
            raise MessageError(f"download change since round {since} is not before {round_}")
        if bool(flags & FLAG_PROBS) != pro:
            raise MessageError("seed probabilities " + ("missing" if pro else "unexpected"))
        sparse = bool(flags & FLAG_SPARSE)
        if n > k or (not sparse and n != k):
            raise MessageError(f"download declares {n} values for K = {k}")
        idt = index_dtype(k)
        _check_length(data, _DOWN.size + (n * (idt.itemsize + 4) if sparse else 4 * k)
                      + (4 * k if pro else 0))
        r = _Reader(data, _DOWN.size)
        a = np.zeros(k, dtype=np.float32)
        if sparse:
            index = r.take(idt, n)
            _check_indices(index, k)
            a[index.astype(np.int64)] = r.take("<f4", n)
        else:
            a[:] = r.take("<f4", k)
        _check_finite("accumulators", a)
        probs = None
        if pro:
            p = r.take("<f4", k)
            _check_finite("probabilities", p)
            if bool((p < 0).any()):
                raise MessageError("seed probabilities must be >= 0")
            total = float(p.astype(np.float64).sum())
            if abs(total - 1.0) > PROB_TOL:
                raise MessageError(f"seed probabilities sum to {total}, not 1")
            probs = torch.from_numpy(p.copy())
        return cls(round_, torch.from_numpy(a), probs, since, z)


@dataclass
class Reply:
    round: int
    num_samples: int
    train_loss: float
    index: torch.Tensor  # (n,) distinct seed indices into the pool
    sum_g: torch.Tensor  # (n,) float32
    sum_abs_clip: torch.Tensor | None = None  # (n,) float32, FedKSeed-Pro only
    count: torch.Tensor | None = None  # (n,) FedKSeed-Pro only
    z: ZSpec = DEFAULT_Z

    def encode(self, k_seeds: int) -> bytes:
        """Bytes of this reply for a pool of ``k_seeds`` (which fixes the index width)."""
        order = np.argsort(self.index.cpu().numpy(), kind="stable")
        index = self.index.cpu().numpy()[order]
        pro = self.sum_abs_clip is not None and self.count is not None
        n = index.size
        parts = [_UP.pack(UP_MAGIC, (FLAG_PRO if pro else 0) | z_code(self.z), self.round,
                          self.num_samples,
                          self.train_loss, n),
                 index.astype(index_dtype(k_seeds)).tobytes(),
                 _f32(self.sum_g.cpu().numpy()[order])]
        if self.sum_abs_clip is not None and self.count is not None:
            parts += [_f32(self.sum_abs_clip.cpu().numpy()[order]),
                      self.count.cpu().numpy()[order].astype("<u2").tobytes()]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, k_seeds: int, pro: bool, clip: float, *,
               expect_round: int, z: ZSpec = DEFAULT_Z) -> Reply:
        data = _check_bytes(data, _UP, UP_MAGIC)
        _, flags, round_, num_samples, train_loss, n = _UP.unpack_from(data)
        if flags & ~(FLAG_PRO | Z_MASK):
            raise MessageError(f"unknown reply flags {flags:#x}")
        _check_z(flags, z, "reply")
        if round_ != expect_round:
            raise MessageError(f"reply is for round {round_}, expected {expect_round}")
        if bool(flags & FLAG_PRO) != pro:
            raise MessageError("Pro seed statistics " + ("missing" if pro else "unexpected"))
        if not 1 <= n <= k_seeds:
            raise MessageError(f"reply declares {n} seeds; must be in [1, {k_seeds}]")
        if num_samples < 1:
            raise MessageError("num_samples must be >= 1")
        if not (np.isfinite(train_loss) and 0.0 <= train_loss <= MAX_LOSS):
            raise MessageError(f"train_loss {train_loss} is not a loss in [0, {MAX_LOSS:g}]")
        idt = index_dtype(k_seeds)
        _check_length(data, _UP.size + n * (idt.itemsize + 4 + (6 if pro else 0)))
        r = _Reader(data, _UP.size)
        index = r.take(idt, n)
        _check_indices(index, k_seeds)
        sum_g = r.take("<f4", n)
        _check_finite("sum_g", sum_g)
        sum_abs = count = None
        if pro:
            sa, cnt = r.take("<f4", n), r.take("<u2", n)
            _check_finite("sum_abs_clip", sa)
            if bool((cnt < 1).any()):
                raise MessageError("every touched seed's count must be >= 1")
            if bool((sa < 0).any()) or bool(
                    (sa.astype(np.float64) > clip * cnt.astype(np.float64) * (1 + 1e-6)).any()):
                raise MessageError(f"sum |clip g| must lie in [0, {clip} * count]")
            sum_abs = torch.from_numpy(sa.copy())
            count = torch.from_numpy(cnt.astype(np.int32))
        return cls(round_, int(num_samples), float(train_loss),
                   torch.from_numpy(index.astype(np.int32)), torch.from_numpy(sum_g.copy()),
                   sum_abs, count, z)
