"""In-process logits source: an HF causal LM and one KV cache per session.

Rows are LEFT-padded (the last prefix token of every row at the end) with an attention mask, and
position ids count each row's real tokens only (``cumsum(mask) - 1``, as ``generate`` does), so a
row's logits do not depend on the other rows of its batch. Every request is validated (token ids,
batch size, context length) before the model sees it; a bad one raises
:class:`LogitsRequestError`, an unknown or expired session :class:`UnknownSession`, and one that
finds no room (sessions, KV-cache tokens) :class:`ServiceBusy` (:class:`SessionLimit` when the
asking client already holds its share), so a service can tell "wrong" from "not now".

Sessions cost memory until closed, so they are bounded four ways: idle ones expire after
``ttl_s`` (:meth:`LocalLogits.expire`, called on demand and by the service's sweeper), at most
``max_sessions`` are open, at most ``max_sessions_per_owner`` per owner (the service's client
address: one client cannot take the whole table), and all sessions together hold at most
``max_cache_tokens`` cached tokens (sum of B * T; the bytes are :func:`kv_bytes_per_token` times
that). Each session remembers its owner, and another owner's request for it finds no session.
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

from fedtune.logits.source import MAX_TOP_K, SourceInfo, TopLogits, tokenizer_hash, top_logits


class LogitsRequestError(ValueError):
    """A malformed request (bad token ids, oversize batch, too long); nothing was computed."""


class UnknownSession(LogitsRequestError):
    """No open session has this id (never opened, closed, expired, or another client's)."""


class ServiceBusy(LogitsRequestError):
    """No room for this request now (all sessions open, KV-cache cap reached); retry later."""


class SessionLimit(ServiceBusy):
    """The asking owner already holds ``max_sessions_per_owner`` sessions; close one first."""


@dataclass
class _Session:
    cache: Any  # the model's past_key_values
    mask: torch.Tensor  # (B, T) attention mask so far, 0 on left padding
    next_pos: torch.Tensor  # (B,) position id of each row's next token
    last_used: float
    owner: str = ""  # who opened it (the service: the client's address)
    tokens: int = 0  # B * T: what the KV cache holds


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward's output: ``cache`` from transformers 5.x on (where
    ``past_key_values`` is a deprecated alias, removed in 5.40), ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def kv_bytes_per_token(model: Any) -> int | None:
    """Bytes one cached token costs: 2 (K and V) * layers * KV heads * head dim * element size.

    Lets an operator cap the sessions' memory in MB; None when the config does not say (the cap
    can then only be given in tokens).
    """
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and heads and isinstance(getattr(cfg, "hidden_size", None), int):
        head_dim = cfg.hidden_size // heads
    if not all(isinstance(x, int) and x > 0 for x in (layers, kv_heads, head_dim)):
        return None
    elem = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * elem  # type: ignore[operator]


