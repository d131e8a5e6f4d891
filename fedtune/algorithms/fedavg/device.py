"""The device half of the methods that send trainable tensors, and FedAvg's local backprop.

:func:`tensor_round` is their shared round: decode the download against the device's own
shapes, load it into the trainable parameters, train them in place (each method its own way),
and encode the trained tensors (or, with ``delta``, their change) as the reply.
:class:`BackpropDevice` trains by backprop with a fresh optimizer each round, as FedAvg and
FedIT do; dropout and batch order come from the client seed only (:mod:`fedtune.algorithms.local`),
so a round replays exactly, which is what makes ``--resume`` reproduce an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedtune.algorithms.base import MethodContext
from fedtune.algorithms.fedavg.wire import Download, Reply
from fedtune.algorithms.local import (
    backprop_step,
    lm_loss,
    make_optimizer,
    make_scheduler,
    run_steps,
)
from fedtune.algorithms.params import load_into, trainable
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.wire import MessageError, TensorSpec


def tensor_round(model: torch.nn.Module, payload: bytes, round_: int, num_samples: int,
                 train: Callable[[list[torch.nn.Parameter]], float], *,
                 delta: bool = False) -> bytes:
    """One device round of a tensor-sending method; ``train`` returns the mean loss."""
    params = trainable(model)
    down = Download.decode(payload, TensorSpec.of(params))
    if down.round != round_:
        raise MessageError(f"download is for round {down.round}, expected {round_}")
    load_into(params, down.tensors)
    loss = train(list(params.values()))
    if loss != loss:  # every step was skipped: nothing worth sending
        raise RuntimeError("every local step had a non-finite loss")
    sent = {k: (p.detach() - down.tensors[k].to(p.device) if delta else p.detach())
            for k, p in params.items()}
    return Reply(round_, num_samples, loss, sent).encode()


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass instead of keeping them (less memory, about
    one more forward of time); the non-reentrant form needs no input gradients, so it works
    with frozen base weights (LoRA, prompts). Idempotent."""
    kwargs = {"use_reentrant": False}
    new = getattr(model, "activation_checkpointing_enable", None)  # transformers 5.x's name
    old = getattr(model, "gradient_checkpointing_enable", None)
    if new is not None:
        new(activation_checkpointing_kwargs=kwargs)
    elif old is not None:
        old(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("algorithm.gradient_checkpointing needs a transformers model")


class BackpropDevice:
    """Local backprop on the trainable parameters (FedAvg, FedIT, FedPrompt, FedPTuning)."""

    def __init__(self, ctx: MethodContext) -> None:
        self.cfg = ctx.cfg
        self.pad_id = ctx.pad_id

    def round(self, model: torch.nn.Module, payload: bytes,
              examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        c = self.cfg

        def train(params: list[torch.nn.Parameter]) -> float:
            opt = make_optimizer(params, c.optimizer, c.lr, c.weight_decay)
            sched = make_scheduler(opt, c.lr_schedule, c.warmup_steps, c.local_steps)
            step = backprop_step(params, opt, c.max_grad_norm, lm_loss(model),
                                 accumulate=c.grad_accumulation, scheduler=sched)
            return run_steps(model, examples, steps=c.local_steps * c.grad_accumulation,
                             batch_size=c.batch_size, seed=seed,
                             collate=lambda b: collate(b, self.pad_id), step=step,
                             train_mode=True).loss

        if c.gradient_checkpointing:
            enable_checkpointing(model)
        return tensor_round(model, payload, round_, len(examples), train)

    def kept_round(self, round_: int) -> int:
        return -1
