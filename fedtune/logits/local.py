"""In-process logits source: an HF causal LM and one KV cache per session.

Rows are LEFT-padded (the last prefix token of every row at the end) with an attention mask, and
position ids count each row's real tokens only (``cumsum(mask) - 1``, as ``generate`` does), so a
row's logits do not depend on the other rows of its batch. Every request is validated (token ids,
batch size, context length) before the model sees it; a bad one raises
:class:`LogitsRequestError`, an unknown or expired session :class:`UnknownSession`.
"""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.logits.source import SourceInfo, tokenizer_hash


class LogitsRequestError(ValueError):
    """A malformed request (bad token ids, oversize batch, too long); nothing was computed."""


class UnknownSession(LogitsRequestError):
    """No open session has this id (never opened, closed, or expired)."""


@dataclass
class _Session:
    cache: Any  # the model's past_key_values
    mask: torch.Tensor  # (B, T) attention mask so far, 0 on left padding
    next_pos: torch.Tensor  # (B,) position id of each row's next token
    last_used: float


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward's output: ``cache`` from transformers 5.x on (where
    ``past_key_values`` is a deprecated alias, removed in 5.40), ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kwarg(model: Any) -> str:
    """The forward's name for the KV-cache input (``cache`` in newer transformers 5.x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps
    return "cache" if "cache" in inspect.signature(base.forward).parameters else \
        "past_key_values"


class LocalLogits:
    """A :class:`fedtune.logits.source.LogitsSource` over a model in this process.

    Thread-safe: the model runs one request at a time. At most ``max_sessions`` sessions stay
    open; one idle for ``ttl_s`` seconds is dropped when the next session starts.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 64,
                 max_sessions: int = 64, ttl_s: float = 600.0, name: str = "") -> None:
        self.model = model
        self._cache_kw = _cache_kwarg(model)
        self.vocab_size = len(tokenizer)
        self.hash = tokenizer_hash(tokenizer)
        self.max_batch = max_batch
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.name = name
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_positions = limit if isinstance(limit, int) else None
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def info(self) -> SourceInfo:
        return SourceInfo(logits_width=int(self.model.config.vocab_size),
                          vocab_size=self.vocab_size, tokenizer_hash=self.hash,
                          max_positions=self.max_positions, max_batch=self.max_batch,
                          name=self.name)

    # -- validation ---------------------------------------------------------------------------
    def _check_ids(self, rows: Sequence[Sequence[int]]) -> None:
        for i, row in enumerate(rows):
            for t in row:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise LogitsRequestError(f"row {i}: token id {t!r} is not an integer in "
                                             f"[0, {self.vocab_size})")

    def _check_start(self, prefixes: Sequence[Sequence[int]]) -> None:
        if not isinstance(prefixes, Sequence) or not prefixes:
            raise LogitsRequestError("prefixes must be a non-empty list of token-id lists")
        if len(prefixes) > self.max_batch:
            raise LogitsRequestError(f"batch of {len(prefixes)} rows exceeds the limit of "
                                     f"{self.max_batch}")
        for i, row in enumerate(prefixes):
            if not isinstance(row, Sequence) or isinstance(row, str) or not row:
                raise LogitsRequestError(f"row {i}: a prefix must be a non-empty list of ids")
            if self.max_positions is not None and len(row) > self.max_positions:
                raise LogitsRequestError(f"row {i}: prefix of {len(row)} tokens exceeds the "
                                         f"model's {self.max_positions} positions")
        self._check_ids(prefixes)

    # -- the interface ------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, prefixes: Sequence[Sequence[int]]) -> tuple[str, torch.Tensor]:
        self._check_start(prefixes)
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for i, p in enumerate(prefixes):  # left padding
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) real-token positions
        with self._lock:
            self._expire()
            if len(self._sessions) >= self.max_sessions:
                raise LogitsRequestError(f"{self.max_sessions} sessions are open; close one "
                                         "first")
            dev = self.device
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             position_ids=pos.to(dev), use_cache=True)
            sid = uuid.uuid4().hex
            self._sessions[sid] = _Session(_cache_of(out), mask, mask.sum(-1), time.monotonic())
            return sid, out.logits[:, -1, :].float().cpu()  # (B, V)

    def step(self, session: str, tokens: Sequence[int]) -> torch.Tensor:
        """Append one token per row; the next-token logits (B, V)."""
        if not isinstance(tokens, Sequence) or isinstance(tokens, str):
            raise LogitsRequestError(f"tokens must be a list of ids, got {tokens!r}")
        return self._append(session, [[t] for t in tokens], "step needs one token per row")[:, 0]

    def extend(self, session: str, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append k tokens to every row at once (teacher forcing); logits (B, k, V), where
        [:, j] follows the row's j-th new token."""
        return self._append(session, tokens, "extend needs one list of k tokens per row")

    @torch.no_grad()
    def _append(self, session: str, block: Sequence[Sequence[int]], what: str) -> torch.Tensor:
        with self._lock:
            s = self._sessions.get(session)
            if s is None:
                raise UnknownSession(f"unknown session {session!r} (closed, expired or never "
                                     "opened)")
            rows = s.mask.shape[0]
            if not isinstance(block, Sequence) or len(block) != rows:
                got = len(block) if isinstance(block, Sequence) else repr(block)
                raise LogitsRequestError(f"{what} ({rows} rows), got {got}")
            if any(not isinstance(r, Sequence) or isinstance(r, str) for r in block):
                raise LogitsRequestError(f"{what}: every row must be a list of ids")
            k = len(block[0])
            if k < 1 or any(len(r) != k for r in block):
                raise LogitsRequestError(f"{what}: every row needs the same number (>= 1) of "
                                         "tokens")
            self._check_ids(block)
            if (self.max_positions is not None
                    and int(s.next_pos.max()) + k > self.max_positions):
                raise LogitsRequestError(f"{k} more tokens would pass the model's "
                                         f"{self.max_positions} positions")
            s.mask = torch.cat([s.mask, torch.ones((rows, k), dtype=torch.long)], dim=1)
            pos = s.next_pos.view(rows, 1) + torch.arange(k).view(1, k)  # (B, k)
            dev = self.device
            out = self.model(input_ids=torch.tensor([list(r) for r in block]).to(dev),
                             attention_mask=s.mask.to(dev), position_ids=pos.to(dev),
                             use_cache=True, **{self._cache_kw: s.cache})
            s.cache = _cache_of(out)
            s.next_pos = s.next_pos + k
            s.last_used = time.monotonic()
            return out.logits.float().cpu()  # (B, k, V)

    def close(self, session: str) -> None:
        with self._lock:
            if self._sessions.pop(session, None) is None:
                raise UnknownSession(f"unknown session {session!r}")

    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self._sessions.items() if now - s.last_used > self.ttl_s]:
            del self._sessions[sid]
