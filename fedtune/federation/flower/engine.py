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

With ``federation.secure_aggregation`` the same tasks go out inside one SecAgg+ round
(:mod:`.secure`) and the server half gets only their weighted mean (``accept_mean``), never a
reply: the clear parts (round, client, sample count, train loss, weight) are checked first, and
since one reply cannot be taken out of the sum, a bad one refuses the round's mean whole.
Sampled clients left out of the mean (failed, silent, or the protocol halted) count as failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedtune.algorithms.base import ReplyInfo, Server
from fedtune.federation.config import FederationConfig
from fedtune.federation.engine import RoundResult
from fedtune.federation.flower import messages as wire
from fedtune.federation.flower.node import config_sha256
from fedtune.federation.secagg import SecAggParams
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
                 cfg: FederationConfig, config_text: str,
                 secagg: SecAggParams | None = None) -> None:
        """``secagg``: the SecAgg+ parameters, required with ``cfg.secure_aggregation``."""
        if cfg.secure_aggregation and secagg is None:
            raise ValueError("federation.secure_aggregation needs the SecAgg+ parameters")
        if cfg.secure_aggregation and server.accept_mean is None:
            raise ValueError(f"{server.name}'s server half cannot fold a secure mean")
        self.secagg = secagg if cfg.secure_aggregation else None
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
        tasks: dict[int, wire.Task] = {}  # client id -> its task
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
            tasks[cid] = wire.Task(round_, cid, client_seed(cfg.seed, round_, cid),
                                   self.config_sha256, text, down)
            sent[cid] = node

        if self.secagg is not None:
            folded = self._secure_round(round_, res, tasks, sent, self.secagg, on_client)
        else:
            folded = self._plain_round(round_, res, tasks, sent, on_client)
        need = min(cfg.min_replies, len(ids))
        if folded < need:
            raise RoundFailed(f"round {round_}: {folded} of {len(ids)} sampled clients' replies "
                              f"were aggregated within {cfg.reply_timeout_s:g} s, fewer than "
                              f"federation.min_replies = {cfg.min_replies}")
        alg.end_round()
        res.wall_s = time.perf_counter() - start
        return res

    def _plain_round(self, round_: int, res: RoundResult, tasks: dict[int, wire.Task],
                     sent: dict[int, int], on_client: Callable[[int], None] | None) -> int:
        """Send the tasks, fold the replies that pass validation; return how many arrived."""
        cfg, alg = self.cfg, self.server
        messages = [Message(task.content(), dst_node_id=sent[cid],
                            message_type=MessageType.TRAIN, group_id=str(round_),
                            ttl=cfg.reply_timeout_s) for cid, task in tasks.items()]
        arrived: dict[int, bytes] = {}
        for reply in exchange(self.grid, messages, cfg.reply_timeout_s):
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
        return len(arrived)

    def _secure_round(self, round_: int, res: RoundResult, tasks: dict[int, wire.Task],
                      sent: dict[int, int], params: SecAggParams,
                      on_client: Callable[[int], None] | None) -> int:
        """One SecAgg+ round over the tasks; fold its mean; return how many replies it holds
        (0 if the protocol halted or the mean was refused)."""
        from fedtune.federation.flower.secure import secure_round

        out = secure_round(self.grid, {sent[cid]: t.fit_ins() for cid, t in tasks.items()},
                           round_, params, self.cfg.reply_timeout_s)
        client_of = {node: cid for cid, node in sent.items()}
        clear: dict[int, wire.SecureReply] = {}
        problems: list[str] = []
        for node, fit_res in out.replies:
            try:
                got = wire.SecureReply.read(fit_res)
                if got.round != round_ or client_of.get(node) != got.client_id:
                    raise MessageError(f"reply for client {got.client_id}, round {got.round} "
                                       f"does not answer a task of round {round_}")
                if got.weight != params.weight(got.num_samples):
                    raise MessageError(f"weight {got.weight} for {got.num_samples} samples; "
                                       f"the rules give {params.weight(got.num_samples)}")
                clear[got.client_id] = got
            except MessageError as e:
                problems.append(f"node {node}: {e}")
        for cid, node in sent.items():
            kept = clear.get(cid)
            if kept is None:  # unknown state: the config and a full download next time
                self.configured.discard(node)
                self.holds.pop(cid, None)
            else:
                self.configured.add(node)
                if self.download_since is not None and 0 <= kept.holds < round_:
                    self.holds[cid] = kept.holds
                else:
                    self.holds.pop(cid, None)
            if on_client is not None:
                on_client(cid)
        res.failed += len(sent) - len(out.replies)
        if out.mean is None:
            log.error("round %d: SecAgg+ halted (a device was lost during its key stages, or "
                      "too few answered to unmask); nothing aggregated", round_)
            return 0
        names = {tuple(g.names) for g in clear.values()}
        if len(names) > 1 or any(len(g.names) != len(out.mean) for g in clear.values()):
            problems.append(f"the replies name their update's tensors differently: {names}")
        weights = [float(g.weight) for g in clear.values()]
        # every device's values lie in [-c, c], so does their mean: a hostile masked vector
        # (garbage modulo 2^32) shows up here
        top = max((float(np.abs(a).max()) for a in out.mean if a.size), default=0.0)
        if top > params.clipping_range + params.error(weights or [1.0]):
            problems.append(f"a value of the mean ({top:.4g}) lies outside the clipping range "
                            f"+-{params.clipping_range:g}")
        # the masked vector each device sent: its weight and every value as an int64
        up = 8 * (1 + sum(a.size for a in out.mean))
        res.bytes_up.extend([up] * len(out.replies))
        infos = [ReplyInfo(g.num_samples, g.train_loss) for _, g in sorted(clear.items())]
        try:
            if problems:
                raise MessageError("; ".join(problems))
            mean = {n: torch.from_numpy(a) for n, a in
                    zip(next(iter(clear.values())).names, out.mean, strict=True)}
            assert self.server.accept_mean is not None  # checked in __init__
            self.server.accept_mean(mean, sum(weights), infos, error=params.error(weights))
        except MessageError as e:
            log.error("round %d: the secure mean of %d replies is refused whole (one reply "
                      "cannot be taken out of it): %s", round_, len(out.replies), e)
            res.rejected += len(out.replies)
            return 0
        res.losses.extend((i.train_loss, i.num_samples) for i in infos)
        log.info("round %d: securely aggregated %d of %d replies (each value within %.3g of "
                 "the exact mean)", round_, len(infos), len(sent), params.error(weights))
        return len(infos)