def _cache_kwarg(model: Any) -> str:
    """The forward's name for the KV-cache input (``cache`` in newer transformers 5.x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps
    return "cache" if "cache" in inspect.signature(base.forward).parameters else \
        "past_key_values"


class LocalLogits:
    """A :class:`fedtune.logits.source.LogitsSource` over a model in this process.

    Thread-safe: the model runs one request at a time. Session limits: see the module
    docstring (0 for ``max_sessions_per_owner`` or ``max_cache_tokens``: no limit; in-process
    use has one owner).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 64,
                 max_sessions: int = 64, ttl_s: float = 600.0, max_sessions_per_owner: int = 0,
                 max_cache_tokens: int = 0, name: str = "") -> None:
        self.model = model
        self._cache_kw = _cache_kwarg(model)
        self.vocab_size = len(tokenizer)
        self.hash = tokenizer_hash(tokenizer)
        self.max_batch = max_batch
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_sessions_per_owner = max_sessions_per_owner
        self.max_cache_tokens = max_cache_tokens
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
    def _admit(self, owner: str, tokens: int) -> None:
        """Room for a new session of ``tokens`` cached tokens (idle ones beyond ``ttl_s`` are
        reclaimed first), else :class:`ServiceBusy`. Called with the lock held."""
        self._expire()
        held = sum(s.owner == owner for s in self._sessions.values())
        if self.max_sessions_per_owner and held >= self.max_sessions_per_owner:
            raise SessionLimit(f"client {owner or '(local)'} already holds {held} open sessions, "
                               f"the limit per client; close one first")
        if len(self._sessions) >= self.max_sessions:
            raise ServiceBusy(f"all {self.max_sessions} sessions are open; close one or retry "
                              f"later (an idle one expires after {self.ttl_s:g} s)")
        self._check_cache(tokens)

    def _check_cache(self, more: int) -> None:
        held = sum(s.tokens for s in self._sessions.values())
        if self.max_cache_tokens and held + more > self.max_cache_tokens:
            raise ServiceBusy(f"{more} more cached tokens would pass the service's cap of "
                              f"{self.max_cache_tokens} (sessions hold {held}); retry later")

    @torch.no_grad()
    def start(self, prefixes: Sequence[Sequence[int]], owner: str = ""
              ) -> tuple[str, torch.Tensor]:
        self._check_start(prefixes)
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for i, p in enumerate(prefixes):  # left padding
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) real-token positions
        with self._lock:
            self._admit(owner, ids.numel())
            dev = self.device
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             position_ids=pos.to(dev), use_cache=True)
            sid = uuid.uuid4().hex
            self._sessions[sid] = _Session(_cache_of(out), mask, mask.sum(-1), time.monotonic(),
                                           owner, ids.numel())
            return sid, out.logits[:, -1, :].float().cpu()  # (B, V)

    def step(self, session: str, tokens: Sequence[int], owner: str = "") -> torch.Tensor:
        """Append one token per row; the next-token logits (B, V)."""
        if not isinstance(tokens, Sequence) or isinstance(tokens, str):
            raise LogitsRequestError(f"tokens must be a list of ids, got {tokens!r}")
        return self._append(session, [[t] for t in tokens], "step needs one token per row",
                            owner)[:, 0]

    def extend(self, session: str, tokens: Sequence[Sequence[int]], owner: str = ""
               ) -> torch.Tensor:
        """Append k tokens to every row at once (teacher forcing); logits (B, k, V), where
        [:, j] follows the row's j-th new token."""
        return self._append(session, tokens, "extend needs one list of k tokens per row", owner)

    @torch.no_grad()
    def _append(self, session: str, block: Sequence[Sequence[int]], what: str,
                owner: str) -> torch.Tensor:
        with self._lock:
            s = self._sessions.get(session)
            if s is None or s.owner != owner:
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
            self._check_cache(rows * k)
            s.mask = torch.cat([s.mask, torch.ones((rows, k), dtype=torch.long)], dim=1)
            pos = s.next_pos.view(rows, 1) + torch.arange(k).view(1, k)  # (B, k)
            dev = self.device
            out = self.model(input_ids=torch.tensor([list(r) for r in block]).to(dev),
                             attention_mask=s.mask.to(dev), position_ids=pos.to(dev),
                             use_cache=True, **{self._cache_kw: s.cache})
            s.cache = _cache_of(out)
            s.next_pos = s.next_pos + k
            s.tokens += rows * k
            s.last_used = time.monotonic()
            return out.logits.float().cpu()  # (B, k, V)

    def check_top_k(self, k: object) -> int:
        """A valid top-k request size, else :class:`LogitsRequestError`."""
        most = min(int(self.model.config.vocab_size), MAX_TOP_K)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
            raise LogitsRequestError(f"top_k must be an integer in [1, {most}], got {k!r}")
        return k

    def start_top(self, prefixes: Sequence[Sequence[int]], k: int, owner: str = ""
                  ) -> tuple[str, TopLogits]:
        k = self.check_top_k(k)
        sid, logits = self.start(prefixes, owner)
        return sid, top_logits(logits, k)

    def extend_top(self, session: str, tokens: Sequence[Sequence[int]], k: int,
                   owner: str = "") -> TopLogits:
        k = self.check_top_k(k)
        return top_logits(self.extend(session, tokens, owner), k)

    def close(self, session: str, owner: str = "") -> None:
        with self._lock:
            s = self._sessions.get(session)
            if s is None or s.owner != owner:
                raise UnknownSession(f"unknown session {session!r}")
            del self._sessions[session]

    def open_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def expire(self, blocking: bool = True) -> int:
        """Drop the sessions idle for more than ``ttl_s``; how many went.

        ``blocking=False`` gives up at once if a request holds the model (a sweeper must not
        queue behind the forwards it is meant to make room for).
        """
        if not self._lock.acquire(blocking=blocking):
            return 0
        try:
            return self._expire()
        finally:
            self._lock.release()

    def _expire(self) -> int:
        now = time.monotonic()
        idle = [k for k, s in self._sessions.items() if now - s.last_used > self.ttl_s]
        for sid in idle:
            del self._sessions[sid]
        return len(idle)
