"""A Ray-free, network-free Flower Grid for the adapter's unit tests.

``LocalGrid`` drives a ClientApp object in this process: every pushed message's content goes
through Flower's protobuf serialisation and back, then the ClientApp handles it with the node's
own Context (node config: partition-id, num-partitions, cache-dir). It needs two private details
of flwr 1.41 (``TaskIdentity``, which ``Message()`` requires outside a Flower process, and the
``_message_id`` slot): acceptable in tests only, and the reason the extra pins ``flwr<1.42``.
"""

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity  # PRIVATE

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class LocalGrid(Grid):
    """``num_nodes`` nodes (ids 1001...) with partition ids 0..num_nodes-1.

    ``silent(msg)``: the message is never answered (a stopped SuperNode). ``tamper``: rewrites
    a reply before the server sees it (a faulty or malicious device).
    """

    def __init__(self, client_app: Callable[[Message, Context], Message], num_nodes: int,
                 cache: Path, *, silent: Callable[[Message], bool] | None = None,
                 tamper: Callable[[Message], Message] | None = None) -> None:
        self.client_app = client_app
        self._run = None
        self._replies: dict[str, Message] = {}
        self.silent = silent
        self.tamper = tamper
        self.pushed: list[Message] = []
        self.contexts = {
            1001 + i: Context(run_id=1, node_id=1001 + i,
                              node_config={"partition-id": i, "num-partitions": num_nodes,
                                           "cache-dir": str(cache / f"node-{i}")},
                              state=RecordDict(), run_config={})
            for i in range(num_nodes)}

    def set_run(self, run):  # noqa: ANN001 (Flower's signature)
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid  # PRIVATE
            msg.content = recorddict_from_proto(recorddict_to_proto(msg.content))
            self.pushed.append(msg)
            ids.append(mid)
            if self.silent is not None and self.silent(msg):
                continue
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            if not reply.has_error():
                reply.content = recorddict_from_proto(recorddict_to_proto(reply.content))
            self._replies[mid] = self.tamper(reply) if self.tamper else reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return self.pull_messages(self.push_messages(messages))
