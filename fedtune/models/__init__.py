"""Models: loading causal LMs and tokenizers, pad-token handling, and the offline tiny model."""

from fedtune.models.config import ModelConfig
from fedtune.models.loading import (
    ensure_pad_token,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from fedtune.models.tiny import build_tiny_model, tiny_model_for_tests, train_tokenizer

__all__ = [
    "ModelConfig",
    "build_tiny_model",
    "ensure_pad_token",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "tiny_model_for_tests",
    "train_tokenizer",
]
