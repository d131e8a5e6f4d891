"""The registry row of FedMeZO: FedIT's protocol with MeZO local training of the LoRA adapters.

The baseline named "FedMeZO" by FedKSeed (Qin et al., ICML 2024, arXiv 2312.06353): the base
weights are frozen and LoRA adapters (``[algorithm.lora]``) are the only trainable tensors,
downloaded and uploaded whole and averaged by sample count on the server, exactly as FedIT
(Zhang et al., ICASSP 2024): the server half *is* FedIT's. The device trains them by MeZO
(Malladi et al., NeurIPS 2023), :mod:`.device`. The seeds never travel.

Master weights: the adapters must be float32 (ZO updates of lr · g sit far below half-precision
resolution); peft keeps adapters in float32 over a half-precision base, and ``prepare`` upcasts
them if it did not.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.base import DeviceEnv, Method, MethodContext
from fedtune.algorithms.fedavg.method import prepare_lora
from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.fedmezo.device import MeZODevice
from fedtune.algorithms.params import trainable, upcast_trainable


def prepare(ctx: MethodContext, model: torch.nn.Module) -> torch.nn.Module:
    model = prepare_lora(ctx, model)
    upcast_trainable(model, "FedMeZO")
    return model


def device(ctx: MethodContext, model: torch.nn.Module, env: DeviceEnv) -> MeZODevice:
    c = ctx.cfg.fedmezo
    return MeZODevice(c.tau, c.batch_size, c.zo_eps, c.lr, ctx.pad_id)


FEDMEZO = Method(
    name="fedmezo", summary="FedIT's LoRA FedAvg, adapters trained on devices by MeZO "
    "zeroth-order steps with fresh seeds (as in Qin et al. 2024)",
    traffic="the LoRA adapters, both ways", sections=("fedmezo", "lora"), prepare=prepare,
    server=lambda ctx, model: FedAvgServer(
        "fedmezo", trainable(model), rules=ctx.rules(), export="lora"),
    device=device)
