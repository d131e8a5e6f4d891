"""The trainable parameters of a prepared model, by name, and loading tensors into them."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a method trains and sends, by name, in ``named_parameters`` order (tied
    weights once): the index order of every seeded perturbation too."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_into(params: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor]
              ) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def upcast_trainable(model: torch.nn.Module, what: str) -> None:
    """Make the trainable parameters float32 in place (ZO master weights: updates of lr * g sit
    far below half-precision resolution)."""
    params = trainable(model)
    if any(p.dtype != torch.float32 for p in params.values()):
        log.warning(
            "%s: upcasting the trainable parameters to float32 (ZO master weights)", what)
        for p in params.values():
            p.data = p.data.to(torch.float32)
