"""The registry row of FedPT (Gao et al., arXiv 2410.00362): the device trainer's halves, with
the server half wrapped by proxy-tuning and distillation (:class:`.server.FedPTServer`).

Devices run the device trainer named by ``algorithm.fedpt.device_trainer`` (FedIT's LoRA by
default, full FedAvg, or FedKSeed) unchanged: the same model preparation, messages and bytes.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.base import Device, DeviceEnv, Method, MethodContext, Server


def trainer(ctx: MethodContext) -> Method:
    from fedtune.algorithms import METHODS

    return METHODS[ctx.cfg.fedpt.device_trainer]


def prepare(ctx: MethodContext, model: torch.nn.Module) -> torch.nn.Module:
    return trainer(ctx).prepare(ctx, model)


def server(ctx: MethodContext, model: torch.nn.Module) -> Server:
    from fedtune.algorithms.fedpt.server import FedPTServer

    inner = trainer(ctx).server(ctx, model)
    return FedPTServer(ctx.cfg.fedpt, inner, model, ctx.pad_id, ctx.tokenizer)


def device(ctx: MethodContext, model: torch.nn.Module, env: DeviceEnv) -> Device:
    return trainer(ctx).device(ctx, model, env)


FEDPT = Method(
    name="fedpt", summary="devices tune a small model; the server proxy-tunes a black-box large "
    "model with it and distils back (Gao et al. 2024)",
    traffic="the device trainer's messages for the small model (never anything of the large "
    "one)", sections=("fedpt",), prepare=prepare, server=server, device=device)
