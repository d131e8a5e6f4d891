"""FedMeZO: FedIT's protocol with MeZO local training of the LoRA adapters, engine-facing glue.

The baseline named "FedMeZO" by FedKSeed (Qin et al., ICML 2024, arXiv 2312.06353): the base
weights are frozen and LoRA adapters (W x + (alpha / r) B A x, via ``peft``, ``[algorithm.lora]``)
are the only trainable tensors, downloaded and uploaded whole and averaged by sample count on the
server, exactly as FedIT (Zhang et al., ICASSP 2024). The device, however, trains them by MeZO
(Malladi et al., NeurIPS 2023): τ two-point zeroth-order steps, each with a fresh seed drawn from
the client seed (:mod:`.client`), so training needs forward passes only and inference memory.

Everything but the local loop is FedIT's, by composition: a :class:`FedAvg` in LoRA mode does the
LoRA wrapping, holds the server (:class:`FedAvgServer`, the weighted mean), loads the global model
and exports adapter + merged model; its wire format (:mod:`fedtune.algorithms.fedavg.wire`) is the
one used here. The seeds never travel: the server only ever sees adapters.

Master weights: the adapters must be float32 (ZO updates of lr · g sit far below half-precision
resolution, and ±εz perturb/restore drifts there); peft already keeps adapters in float32 over a
float16/bfloat16 base, and ``prepare`` upcasts them if it did not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedtune.algorithms.base import ReplyInfo
from fedtune.algorithms.config import AlgorithmConfig
from fedtune.algorithms.fedavg.algorithm import FedAvg, device_round, trainable
from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.fedmezo.client import local_mezo_train
from fedtune.data.prompts import TokenizedExample

log = logging.getLogger(__name__)


class FedMeZO:
    """The engine-facing algorithm (see :class:`fedtune.algorithms.base.Algorithm`)."""

    def __init__(self, cfg: AlgorithmConfig, pad_id: int) -> None:
        self.cfg = cfg.fedmezo
        self.pad_id = pad_id
        self.name = "fedmezo"
        self.fedit = FedAvg(cfg, pad_id, lora=True)  # LoRA, server, load, export: FedIT's

    # -- set-up -----------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = self.fedit.prepare(model)  # peft LoRA wrap, eval(), server from the adapters
        params = trainable(model)
        if any(p.dtype != torch.float32 for p in params.values()):
            log.warning("%s: upcasting the LoRA adapters to float32 (ZO master weights must be "
                        "fp32)", self.name)
            for p in params.values():
                p.data = p.data.to(torch.float32)
            self.fedit.server = FedAvgServer({k: p.detach() for k, p in params.items()})
        return model

    # -- server side: FedIT's -----------------------------------------------------------------
    def download(self, round_: int, client_id: int) -> bytes:
        return self.fedit.download(round_, client_id)

    def begin_round(self, round_: int) -> None:
        self.fedit.begin_round(round_)

    def accept(self, payload: bytes) -> ReplyInfo:
        return self.fedit.accept(payload)

    def end_round(self) -> None:
        self.fedit.end_round()

    def load_global(self, model: torch.nn.Module) -> None:
        self.fedit.load_global(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.fedit.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fedit.load_state_dict(state)

    # -- device side --------------------------------------------------------------------------
    def client_round(self, model: torch.nn.Module, payload: bytes,
                     examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        c = self.cfg

        def train(params: list[torch.nn.Parameter]) -> float:
            # the adapters, in named_parameters order = z's index order
            loss, _ = local_mezo_train(model, params, examples, tau=c.tau,
                                       batch_size=c.batch_size, eps=c.zo_eps, lr=c.lr,
                                       pad_id=self.pad_id, seed=seed)
            return loss

        return device_round(model, payload, round_, len(examples), train)

    # -- result -------------------------------------------------------------------------------
    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """FedIT's export: the adapter to adapter/, the merged model to model/."""
        return self.fedit.export(model, tokenizer, out_dir)
