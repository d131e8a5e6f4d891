"""The logits interface (:class:`LogitsSource`) and the shared-tokenizer check.

Glossary: B rows in a batch, V the width of a model's logits (its embedding rows, which may be
padded past the tokenizer's length), ``vocab_size`` the tokenizer's length (the ids that exist).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class SourceInfo:
    """What a client may know of a logits source before using it."""

    logits_width: int  # V: columns of the returned logits (embedding rows, maybe padded)
    vocab_size: int  # ids in [0, vocab_size) are valid tokens (the tokenizer's length)
    tokenizer_hash: str  # :func:`tokenizer_hash` of the source's tokenizer
    max_positions: int | None  # the model's context: prefix + generated tokens must fit
    max_batch: int  # most rows one session may hold
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


MAX_TOP_K = 1024  # the most columns a top-k reply may ask for


@dataclass(frozen=True)
class TopLogits:
    """The ``k`` largest logits of each row, their token ids, and the log-sum-exp of the whole
    row: enough for the exact log-probabilities of those tokens (values - lse) and the
    probability left to the rest (1 - sum exp(values - lse)), in k * 8 + 4 bytes a row instead
    of V * 4 (381x less for SmolLM2's 49,152 tokens at k = 64)."""

    values: torch.Tensor  # (..., k) float32, descending
    indices: torch.Tensor  # (..., k) int64
    lse: torch.Tensor  # (...) float32

    def log_probs(self) -> torch.Tensor:
        return self.values - self.lse.unsqueeze(-1)


def top_logits(logits: torch.Tensor, k: int) -> TopLogits:
    """:class:`TopLogits` of (..., V) logits (float32)."""
    logits = logits.float()
    values, indices = logits.topk(k, dim=-1)
    return TopLogits(values, indices, torch.logsumexp(logits, dim=-1))


def cat_top(parts: Sequence[TopLogits], dim: int) -> TopLogits:
    """Concatenate along a leading dimension (``dim`` < the last)."""
    return TopLogits(torch.cat([p.values for p in parts], dim),
                     torch.cat([p.indices for p in parts], dim),
                     torch.cat([p.lse for p in parts], dim))


class LogitsSource(Protocol):
    """Next-token logits of a model over incremental decoding sessions.

    ``start`` opens a session on B prefixes (lists of token ids, lengths may differ) and returns
    (session id, float32 logits (B, V) of the token after each prefix); ``step`` appends one token
    per row and returns the next (B, V) logits (``extend`` appends k tokens per row in one call,
    for teacher forcing); ``close`` frees the session. A row's logits never depend on the other
    rows of its batch.
    """

    def info(self) -> SourceInfo: ...

    def start(self, prefixes: Sequence[Sequence[int]]) -> tuple[str, torch.Tensor]: ...

    def step(self, session: str, tokens: Sequence[int]) -> torch.Tensor: ...

    def extend(self, session: str, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append k tokens per row at once; logits (B, k, V) after each (teacher forcing)."""
        ...

    def close(self, session: str) -> None: ...

    def start_top(self, prefixes: Sequence[Sequence[int]], k: int) -> tuple[str, TopLogits]:
        """``start``, answered with the top ``k`` logits of each row (:class:`TopLogits`)."""
        ...

    def extend_top(self, session: str, tokens: Sequence[Sequence[int]], k: int) -> TopLogits:
        """``extend``, answered with the top ``k`` logits of each position."""
        ...


class TokenizerMismatch(ValueError):
    """Models that do not share one tokenizer cannot be combined token by token."""


def tokenizer_hash(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's token -> id map (special tokens included).

    Logit arithmetic across models needs exactly this to agree: column i must mean the same token
    in every model. Two tokenizers with the same map hash alike even if their files differ in
    irrelevant ways (padding side, model_max_length).
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_shared_tokenizer(infos: dict[str, SourceInfo]) -> int:
    """Refuse sources whose tokenizers differ; return the shared vocabulary size.

    ``infos`` maps a role ('large', 'small tuned', ...) to its source's info. Every logits width
    must cover the vocabulary (a narrower model could not score every token).
    """
    hashes = {role: i.tokenizer_hash for role, i in infos.items()}
    if len(set(hashes.values())) != 1:
        detail = ", ".join(f"{role}: {h[:12]} (vocab {infos[role].vocab_size})"
                           for role, h in hashes.items())
        raise TokenizerMismatch("the models do not share one tokenizer (proxy-tuning adds their "
                                f"logits token by token): {detail}")
    vocab = next(iter(infos.values())).vocab_size
    for role, i in infos.items():
        if i.logits_width < vocab:
            raise TokenizerMismatch(f"{role} returns {i.logits_width} logits for a vocabulary of "
                                    f"{vocab} tokens")
    return vocab


def forced_logits(source: LogitsSource, rows: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of ``source`` at every position of the (B, L) token ``rows`` (teacher
    forcing): position j holds its prediction of token j + 1. One session: the first column
    starts it, the rest extends it (:meth:`LogitsSource.extend` splits what a reply cap needs)."""
    ids = rows.tolist()
    session, first = source.start([r[:1] for r in ids])
    try:
        if rows.size(1) == 1:
            return first[:, None, :]
        rest = source.extend(session, [r[1:] for r in ids])
        return torch.cat([first[:, None, :], rest], dim=1)
    finally:
        source.close(session)


def forced_top(source: LogitsSource, rows: torch.Tensor, k: int) -> TopLogits:
    """:func:`forced_logits` as :class:`TopLogits` (B, L, k): what distillation needs from a
    remote teacher, at a fraction of the bytes."""
    ids = rows.tolist()
    session, first = source.start_top([r[:1] for r in ids], k)
    try:
        head = TopLogits(first.values[:, None], first.indices[:, None], first.lse[:, None])
        if rows.size(1) == 1:
            return head
        return cat_top([head, source.extend_top(session, [r[1:] for r in ids], k)], dim=1)
    finally:
        source.close(session)
