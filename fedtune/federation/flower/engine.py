"""The Flower engine: the in-process engine's round, with the clients on SuperNodes.

Per round, exactly as :class:`fedtune.federation.simulation.InProcessEngine`: sample the client
ids (seeded by round), ``begin_round``, one download per sampled client; then, instead of calling
the device half in process, each download goes to the SuperNode whose ``partition-id`` is that
client id, together with the client's seed and the run config. The replies that arrive within
``federation.reply_timeout_s`` are fed to the server half's ``accept`` **sorted by client id**
(the order the in-process engine accepts them in), so the same config gives the same global
model. A reply that fails validation is logged and dropped before it touches the aggregate; a
node that raises, is offline or stays silent counts as failed. With fewer than
``federation.min_replies`` replies the round raises :class:`RoundFailed` before ``end_round``:
the run stops after its last checkpointed round and resumes from there.

Which node plays which client: nodes answer a query message with their ``partition-id``; the
directory asks every node it has not seen yet at the start of each round, so a SuperNode that
restarts (with a new node id) is found again and simply gets the next round's full download.

With ``federation.delta_downloads`` (FedKSeed) a node reports which round's global model it keeps;
its next download is the server half's ``download_since(round, that round)``, the change since
then, and the node catches up by replay however many rounds it missed. Only what a reply reported is
trusted: after a node's error reply or a server restart its next download is full (a node that
stayed silent keeps its previous cached model as well, so the change since that still applies).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedtune.algorithms.base import Server
from fedtune.federation.config import FederationConfig
from fedtune.federation.engine import RoundResult
from fedtune.federation.flower import messages as wire
from fedtune.federation.flower.node import config_sha256
from fedtune.seeds import client_seed, sample_clients
from fedtune.wire import MessageError

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """Fewer replies than ``federation.min_replies`` arrived in time."""


def exchange(grid: Grid, messages: list[Message], timeout: float, poll_s: float = 0.2,
             on_reply: Callable[[Message], None] | None = None) -> list[Message]:
    """Push ``messages`` and collect the replies that arrive within ``timeout`` seconds."""
    if not messages:
        return []
    ids = [m for m in grid.push_messages(messages) if m]
    waiting, replies = set(ids), []
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies


class NodeDirectory:
    """Which online SuperNode plays which client (partition) id."""

    def __init__(self, grid: Grid, query_timeout: float) -> None:
        self.grid = grid
        self.query_timeout = query_timeout
        self.partition_of: dict[int, int] = {}  # node id -> partition id, in discovery order

    def refresh(self) -> dict[int, int]:
        """Forget offline nodes, ask new ones their partition; return partition -> node id."""
        online = set(self.grid.get_node_ids())
        self.partition_of = {n: p for n, p in self.partition_of.items() if n in online}
        new = sorted(online - set(self.partition_of))
        if new:
            queries = [Message(wire.partition_query(), dst_node_id=n,
                               message_type=MessageType.QUERY, ttl=self.query_timeout)
                       for n in new]
            for reply in exchange(self.grid, queries, self.query_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log.warning("node %d did not say its partition: %s", node,
                                reply.error.reason)
                    continue
                try:
                    self.partition_of[node] = wire.read_partition(reply)
                except MessageError as e:
                    log.warning("node %d answered the partition query badly: %s", node, e)
        nodes: dict[int, int] = {}
        for node, partition in self.partition_of.items():
            if partition in nodes:
                log.warning("nodes %d and %d both hold partition %d; using %d", nodes[partition],
                            node, partition, node)
            nodes[partition] = node  # the later one: a restarted node has a new id
        return nodes

    def wait_for(self, partitions: Iterable[int], timeout: float, poll_s: float = 1.0
                 ) -> dict[int, int]:
        """Refresh until a node holds each of ``partitions`` or ``timeout`` seconds pass."""
        want = set(partitions)
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.refresh()
            missing = want - set(nodes)
            if not missing:
                return nodes
            if time.monotonic() >= deadline:
                log.warning("after %.0f s no SuperNode holds partitions %s; starting without",
                            timeout, sorted(missing))
                return nodes
            time.sleep(poll_s)


class FlowerEngine:
    """``run_round`` of :class:`InProcessEngine` with the clients on SuperNodes of ``grid``."""

    def __init__(self, grid: Grid, server: Server, num_clients: int,
                 cfg: FederationConfig, config_text: str) -> None:
        self.grid = grid
        self.server = server
        self.num_clients = num_clients
        self.cfg = cfg
        self.config_text = config_text
        self.config_sha256 = config_sha256(config_text)
        self.configured: set[int] = set()  # node ids that keep the config (answered a task)
        self.directory = NodeDirectory(grid, min(cfg.reply_timeout_s, 120.0))
        # delta downloads (FedKSeed): client id -> round whose global model its node keeps
        self.download_since: Callable[[int, int], bytes] | None = (
            server.download_since if cfg.delta_downloads else None)
        self.holds: dict[int, int] = {}

    def wait_for_nodes(self) -> None:
        nodes = self.directory.wait_for(range(self.num_clients), self.cfg.node_wait_s)
        log.info("SuperNodes by partition: %s", dict(sorted(nodes.items())))

    def run_round(self, round_: int,
                  on_client: Callable[[int], None] | None = None) -> RoundResult:
        start = time.perf_counter()
        cfg, alg = self.cfg, self.server
        k = cfg.clients_in_round(self.num_clients)
        ids = sample_clients(self.num_clients, k, cfg.seed, round_)
        res = RoundResult(round_, ids)
        alg.begin_round(round_)
        nodes = self.directory.refresh()
        tasks: list[Message] = []
        sent: dict[int, int] = {}  # client id -> node id
        for cid in ids:
            node = nodes.get(cid)
            if node is None:
                log.warning("round %d: no SuperNode online holds partition %d", round_, cid)
                res.failed += 1
                if on_client is not None:
                    on_client(cid)
                continue
            since = self.holds.get(cid, 0)
            down = (self.download_since(round_, since) if self.download_since and since > 0
                    else alg.download(round_, cid))
            res.bytes_down.append(len(down))
            text = "" if node in self.configured else self.config_text
            task = wire.Task(round_, cid, client_seed(cfg.seed, round_, cid), self.config_sha256,
                             text, down)
            tasks.append(Message(task.content(), dst_node_id=node,
                                 message_type=MessageType.TRAIN, group_id=str(round_),
                                 ttl=cfg.reply_timeout_s))
            sent[cid] = node

        arrived: dict[int, bytes] = {}
        for reply in exchange(self.grid, tasks, cfg.reply_timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d failed: %s", round_, node, reply.error.reason)
                self.configured.discard(node)  # e.g. its cache is gone: send everything next
                for cid, n in sent.items():
                    if n == node:
                        self.holds.pop(cid, None)
                continue
            try:
                got = wire.Reply.read(reply)
                if got.round != round_ or sent.get(got.client_id) != node:
                    raise MessageError(f"reply for client {got.client_id}, round {got.round} "
                                       f"from node {node} does not answer a task of round "
                                       f"{round_}")
            except MessageError as e:
                log.warning("round %d: reply of node %d rejected: %s", round_, node, e)
                res.rejected += 1
                continue
            arrived[got.client_id] = got.payload
            self.configured.add(node)
            if self.download_since is not None and 0 <= got.holds < round_:
                self.holds[got.client_id] = got.holds
            else:
                self.holds.pop(got.client_id, None)
        res.failed += len(sent) - len(arrived) - res.rejected
        for cid in sorted(arrived):  # the in-process engine's order
            try:
                res.fold_reply(alg, cid, arrived[cid])
            finally:
                if on_client is not None:
                    on_client(cid)
        need = min(cfg.min_replies, len(ids))
        if len(arrived) < need:
            raise RoundFailed(f"round {round_}: {len(arrived)} of {len(ids)} sampled clients "
                              f"replied within {cfg.reply_timeout_s:g} s, fewer than "
                              f"federation.min_replies = {cfg.min_replies}")
        alg.end_round()
        res.wall_s = time.perf_counter() - start
        return res
