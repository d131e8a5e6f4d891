"""Bytes on the wire: tensor payloads with validation on decode.

Every message a device sends or receives is encoded to bytes here and decoded again, in the
in-process engine too, so the byte counts fedtune reports are those a device would send. Tensor
payloads use the safetensors format (a JSON header then raw little-endian buffers: no pickle, so
decoding never runs code). Scalars travel in the header's string metadata.

Decoding is where a hostile or broken client is stopped: :func:`decode_tensors` checks the size
limit before parsing, the exact set of tensor names, every shape and dtype against the expected
spec, and that every value is finite, raising :class:`MessageError` with the reason. Nothing
decoded is ever written into global state before all of these checks pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class MessageError(ValueError):
    """A message that failed validation; it must not reach the global state."""


# A reported train loss (mean token cross-entropy) outside [0, MAX_LOSS] is refused: a uniform
# guess over a 10^6-token vocabulary costs 13.8 nats, so no honest device reports 10^4, and a
# bound keeps the round's logged mean finite whatever one client claims.
MAX_LOSS = 1e4


@dataclass(frozen=True)
class TensorSpec:
    """What a payload must hold: name -> (shape, dtype)."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> TensorSpec:
        return cls({k: tuple(v.shape) for k, v in tensors.items()},
                   {k: v.dtype for k, v in tensors.items()})

    def nbytes(self) -> int:
        return sum(math.prod(s) * torch.empty(0, dtype=self.dtypes[k]).element_size()
                   for k, s in self.shapes.items())


def encode_tensors(meta: Mapping[str, str | int | float], tensors: Mapping[str, torch.Tensor]
                   ) -> bytes:
    """Serialise ``tensors`` with ``meta`` (stored as strings) in the safetensors format."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(flat, metadata={k: repr(v) if isinstance(v, float) else str(v)
                                   for k, v in meta.items()})


def read_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors payload (the header only; no tensor is read)."""
    import json

    if len(data) < 8:
        raise MessageError(f"payload of {len(data)} bytes is too short to be a message")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise MessageError(f"header length {n} exceeds the payload ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError) as e:  # e.g. a header nested 1,000 deep
        raise MessageError(f"malformed header: {type(e).__name__}") from e
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if not isinstance(meta, dict):
        raise MessageError("malformed metadata")
    return {str(k): str(v) for k, v in meta.items()}


def decode_tensors(data: bytes, spec: TensorSpec, *, max_bytes: int
                   ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Decode and validate a payload against ``spec``; raise MessageError on any mismatch."""
    if not isinstance(data, (bytes, bytearray)):
        raise MessageError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    meta = read_metadata(bytes(data))
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise MessageError(f"malformed tensor payload: {e}") from e
    missing = sorted(set(spec.shapes) - set(tensors))
    extra = sorted(set(tensors) - set(spec.shapes))
    if missing or extra:
        raise MessageError(f"tensor names differ from the expected ones: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(spec.shapes[name]):
            raise MessageError(f"tensor {name!r} has shape {tuple(t.shape)}, "
                               f"expected {tuple(spec.shapes[name])}")
        if t.dtype != spec.dtypes[name]:
            raise MessageError(f"tensor {name!r} has dtype {t.dtype}, expected {spec.dtypes[name]}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MessageError(f"tensor {name!r} holds non-finite values")
    return meta, tensors


def meta_int(meta: Mapping[str, str], key: str, *, lo: int, hi: int) -> int:
    """An integer metadata field in [lo, hi], or MessageError."""
    try:
        value = int(meta[key])
    except KeyError as e:
        raise MessageError(f"metadata field {key!r} is missing") from e
    except ValueError as e:
        raise MessageError(f"metadata field {key!r} = {meta[key]!r} is not an integer") from e
    if not lo <= value <= hi:
        raise MessageError(f"metadata field {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def meta_float(meta: Mapping[str, str], key: str, *, lo: float = -math.inf,
               hi: float = math.inf) -> float:
    """A finite float metadata field in [lo, hi], or MessageError."""
    try:
        value = float(meta[key])
    except KeyError as e:
        raise MessageError(f"metadata field {key!r} is missing") from e
    except ValueError as e:
        raise MessageError(f"metadata field {key!r} = {meta[key]!r} is not a number") from e
    if not math.isfinite(value):
        raise MessageError(f"metadata field {key!r} = {value} is not finite")
    if not lo <= value <= hi:
        raise MessageError(f"metadata field {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def meta_str(meta: Mapping[str, str], key: str, expected: str) -> None:
    """Check that a string metadata field equals ``expected``."""
    if meta.get(key) != expected:
        raise MessageError(f"metadata field {key!r} = {meta.get(key)!r}, expected {expected!r}")
