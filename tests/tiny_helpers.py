"""Shared fixtures-as-functions for the algorithm tests: a tiny Llama and random examples."""

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.data.prompts import TokenizedExample


def tiny_model(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A one-layer Llama over 40 tokens, the same weights every call (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)).to(dtype)


def examples(client: int, n: int = 4) -> list[TokenizedExample]:
    """``n`` random examples of 4-8 tokens for ``client`` (seeded by it), first 2 masked."""
    rng = np.random.default_rng(client)
    out = []
    for _ in range(n):
        ids = rng.integers(3, 40, size=int(rng.integers(4, 9))).tolist()
        out.append(TokenizedExample(ids, [-100, -100] + ids[2:]))
    return out
