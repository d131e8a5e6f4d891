"""One two-point zeroth-order step (MeZO, Malladi et al. 2023), in place and without autograd.

    θ ← θ + εz;  L⁺ = L(θ; B)
    θ ← θ − 2εz; L⁻ = L(θ; B)
    g = (L⁺ − L⁻) / (2ε)                    the projected gradient, a scalar
    θ ← θ + (ε − lr·g) z                   restore and SGD update fused in one pass

with z = z(seed) from :mod:`fedtune.zo.perturb`. The model must be in ``eval()`` mode so both
forward passes see the same function (no dropout).

Two modes, bitwise identical results (same z values, same ``add_`` with the same scalars):

* default: three generations of z per step (drawn chunk by chunk, never held in full), no copy
  of the model: memory stays at inference level, as in MeZO;
* ``keep_z=True``: z is drawn once per step into a float32 buffer the size of the trainable
  parameters (pass ``z_buffer=new_z_buffer(params)`` to reuse one across steps) and the three
  updates read it: one generation per step instead of three, for one extra copy of the
  trainable parameters in memory.

Weight decay is deliberately not offered. A decay step θ ← (1 − lr·λ)θ on the device is not a
function of the (seed, g) pairs that travel, so the server's and the devices' replay
w0 − lr·Σ_j A_j z(s_j) would no longer equal the models the clients trained; FedKSeed's
reference runs with weight decay 0 for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

from fedtune.eval.metrics import logits_window, token_loss_sum
from fedtune.zo import lowrank
from fedtune.zo.perturb import add_z_, fill_z_, new_z_buffer, perturb_
from fedtune.zo.spec import DEFAULT_Z, ZSpec


class KeptZ:
    """z kept from step to step (``keep_z``), with each step's last move deferred.

    After a step its last move is not made yet: the parameters' value is
    ``params + pending · z`` until :meth:`settle`. The next step makes that move in the same
    pass that draws its own z and makes its first move (version 2: page by page, in cache), so
    a step costs one draw and two passes over the weights instead of one draw and three; the
    bits are those of separate passes. Call :meth:`settle` before reading the parameters.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.z = new_z_buffer(self.params)
        self.pending = 0.0

    def settle(self) -> None:
        """Make the deferred move: the parameters hold their true value again."""
        if self.pending:
            add_z_(self.params, self.z, self.pending)
            self.pending = 0.0


class ZOStep(NamedTuple):
    """A taken step: the projected gradient g and the step's loss (L⁺ + L⁻) / 2."""

    g: float
    loss: float


@torch.no_grad()
def zo_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    """The model's mean token loss on ``batch`` (input_ids, attention_mask, labels): the mean
    next-token cross-entropy over the label tokens (!= -100), as a causal LM's own loss.

    Logits are computed only from the position before the batch's first label on
    (``logits_to_keep``): an instruction's answer is a short tail of its prompt, and the output
    head over a real vocabulary is a fifth of a small model's forward (smollm2-135m: 49,152 x
    576), so full logits would make every zeroth-order step about 20 % slower for nothing.
    """
    if "labels" not in batch:  # any other model with its own loss (the tests' toy functions)
        return float(model(**batch).loss.item())
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=logits_window(labels)).logits  # (B, K, V)
    total, count = token_loss_sum(logits, labels)
    return total / count if count else float("nan")


