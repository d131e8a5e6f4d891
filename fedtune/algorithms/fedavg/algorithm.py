"""FedAvg (full parameters) and FedIT (FedAvg over LoRA adapters), one implementation.

Full FedAvg (McMahan et al. 2017): every parameter is trained by backprop on the device and sent
both ways. FedIT (Zhang et al., ICASSP 2024, "Towards Building the Federated GPT"): the base
weights are frozen and LoRA adapters (Hu et al. 2022; W x + (alpha / r) B A x on the target
modules) are trained and averaged, via ``peft``. The only difference is which parameters are
trainable; everything else (messages, aggregation, local loop) is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedtune.algorithms.base import ReplyInfo
from fedtune.algorithms.config import AlgorithmConfig
from fedtune.algorithms.fedavg.client import local_train
from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.fedavg.wire import Download, Reply
from fedtune.data.prompts import TokenizedExample
from fedtune.wire import MessageError, TensorSpec


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the method trains and sends, by name (tied weights appear once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_into(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def device_round(model: torch.nn.Module, payload: bytes, round_: int, num_samples: int,
                 train: Callable[[list[torch.nn.Parameter]], float]) -> bytes:
    """A device's round of a method that sends its trainable tensors (FedAvg, FedIT, FedMeZO).

    Decode the download against the device's own shapes, load it into the trainable parameters,
    ``train`` them in place (returning the mean loss) and encode the reply.
    """
    params = trainable(model)
    down = Download.decode(payload, TensorSpec.of(params))
    if down.round != round_:
        raise MessageError(f"download is for round {down.round}, expected {round_}")
    load_into(params, down.tensors)
    loss = train(list(params.values()))
    if loss != loss:  # every step was skipped: nothing worth sending
        raise RuntimeError("every local step had a non-finite loss")
    return Reply(round_, num_samples, loss, {k: p.detach() for k, p in params.items()}).encode()


class FedAvg:
    """The engine-facing algorithm (see :class:`fedtune.algorithms.base.Algorithm`)."""

    def __init__(self, cfg: AlgorithmConfig, pad_id: int, lora: bool) -> None:
        self.cfg = cfg
        self.pad_id = pad_id
        self.lora = lora
        self.name = "fedit" if lora else "fedavg"
        self.server: FedAvgServer | None = None

    # -- set-up -----------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.lora:
            from peft import LoraConfig, get_peft_model

            lc = self.cfg.lora
            model = get_peft_model(model, LoraConfig(
                r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        model.eval()
        self.server = FedAvgServer({k: p.detach() for k, p in trainable(model).items()})
        return model

    def _server(self) -> FedAvgServer:
        if self.server is None:
            raise RuntimeError("prepare() must run first")
        return self.server

    # -- server side --------------------------------------------------------------------------
    def download(self, round_: int, client_id: int) -> bytes:
        return self._server().download(round_)

    def begin_round(self, round_: int) -> None:
        self._server().begin_round(round_)

    def accept(self, payload: bytes) -> ReplyInfo:
        return self._server().accept(payload)

    def end_round(self) -> None:
        self._server().end_round()

    def load_global(self, model: torch.nn.Module) -> None:
        load_into(trainable(model), self._server().theta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._server().theta)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        server = self._server()
        if set(state) != set(server.theta):
            raise ValueError("checkpoint tensors do not match this model's trainable parameters")
        server.theta = {k: v.clone() for k, v in state.items()}

    # -- device side --------------------------------------------------------------------------
    def client_round(self, model: torch.nn.Module, payload: bytes,
                     examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        c = self.cfg

        def train(params: list[torch.nn.Parameter]) -> float:
            loss, _ = local_train(model, params, examples, steps=c.local_steps,
                                  batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
                                  weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
                                  pad_id=self.pad_id, seed=seed)
            return loss

        return device_round(model, payload, round_, len(examples), train)

    # -- result -------------------------------------------------------------------------------
    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """Full: save the model. FedIT: save the adapter to adapter/, then the merged model."""
        self.load_global(model)
        model_dir = out_dir / "model"
        if self.lora:
            adapter_dir = out_dir / "adapter"
            model.save_pretrained(adapter_dir)  # type: ignore[operator]
            tokenizer.save_pretrained(adapter_dir)
            model = model.merge_and_unload()  # type: ignore[operator]
        model.save_pretrained(model_dir)  # type: ignore[operator]
        tokenizer.save_pretrained(model_dir)
        return model_dir
