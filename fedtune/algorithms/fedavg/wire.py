"""FedAvg / FedIT messages: the trainable tensors, both ways.

Download: ``{kind: fedavg.download, round}`` + the global trainable tensors (the whole model for
full FedAvg, the LoRA A and B matrices for FedIT). Upload: ``{kind: fedavg.reply, round,
num_samples, train_loss}`` + the client's trained tensors. Both are validated on decode
(:mod:`fedtune.wire`): names, shapes, dtypes, finiteness, size, and a round that is not the current
one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.wire import (
    MAX_LOSS,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    meta_float,
    meta_int,
    meta_str,
)

HEADER_SLACK = 1 << 20  # room for the JSON header on top of the raw tensor bytes
MAX_SAMPLES = 10**9


def _limit(spec: TensorSpec) -> int:
    return spec.nbytes() + HEADER_SLACK


@dataclass
class Download:
    round: int
    tensors: dict[str, torch.Tensor]

    def encode(self) -> bytes:
        return encode_tensors({"kind": "fedavg.download", "round": self.round}, self.tensors)

    @classmethod
    def decode(cls, data: bytes, spec: TensorSpec) -> Download:
        meta, tensors = decode_tensors(data, spec, max_bytes=_limit(spec))
        meta_str(meta, "kind", "fedavg.download")
        return cls(meta_int(meta, "round", lo=1, hi=2**31), tensors)


@dataclass
class Reply:
    round: int
    num_samples: int
    train_loss: float
    tensors: dict[str, torch.Tensor]

    def encode(self) -> bytes:
        meta: dict[str, str | int | float] = {
            "kind": "fedavg.reply", "round": self.round, "num_samples": self.num_samples,
            "train_loss": self.train_loss}
        return encode_tensors(meta, self.tensors)

    @classmethod
    def decode(cls, data: bytes, spec: TensorSpec, *, expect_round: int) -> Reply:
        meta, tensors = decode_tensors(data, spec, max_bytes=_limit(spec))
        meta_str(meta, "kind", "fedavg.reply")
        round_ = meta_int(meta, "round", lo=expect_round, hi=expect_round)
        return cls(round_, meta_int(meta, "num_samples", lo=1, hi=MAX_SAMPLES),
                   meta_float(meta, "train_loss", lo=0.0, hi=MAX_LOSS), tensors)
