"""The registry rows of FedPrompt and FedPTuning: FedAvg over virtual-token parameters.

FedPrompt (Zhao et al., ICASSP 2023; prompt tuning, Lester et al. 2021): the base model is frozen
and ``num_virtual_tokens`` trainable embeddings are prepended to every input (peft
``PromptTuningConfig``). FedPTuning (the P-tuning baseline of FedKSeed's comparison; Liu et al.
2021): the virtual tokens come from a small trainable MLP prompt encoder (peft
``PromptEncoderConfig``). Both train by backprop on the device and average the trainable tensors
by sample count on the server: FedAvg's server and device halves, unchanged. The export is the
peft adapter (``adapter/``): virtual tokens cannot be merged into the weights;
``peft.AutoPeftModelForCausalLM`` loads it over the base model.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.base import Method, MethodContext
from fedtune.algorithms.fedavg.method import backprop_device
from fedtune.algorithms.fedavg.server import FedAvgServer
from fedtune.algorithms.params import trainable


def prepare_prompt(ctx: MethodContext, model: torch.nn.Module) -> torch.nn.Module:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    c = ctx.cfg.prompt
    init = PromptTuningInit.SAMPLE_VOCAB if c.init == "sample-vocab" else PromptTuningInit.RANDOM
    model = get_peft_model(model, PromptTuningConfig(  # type: ignore[arg-type]
        task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens, prompt_tuning_init=init))
    return model.eval()


def prepare_ptuning(ctx: MethodContext, model: torch.nn.Module) -> torch.nn.Module:
    from peft import PromptEncoderConfig, get_peft_model

    c = ctx.cfg.prompt
    model = get_peft_model(model, PromptEncoderConfig(  # type: ignore[arg-type]
        task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens,
        encoder_hidden_size=c.encoder_hidden_size))
    return model.eval()


FEDPROMPT = Method(
    name="fedprompt", summary="FedAvg over soft-prompt embeddings (prompt tuning; Zhao et al. "
    "2023)", traffic="the virtual-token embeddings, both ways", sections=("prompt",),
    prepare=prepare_prompt,
    server=lambda ctx, model: FedAvgServer(
        "fedprompt", trainable(model), rules=ctx.rules(), export="adapter"),
    device=backprop_device)

FEDPTUNING = Method(
    name="fedptuning", summary="FedAvg over a P-tuning prompt encoder (Liu et al. 2021)",
    traffic="the prompt encoder, both ways", sections=("prompt",), prepare=prepare_ptuning,
    server=lambda ctx, model: FedAvgServer(
        "fedptuning", trainable(model), rules=ctx.rules(), export="adapter"),
    device=backprop_device)
