"""The in-process engine: a whole federation in one process, one model in memory.

Per round: sample clients (seeded by round), then for each client in turn: the server half
encodes its download to bytes, the device half decodes it into the one shared model, trains in
place and encodes its reply, and the server half decodes and validates the reply and folds it
into the aggregate. Bytes are counted on those encoded messages, so they are what a device would
send and receive. A reply that fails validation is logged and dropped before it touches the
global state; a client that raises is logged and counted as failed (a round in which every client
fails stops the run: that is a bug, not a device dropping out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from fedtune.algorithms.base import Device, Server
from fedtune.data.prompts import TokenizedExample
from fedtune.federation.config import FederationConfig
from fedtune.federation.engine import RoundResult
from fedtune.seeds import client_seed, sample_clients

log = logging.getLogger(__name__)


class InProcessEngine:
    def __init__(self, server: Server, device: Device, model: torch.nn.Module,
                 clients: Sequence[Sequence[TokenizedExample]], cfg: FederationConfig) -> None:
        self.server = server
        self.device = device
        self.model = model
        self.clients = clients
        self.cfg = cfg

    def run_round(self, round_: int,
                  on_client: Callable[[int], None] | None = None) -> RoundResult:
        start = time.perf_counter()
        k = self.cfg.clients_in_round(len(self.clients))
        ids = sample_clients(len(self.clients), k, self.cfg.seed, round_)
        res = RoundResult(round_, ids)
        server = self.server
        server.begin_round(round_)
        last_error: BaseException | None = None
        for cid in ids:
            down = server.download(round_, cid)
            res.bytes_down.append(len(down))
            try:
                up = self.device.round(self.model, down, self.clients[cid], round_,
                                       client_seed(self.cfg.seed, round_, cid))
            except Exception as e:  # a device failing must not take the federation down
                log.exception("round %d: client %d failed: %s", round_, cid, e)
                res.failed += 1
                last_error = e
                continue
            finally:
                if on_client is not None:
                    on_client(cid)
            res.fold_reply(server, cid, up)
        if res.failed == len(ids):
            raise RuntimeError(f"round {round_}: every client failed") from last_error
        server.end_round()
        res.wall_s = time.perf_counter() - start
        return res
