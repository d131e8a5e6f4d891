"""The registry row of FedZO (Fang et al. 2022, "Communication-efficient stochastic
zeroth-order optimization for federated learning"; the FedZO baseline of FedKSeed's comparison).

Devices take τ two-point zeroth-order steps on every parameter, each with a fresh seed (MeZO's
device, :mod:`fedtune.algorithms.fedmezo.device`), and send up the full model difference
θ_i − θ; the server adds the sample-weighted mean difference to θ (FedAvg's server in ``delta``
mode) and sends the full model down. Inference memory on the device, but full-model bytes both
ways: the cost FedKSeed's seeds remove.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.base import DeviceEnv, Method, MethodContext
from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.fedkseed.method import prepare
from fedtune.algorithms.fedmezo.device import MeZODevice
from fedtune.algorithms.params import trainable


def device(ctx: MethodContext, model: torch.nn.Module, env: DeviceEnv) -> MeZODevice:
    c = ctx.cfg.fedzo
    return MeZODevice(c.tau, c.batch_size, c.zo_eps, c.lr, ctx.pad_id, delta=True)


FEDZO = Method(
    name="fedzo", summary="tau two-point zeroth-order steps on every parameter, each with a "
    "fresh seed (FedZO, Fang et al. 2022)",
    traffic="down: the whole model; up: its change", sections=("fedzo",), prepare=prepare,
    server=lambda ctx, model: FedAvgServer(
        "fedzo", trainable(model), rules=ctx.rules(), delta=True), device=device)
