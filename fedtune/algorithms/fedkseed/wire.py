"""FedKSeed messages: K numbers down, a few (seed index, Σg) pairs up.

Download ``{kind: fedkseed.download, round, k_seeds}`` + ``accumulators`` (K,) float32: the change
of the per-seed accumulators A since the model every client holds, w0 (this engine keeps no client
state between rounds, so that is A itself); FedKSeed-Pro adds ``probs`` (K,) float32, the round's
seed probabilities. The client rebuilds w = w0 − lr · Σ_j A_j z(s_j) from it.

Upload ``{kind: fedkseed.reply, round, num_samples, train_loss, n}`` + for the n seeds the client
touched: ``index`` (n,) int32 (into the pool) and ``sum_g`` (n,) float32; FedKSeed-Pro adds
``sum_abs_clip`` (n,) float32 and ``count`` (n,) int32 for the seed statistics.

Payload bytes: 4K down (8K for Pro), 8n up (16n for Pro), n ≤ min(τ, K), plus the safetensors
JSON header (a few hundred bytes). The paper counts 4K + 8τ + 4 with bare buffers.

Decode validates (MessageError): size before parsing, names, shapes, dtypes, finiteness (via
:func:`fedtune.wire.decode_tensors`), the round, seed indices in [0, K) and distinct, counts >= 1,
0 <= Σ|clip g| <= c · count, and probabilities >= 0 summing to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.wire import (
    MessageError,
    TensorSpec,
    decode_tensors,
    meta_float,
    meta_int,
    meta_str,
    read_metadata,
)
from fedtune.wire import encode_tensors as _encode

HEADER_SLACK = 4096  # room for the JSON header on top of the raw buffers
MAX_SAMPLES = 10**9
PROB_TOL = 1e-4


def _check_size(data: bytes, limit: int) -> None:
    if not isinstance(data, (bytes, bytearray)):
        raise MessageError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise MessageError(f"payload of {len(data)} bytes exceeds the limit of {limit}")


@dataclass
class Download:
    round: int
    accumulators: torch.Tensor  # (K,) float32
    probs: torch.Tensor | None = None  # (K,) float32, FedKSeed-Pro only

    def encode(self) -> bytes:
        tensors = {"accumulators": self.accumulators.to(torch.float32)}
        if self.probs is not None:
            tensors["probs"] = self.probs.to(torch.float32)
        meta: dict[str, str | int | float] = {
            "kind": "fedkseed.download", "round": self.round,
            "k_seeds": int(self.accumulators.numel())}
        return _encode(meta, tensors)

    @staticmethod
    def spec(k_seeds: int, pro: bool) -> TensorSpec:
        names = ["accumulators", "probs"] if pro else ["accumulators"]
        return TensorSpec({n: (k_seeds,) for n in names}, {n: torch.float32 for n in names})

    @classmethod
    def decode(cls, data: bytes, k_seeds: int, pro: bool, *, expect_round: int) -> Download:
        spec = cls.spec(k_seeds, pro)
        meta, t = decode_tensors(data, spec, max_bytes=spec.nbytes() + HEADER_SLACK)
        meta_str(meta, "kind", "fedkseed.download")
        meta_int(meta, "k_seeds", lo=k_seeds, hi=k_seeds)
        round_ = meta_int(meta, "round", lo=expect_round, hi=expect_round)
        probs = t.get("probs")
        if probs is not None:
            if bool((probs < 0).any()):
                raise MessageError("seed probabilities must be >= 0")
            total = float(probs.double().sum())
            if abs(total - 1.0) > PROB_TOL:
                raise MessageError(f"seed probabilities sum to {total}, not 1")
        return cls(round_, t["accumulators"], probs)


@dataclass
class Reply:
    round: int
    num_samples: int
    train_loss: float
    index: torch.Tensor  # (n,) int32, distinct seed indices into the pool
    sum_g: torch.Tensor  # (n,) float32
    sum_abs_clip: torch.Tensor | None = None  # (n,) float32, FedKSeed-Pro only
    count: torch.Tensor | None = None  # (n,) int32, FedKSeed-Pro only

    def encode(self) -> bytes:
        tensors = {"index": self.index.to(torch.int32), "sum_g": self.sum_g.to(torch.float32)}
        if self.sum_abs_clip is not None and self.count is not None:
            tensors["sum_abs_clip"] = self.sum_abs_clip.to(torch.float32)
            tensors["count"] = self.count.to(torch.int32)
        meta: dict[str, str | int | float] = {
            "kind": "fedkseed.reply", "round": self.round, "num_samples": self.num_samples,
            "train_loss": self.train_loss, "n": int(self.index.numel())}
        return _encode(meta, tensors)

    @staticmethod
    def spec(n: int, pro: bool) -> TensorSpec:
        shapes = {"index": (n,), "sum_g": (n,)}
        dtypes = {"index": torch.int32, "sum_g": torch.float32}
        if pro:
            shapes |= {"sum_abs_clip": (n,), "count": (n,)}
            dtypes |= {"sum_abs_clip": torch.float32, "count": torch.int32}
        return TensorSpec(shapes, dtypes)

    @classmethod
    def decode(cls, data: bytes, k_seeds: int, pro: bool, clip: float, *,
               expect_round: int) -> Reply:
        limit = cls.spec(k_seeds, pro).nbytes() + HEADER_SLACK
        _check_size(data, limit)
        meta = read_metadata(bytes(data))
        meta_str(meta, "kind", "fedkseed.reply")
        round_ = meta_int(meta, "round", lo=expect_round, hi=expect_round)
        n = meta_int(meta, "n", lo=1, hi=k_seeds)
        _, t = decode_tensors(data, cls.spec(n, pro), max_bytes=limit)
        index = t["index"]
        if bool(((index < 0) | (index >= k_seeds)).any()):
            raise MessageError(f"seed index out of range [0, {k_seeds})")
        if int(torch.unique(index).numel()) != n:
            raise MessageError("duplicate seed indices")
        sum_abs, count = t.get("sum_abs_clip"), t.get("count")
        if sum_abs is not None and count is not None:
            if bool((count < 1).any()):
                raise MessageError("every touched seed's count must be >= 1")
            if bool((sum_abs < 0).any()) or bool(
                    (sum_abs.double() > clip * count.double() * (1 + 1e-6)).any()):
                raise MessageError(f"sum |clip g| must lie in [0, {clip} * count]")
        return cls(round_, meta_int(meta, "num_samples", lo=1, hi=MAX_SAMPLES),
                   meta_float(meta, "train_loss"), index, t["sum_g"], sum_abs, count)
