"""The server side of FedAvg / FedIT: the global trainable tensors and their weighted mean.

Global state: theta (all parameters for full FedAvg, the LoRA matrices for FedIT). Each round,
theta <- sum_i (n_i / sum_k n_k) theta_i over the replies that passed validation
(:class:`fedtune.algorithms.aggregate.WeightedMean`, folded in as they arrive). A round with no
valid reply keeps theta unchanged.
"""

from __future__ import annotations

import logging

import torch

from fedtune.algorithms.aggregate import WeightedMean
from fedtune.algorithms.base import ReplyInfo
from fedtune.algorithms.fedavg.wire import Download, Reply
from fedtune.wire import TensorSpec

log = logging.getLogger(__name__)


class FedAvgServer:
    def __init__(self, initial: dict[str, torch.Tensor]) -> None:
        self.theta = {k: v.detach().to("cpu").clone() for k, v in initial.items()}
        self.spec = TensorSpec.of(self.theta)
        self.round = 0
        self._agg: WeightedMean | None = None

    def download(self, round_: int) -> bytes:
        return Download(round_, self.theta).encode()

    def begin_round(self, round_: int) -> None:
        self.round = round_
        self._agg = WeightedMean()

    def accept(self, payload: bytes) -> ReplyInfo:
        """Validate (raises MessageError) before anything touches the aggregate."""
        if self._agg is None:
            raise RuntimeError("accept() called outside a round")
        reply = Reply.decode(payload, self.spec, expect_round=self.round)
        self._agg.add(reply.tensors, reply.num_samples)
        return ReplyInfo(reply.num_samples, reply.train_loss)

    def end_round(self) -> None:
        if self._agg is None:
            raise RuntimeError("end_round() called outside a round")
        if self._agg.count == 0:
            log.warning("round %d: no valid reply, the global model stays as it was", self.round)
        else:
            self.theta = self._agg.result()
        self._agg = None
