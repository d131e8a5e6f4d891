"""Proxy-tuning (Liu et al. 2024, arXiv 2401.08565) as FedPT uses it (Gao et al., arXiv 2410.00362).

At every decoding step the proxy-tuned large model's logits are

    s̃(x_t | x_<t) = s_large(x_t | x_<t) + α · [s_tuned(x_t | x_<t) − s_base(x_t | x_<t)]

with s_tuned the (aggregated, tuned) small model, s_base its untuned anti-expert and α the
strength (1 in both papers). The three models run step by step, each with its own cache (each is
a :class:`fedtune.logits.LogitsSource`: the large one typically behind ``fedtune serve-logits``);
temperature, top-p and any other logits processor apply to s̃, after the arithmetic. Decoding is
greedy by default (the evaluation protocol of every method here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from fedtune.logits.source import LogitsSource, check_shared_tokenizer

T = TypeVar("T")


def proxy_logits(large: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor, alpha: float,
                 vocab_size: int, plausibility: float = 0.0) -> torch.Tensor:
    """s_large + α (s_tuned − s_base) over the first ``vocab_size`` columns.

    Each input is (..., V_model); a model whose embedding matrix is padded past the shared
    tokenizer's ``vocab_size`` has its extra columns cut (they are no token). With
    ``tuned == base`` and ``plausibility = 0`` the result equals ``large[..., :vocab_size]``
    exactly (x − x = 0 for finite x, and y + α·0 = y).

    ``plausibility`` = β > 0 lets the offset act only on the tokens the large model finds
    plausible, S = {x : p_large(x) ≥ β · max p_large} (the adaptive plausibility constraint of
    contrastive decoding, Li et al. 2023, arXiv 2210.15097): the result is then log-probabilities
    in which every token outside S keeps the large model's own, and S keeps the large model's
    total mass P_large(S), shared within S as softmax over S of s_large + α (s_tuned − s_base).
    A weak small pair then re-ranks the large model's candidates but cannot promote a token the
    large model rules out, and the distribution stays proper (a finite eval loss everywhere).
    """
    for name, t in (("large", large), ("tuned", tuned), ("base", base)):
        if t.shape[-1] < vocab_size:
            raise ValueError(f"{name} logits have {t.shape[-1]} columns, fewer than the "
                             f"vocabulary's {vocab_size}")
    v = vocab_size
    s = large[..., :v] + alpha * (tuned[..., :v] - base[..., :v])
    if plausibility <= 0.0:
        return s
    lp_large = torch.log_softmax(large[..., :v].float(), dim=-1)
    keep = lp_large >= lp_large.amax(dim=-1, keepdim=True) + math.log(plausibility)
    mass = torch.logsumexp(lp_large.masked_fill(~keep, -math.inf), dim=-1, keepdim=True)
    inside = torch.log_softmax(s.float().masked_fill(~keep, -math.inf), dim=-1)
    return torch.where(keep, mass + inside, lp_large).to(s.dtype)


@dataclass
class ProxyModel:
    """The proxy-tuned large model: three logits sources sharing one tokenizer, and α.

    Construction checks the shared tokenizer (:class:`fedtune.logits.TokenizerMismatch` if not).
    """

    large: LogitsSource
    tuned: LogitsSource
    base: LogitsSource
    alpha: float = 1.0
    plausibility: float = 0.0  # β of :func:`proxy_logits` (0: the papers' unconstrained offset)
    vocab_size: int = field(init=False)
    max_positions: int | None = field(init=False)  # the smallest context of the three
    max_batch: int = field(init=False)  # the smallest session batch limit of the three

    def __post_init__(self) -> None:
        infos = {"large": self.large.info(), "small tuned": self.tuned.info(),
                 "small base": self.base.info()}
        self.vocab_size = check_shared_tokenizer(infos)
        limits = [i.max_positions for i in infos.values() if i.max_positions is not None]
        self.max_positions = min(limits) if limits else None
        self.max_batch = min(i.max_batch for i in infos.values())

    def sources(self) -> tuple[LogitsSource, LogitsSource, LogitsSource]:
        return self.large, self.tuned, self.base


def make_processors(temperature: float | None = None, top_p: float | None = None
                    ) -> LogitsProcessorList:
    """Sampling warpers applied to s̃ (after the arithmetic), transformers' own."""
    procs = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


@dataclass
class Decoded:
    tokens: list[list[int]]  # each row's new tokens, through its EOS if it stopped there
    logits: list[torch.Tensor] | None  # each row's s̃ before processors, (len(tokens[i]), V)


