"""The in-process engine: a whole federation in one process, one model in memory.

Per round: sample clients (seeded by round), then for each client in turn: the server encodes its
download to bytes, the client decodes it into the one shared model, trains in place and encodes its
reply, and the server decodes and validates the reply and folds it into the aggregate. Bytes are
counted on those encoded messages, so they are what a device would send and receive. A reply that
fails validation is logged and dropped before it touches the global state; a client that raises
is logged and counted as failed (a round in which every client fails stops the run: that is a bug,
not a device dropping out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedtune.algorithms.base import Algorithm
from fedtune.data.prompts import TokenizedExample
from fedtune.federation.config import FederationConfig
from fedtune.federation.sampling import client_seed, sample_clients
from fedtune.wire import MessageError

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    round: int
    clients: list[int]
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    losses: list[tuple[float, int]] = field(default_factory=list)  # (train loss, samples)
    rejected: int = 0
    failed: int = 0
    wall_s: float = 0.0

    def fold_reply(self, alg: Algorithm, client_id: int, payload: bytes) -> None:
        """Count one reply's bytes and fold it into ``alg``'s aggregate; a reply that fails
        validation is logged, counted as rejected and never reaches the global state."""
        self.bytes_up.append(len(payload))
        try:
            info = alg.accept(payload)
        except MessageError as e:
            log.warning("round %d: reply of client %d rejected: %s", self.round, client_id, e)
            self.rejected += 1
            return
        self.losses.append((info.train_loss, info.num_samples))

    @property
    def train_loss(self) -> float | None:
        """Sample-weighted mean of the accepted clients' train losses."""
        n = sum(w for _, w in self.losses)
        return sum(loss * w for loss, w in self.losses) / n if n else None


class Engine(Protocol):
    """What the run recipe needs from an engine: one round at a time, the same result shape.

    The in-process engine below and the Flower engine (:mod:`fedtune.federation.flower`) both
    sample clients with :func:`sample_clients`, seed them with :func:`client_seed` and feed the
    replies to ``algorithm.accept`` in client-id order, so the same config gives the same rounds.
    """

    def run_round(self, round_: int,
                  on_client: Callable[[int], None] | None = None) -> RoundResult: ...


# (algorithm, the server's model, every client's examples, federation config) -> engine
EngineFactory = Callable[
    [Algorithm, torch.nn.Module, Sequence[Sequence[TokenizedExample]], FederationConfig], Engine]


class InProcessEngine:
    def __init__(self, algorithm: Algorithm, model: torch.nn.Module,
                 clients: Sequence[Sequence[TokenizedExample]], cfg: FederationConfig) -> None:
        self.algorithm = algorithm
        self.model = model
        self.clients = clients
        self.cfg = cfg

    def run_round(self, round_: int,
                  on_client: Callable[[int], None] | None = None) -> RoundResult:
        start = time.perf_counter()
        k = self.cfg.clients_in_round(len(self.clients))
        ids = sample_clients(len(self.clients), k, self.cfg.seed, round_)
        res = RoundResult(round_, ids)
        alg = self.algorithm
        alg.begin_round(round_)
        last_error: BaseException | None = None
        for cid in ids:
            down = alg.download(round_, cid)
            res.bytes_down.append(len(down))
            try:
                up = alg.client_round(self.model, down, self.clients[cid], round_,
                                      client_seed(self.cfg.seed, round_, cid))
            except Exception as e:  # a device failing must not take the federation down
                log.exception("round %d: client %d failed: %s", round_, cid, e)
                res.failed += 1
                last_error = e
                continue
            finally:
                if on_client is not None:
                    on_client(cid)
            res.fold_reply(alg, cid, up)
        if res.failed == len(ids):
            raise RuntimeError(f"round {round_}: every client failed") from last_error
        alg.end_round()
        res.wall_s = time.perf_counter() - start
        return res
