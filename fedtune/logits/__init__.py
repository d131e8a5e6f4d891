"""The black-box boundary: next-token logits of a model, and nothing else.

A :class:`LogitsSource` is all the FedPT server ever holds of the large model: given a batch of
token prefixes it opens an incremental decoding session and returns the next-token logits of each
row; ``step`` feeds one more token per row and returns the next logits. Never weights, never
gradients. Two implementations: :class:`LocalLogits` (an HF model in this process, with its KV
cache) and :class:`RemoteLogits` (a client of ``fedtune serve-logits``, :mod:`.service`).
"""

from fedtune.logits.local import LocalLogits
from fedtune.logits.remote import LogitsServiceError, RemoteLogits
from fedtune.logits.source import LogitsSource, SourceInfo, TokenizerMismatch, tokenizer_hash

__all__ = ["LocalLogits", "LogitsServiceError", "LogitsSource", "RemoteLogits", "SourceInfo",
           "TokenizerMismatch", "tokenizer_hash"]
