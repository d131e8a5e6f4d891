"""The registry rows of full FedAvg and FedIT: the only difference is which parameters train.

Full FedAvg (McMahan et al. 2017): every parameter is trained by backprop on the device and sent
both ways. FedIT (Zhang et al., ICASSP 2024, "Towards Building the Federated GPT"): the base
weights are frozen and LoRA adapters (Hu et al. 2022; W x + (alpha / r) B A x on the target
modules) are trained and averaged, via ``peft``.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.base import DeviceEnv, Method, MethodContext
from fedtune.algorithms.fedavg.device import BackpropDevice
from fedtune.algorithms.fedavg.server import FedAvgServer, update_of
from fedtune.algorithms.params import trainable


def prepare_full(ctx: MethodContext, model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def prepare_lora(ctx: MethodContext, model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lc = ctx.cfg.lora
    model = get_peft_model(model, LoraConfig(  # type: ignore[arg-type]
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    return model.eval()


def backprop_device(ctx: MethodContext, model: torch.nn.Module, env: DeviceEnv
                    ) -> BackpropDevice:
    return BackpropDevice(ctx)


FEDAVG = Method(
    name="fedavg", summary="FedAvg over all parameters, backprop on devices (McMahan et al. 2017)",
    traffic="the whole model, both ways",
    sections=(), prepare=prepare_full,
    server=lambda ctx, model: FedAvgServer(
        "fedavg", trainable(model), rules=ctx.rules()), device=backprop_device,
    update_of=update_of)

FEDIT = Method(
    name="fedit", summary="FedAvg over LoRA adapters (FedIT, Zhang et al. 2024)",
    traffic="the LoRA adapters, both ways", sections=("lora",), prepare=prepare_lora,
    server=lambda ctx, model: FedAvgServer(
        "fedit", trainable(model), rules=ctx.rules(), export="lora"),
    device=backprop_device, update_of=update_of)
