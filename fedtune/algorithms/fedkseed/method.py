"""The registry rows of FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024, arXiv 2312.06353).

Federated full-parameter tuning by two-point zeroth-order SGD where every perturbation comes from
a pool of K seeds: clients send only (seed index, Σ g) pairs, the server keeps per-seed
accumulators A, and the global model is w = w0 − lr · Σ_j A_j z(s_j). FedKSeed-Pro samples seeds
with probabilities from their importance (:mod:`.pro`).

Master weights: the trainable parameters are kept in float32 (a model loaded in fp16/bf16 is
upcast in ``prepare``): ZO updates of ~lr · g are far below half-precision resolution.
"""

from __future__ import annotations

import logging

import torch

from fedtune.algorithms.base import DeviceEnv, Method, MethodContext
from fedtune.algorithms.fedkseed.device import FedKSeedDevice
from fedtune.algorithms.fedkseed.replay import RoundModel
from fedtune.algorithms.fedkseed.server import FedKSeedServer, update_of

log = logging.getLogger(__name__)


def prepare(ctx: MethodContext, model: torch.nn.Module) -> torch.nn.Module:
    if any(p.dtype != torch.float32 for p in model.parameters()):
        log.warning("upcasting the model to float32 (zeroth-order master weights must be fp32)")
        model = model.to(torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)  # full-parameter; no autograd graph is ever built
    if not ctx.cfg.fedkseed.tune_embeddings:  # z covers what stays trainable (params.trainable)
        for get in ("get_input_embeddings", "get_output_embeddings"):
            layer = getattr(model, get)() if hasattr(model, get) else None
            if layer is not None:
                layer.weight.requires_grad_(False)
    return model.eval()


def _device(pro: bool):  # noqa: ANN202
    def make(ctx: MethodContext, model: torch.nn.Module, env: DeviceEnv) -> FedKSeedDevice:
        shared = env.shared if isinstance(env.shared, RoundModel) else None
        return FedKSeedDevice(ctx.cfg.fedkseed, pro, ctx.pad_id, model, env, shared,
                              update_clip=ctx.rules().clip)

    return make


FEDKSEED = Method(
    name="fedkseed", summary="tau two-point zeroth-order steps on every parameter (two "
    "forwards, no backprop: inference memory), each perturbation drawn from a pool of K seeds "
    "(Qin et al. 2024)",
    traffic="down: the K per-seed accumulators (or their change since the device's cached "
    "round); up: (seed index, sum g) per touched seed",
    sections=("fedkseed",), prepare=prepare,
    server=lambda ctx, model: FedKSeedServer(ctx.cfg.fedkseed, False, model, ctx.rules()),
    device=_device(False), update_of=update_of)

FEDKSEED_PRO = Method(
    name="fedkseed-pro", summary="FedKSeed with seeds sampled by their importance (Qin et al. "
    "2024)", traffic="FedKSeed's, plus the K seed probabilities down and sum abs(clip g) and a "
    "count per seed up", sections=("fedkseed",), prepare=prepare,
    server=lambda ctx, model: FedKSeedServer(ctx.cfg.fedkseed, True, model, ctx.rules()),
    device=_device(True))