@torch.no_grad()
def proxy_decode(proxy: ProxyModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_id: int | None, pad_id: int,
                 processors: LogitsProcessorList | None = None, do_sample: bool = False,
                 generator: torch.Generator | None = None,
                 keep_logits: bool = False) -> Decoded:
    """Decode one batch with s̃, the three models stepping in lockstep with their own caches.

    Each token is the argmax of the processed s̃, or a sample from it with ``do_sample``. A row
    stops at EOS; stopped rows feed ``pad_id`` until every row has stopped.
    """
    b = len(prompts)
    sessions: list[str] = []
    pool = ThreadPoolExecutor(max_workers=1)  # the large model's call overlaps the small ones'
    try:
        steps: list[torch.Tensor] = []
        for sid, first in _each(pool, [partial(src.start, prompts) for src in proxy.sources()]):
            sessions.append(sid)
            steps.append(first)
        width = max(len(p) for p in prompts)
        seqs = torch.full((b, width), pad_id, dtype=torch.long)  # left-padded, for processors
        for i, p in enumerate(prompts):
            seqs[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        tokens: list[list[int]] = [[] for _ in range(b)]
        kept: list[list[torch.Tensor]] = [[] for _ in range(b)]
        done = [False] * b
        for t in range(max_new_tokens):
            s = proxy_logits(steps[0], steps[1], steps[2], proxy.alpha, proxy.vocab_size,
                             proxy.plausibility)  # (B,V)
            scores = processors(seqs, s) if processors else s  # type: ignore[arg-type]
            if do_sample:
                probs = torch.softmax(scores, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).view(-1).tolist()
            else:
                nxt = scores.argmax(dim=-1).tolist()
            for i in range(b):
                if done[i]:
                    nxt[i] = pad_id
                    continue
                tokens[i].append(int(nxt[i]))
                if keep_logits:
                    kept[i].append(s[i])
                done[i] = nxt[i] == eos_id
            if all(done) or t + 1 == max_new_tokens:
                break
            seqs = torch.cat([seqs, torch.tensor(nxt, dtype=torch.long).view(b, 1)], dim=1)
            steps = _each(pool, [partial(src.step, sid, nxt)
                                 for src, sid in zip(proxy.sources(), sessions, strict=True)])
        logits = [torch.stack(k) if k else torch.empty(0, proxy.vocab_size) for k in kept]
        return Decoded(tokens, logits if keep_logits else None)
    finally:
        pool.shutdown(wait=True)
        _close(proxy, sessions)


def _each(pool: ThreadPoolExecutor, calls: list[Callable[[], T]]) -> list[T]:
    """Run the calls for (large, tuned, base): the large one in ``pool``, so a remote large
    model computes while the small ones run here."""
    large = pool.submit(calls[0])
    rest = [call() for call in calls[1:]]
    return [large.result()] + rest


def _close(proxy: ProxyModel, sessions: list[str]) -> None:
    for src, sid in zip(proxy.sources(), sessions, strict=False):
        try:
            src.close(sid)
        except Exception:  # noqa: BLE001 (closing is best effort; sessions also expire)
            pass


@torch.no_grad()
def proxy_forced_logits(proxy: ProxyModel, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], pad_id: int
                        ) -> list[torch.Tensor]:
    """Teacher forcing: s̃ at every position of each given continuation, (len_i, V) per row.

    One ``start`` and one ``extend`` per model (not a step per token); row i's j-th logits
    predict ``continuations[i][j]``. Shorter continuations are right-padded with ``pad_id``
    (positions after a row's end are computed and dropped).
    """
    if len(continuations) != len(prompts) or any(len(c) < 1 for c in continuations):
        raise ValueError("one non-empty continuation per prompt is needed")
    n = max(len(c) for c in continuations)
    block = [list(c[:-1]) + [pad_id] * (n - len(c)) for c in continuations]  # (B, n - 1)
    sessions: list[str] = []
    try:
        per_source = []
        for src in proxy.sources():
            sid, first = src.start(prompts)
            sessions.append(sid)
            rest = [first.unsqueeze(1)]  # (B, 1, V)
            if n > 1:
                rest.append(src.extend(sid, block))  # (B, n - 1, V)
            per_source.append(torch.cat(rest, dim=1))  # (B, n, V)
        large, tuned, base = per_source
        s = proxy_logits(large, tuned, base, proxy.alpha, proxy.vocab_size,
                         proxy.plausibility)  # (B, n, V)
        return [s[i, :len(c)] for i, c in enumerate(continuations)]
    finally:
        _close(proxy, sessions)


def fit_prompts(proxy: ProxyModel, prompts: Sequence[Sequence[int]],
                max_new_tokens: int) -> list[list[int]]:
    """Left-truncate prompts so prompt + ``max_new_tokens`` fits every model's context."""
    if proxy.max_positions is None:
        return [list(p) for p in prompts]
    keep = proxy.max_positions - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens} leaves no room for a prompt in "
                         f"{proxy.max_positions} positions")
    return [list(p)[-keep:] for p in prompts]


def proxy_generate_ids(proxy: ProxyModel, prompts: Sequence[Sequence[int]], *,
                       max_new_tokens: int, eos_id: int | None, pad_id: int,
                       batch_size: int = 8, temperature: float | None = None,
                       top_p: float | None = None, do_sample: bool = False,
                       seed: int = 0) -> list[list[int]]:
    """New token ids of each prompt under s̃ (greedy unless ``do_sample``), batched, in order.

    Prompts that do not fit the context lose their oldest tokens (as
    :func:`fedtune.eval.generation.fit_context`).
    """
    prompts = fit_prompts(proxy, prompts, max_new_tokens)
    processors = make_processors(temperature, top_p)
    generator = torch.Generator().manual_seed(seed) if do_sample else None
    batch_size = min(batch_size, proxy.max_batch)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(proxy_decode(proxy, prompts[start:start + batch_size],
                                max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                processors=processors, do_sample=do_sample,
                                generator=generator).tokens)
    return out