@torch.no_grad()
def zo_step(model: torch.nn.Module, params: Sequence[torch.Tensor],
            batch: Mapping[str, torch.Tensor], seed: int, eps: float, lr: float, *,
            keep_z: bool = False, z_buffer: Sequence[torch.Tensor] | None = None,
            workers: int | None = None, g_max: float = 0.0, spec: ZSpec = DEFAULT_Z,
            kept: KeptZ | None = None) -> ZOStep | None:
    """One ZO-SGD step on ``params`` (the model's trainable parameters, in index order).

    Returns (g, (L⁺ + L⁻) / 2), or None when L⁺ or L⁻ is not finite: then θ is restored with
    +εz and nothing is updated (the step is skipped).

    ``keep_z``: draw z once and keep it (see the module doc); ``z_buffer`` (shaped like
    ``params``, float32, from :func:`~fedtune.zo.perturb.new_z_buffer`) avoids allocating it
    every step and implies ``keep_z``. ``workers``: threads for drawing z (default
    ``torch.get_num_threads()``). Neither changes a single bit of the result. ``spec``: which z
    (generator version, dense or low-rank); a low-rank z is always kept, as its factors.
    ``kept``: a :class:`KeptZ` carried across steps (dense z only): the step's last move is
    deferred into the next step; settle it before reading the parameters.
    """
    if model.training:
        raise RuntimeError("zo_step needs the model in eval() mode (dropout off)")
    return zo_step_on(lambda: zo_loss(model, batch), params, seed, eps, lr,
                      keep_z=keep_z, z_buffer=z_buffer, workers=workers, g_max=g_max,
                      spec=spec, kept=kept)


@torch.no_grad()
def zo_step_on(objective: Callable[[], float], params: Sequence[torch.Tensor], seed: int,
               eps: float, lr: float, *, keep_z: bool = False,
               z_buffer: Sequence[torch.Tensor] | None = None,
               workers: int | None = None, g_max: float = 0.0, spec: ZSpec = DEFAULT_Z,
               kept: KeptZ | None = None) -> ZOStep | None:
    """:func:`zo_step` for any scalar ``objective`` of ``params`` (evaluated at θ ± εz; it must
    be deterministic, e.g. a model in ``eval()`` mode on a fixed batch): the language-model loss
    on devices, the distillation loss on a FedPT server."""
    if kept is not None:
        if spec.lowrank:
            raise ValueError("a kept z is dense; a low-rank z is kept as its factors anyway")
        if len(kept.params) != len(params) or any(
                a is not b for a, b in zip(kept.params, params, strict=True)):
            raise ValueError("this KeptZ belongs to other parameters")
        fill_z_(kept.z, seed, workers=workers, version=spec.generator, add_to=params,
                scale=eps, carry=kept.pending)  # the last move, the draw, the first move
        kept.pending = 0.0

        def defer(scale: float) -> None:
            kept.pending = scale

        return _two_point(objective, eps, lr, lambda scale: add_z_(params, kept.z, scale),
                          g_max, moved=True, last=defer)
    if spec.lowrank:
        drawn = lowrank.draw(params, seed, spec.rank)
        return _two_point(objective, eps, lr,
                          lambda scale: lowrank.add_(params, drawn, scale, spec.rank), g_max)
    if keep_z or z_buffer is not None:
        z = list(z_buffer) if z_buffer is not None else new_z_buffer(params)
        if len(z) != len(params) or any(
                a.shape != b.shape for a, b in zip(z, params, strict=True)):
            raise ValueError("z_buffer must hold one tensor shaped like each parameter")
        # the first move, θ + εz, made while z is drawn (bitwise add_z_ after the fill)
        fill_z_(z, seed, workers=workers, version=spec.generator, add_to=params, scale=eps)
        return _two_point(objective, eps, lr, lambda scale: add_z_(params, z, scale), g_max,
                          moved=True)
    return _two_point(objective, eps, lr,
                      lambda scale: perturb_(params, seed, scale, workers=workers,
                                             version=spec.generator), g_max)


def _two_point(objective: Callable[[], float], eps: float, lr: float,
               move: Callable[[float], None], g_max: float = 0.0, moved: bool = False,
               last: Callable[[float], None] | None = None) -> ZOStep | None:
    """The step itself, ``move(scale)`` adding scale·z in place (``moved``: θ + εz is made;
    ``last``: what makes the last move instead of ``move``, e.g. deferring it)."""
    if not moved:
        move(eps)
    loss_plus = objective()
    move(-2.0 * eps)
    loss_minus = objective()
    final = move if last is None else last
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        final(eps)
        return None
    g = (loss_plus - loss_minus) / (2.0 * eps)
    if g_max > 0:
        g = min(max(g, -g_max), g_max)
    final(eps - lr * g)  # restore and update fused: θ₀ − εz + (ε − lr·g) z = θ₀ − lr·g·z
    return ZOStep(g, 0.5 * (loss_plus + loss_minus))
