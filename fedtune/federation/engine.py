"""What every engine shares: the result of one round, the engine contract, and folding a reply
into the server half.

The in-process engine (:mod:`.simulation`) and the Flower engine (:mod:`.flower.engine`) both
sample clients with :func:`fedtune.seeds.sample_clients`, seed them with
:func:`fedtune.seeds.client_seed` and feed the replies to the server half's ``accept`` in
client-id order, so the same config gives the same rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedtune.algorithms.base import Device, Server
from fedtune.data.prompts import TokenizedExample
from fedtune.federation.config import FederationConfig
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

    def fold_reply(self, server: Server, client_id: int, payload: object) -> None:
        """Count one reply's bytes and fold it into the server's aggregate; a reply that fails
        validation is logged, counted as rejected and never reaches the global state.

        Whatever a reply makes the decoder raise, the federation goes on: a ``MessageError`` is a
        refusal, anything else (a decoder bug a hostile payload found) is logged with its
        traceback and counted as rejected too. Decoding validates before any value is folded.
        """
        if not isinstance(payload, (bytes, bytearray)):
            log.warning("round %d: reply of client %d rejected: a %s, not bytes", self.round,
                        client_id, type(payload).__name__)
            self.bytes_up.append(0)
            self.rejected += 1
            return
        self.bytes_up.append(len(payload))
        try:
            info = server.accept(bytes(payload))
        except MessageError as e:
            log.warning("round %d: reply of client %d rejected: %s", self.round, client_id, e)
            self.rejected += 1
            return
        except Exception:  # noqa: BLE001 - one client must not stop the federation
            log.exception("round %d: reply of client %d rejected: the decoder failed",
                          self.round, client_id)
            self.rejected += 1
            return
        self.losses.append((info.train_loss, info.num_samples))

    @property
    def train_loss(self) -> float | None:
        """Sample-weighted mean of the accepted clients' train losses."""
        n = sum(w for _, w in self.losses)
        return sum(loss * w for loss, w in self.losses) / n if n else None


class Engine(Protocol):
    """What the run recipe needs from an engine: one round at a time, the same result shape."""

    def run_round(self, round_: int,
                  on_client: Callable[[int], None] | None = None) -> RoundResult: ...


# (server half, device half, the one model, every client's examples, federation config) -> engine
EngineFactory = Callable[
    [Server, Device, torch.nn.Module, Sequence[Sequence[TokenizedExample]], FederationConfig],
    Engine]
