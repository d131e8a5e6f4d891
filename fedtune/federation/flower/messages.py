"""The Flower record layout of fedtune's messages: the one module that knows it.

A train task (server -> node, ``MessageType.TRAIN``)::

    "fedtune": ConfigRecord {"round": int, "client-id": int, "seed": int,
                             "config-sha256": str, "config": str}
    "payload": ArrayRecord  {"bytes": uint8 array}     -- algorithm.download(round, client)

its reply (node -> server)::

    "fedtune": ConfigRecord {"round": int, "client-id": int, "holds": int}
    "payload": ArrayRecord  {"bytes": uint8 array}     -- the device half's round(...)

(``holds``: the round whose global model the node keeps in its cache for a ΔA download, or -1)

and the partition query (``MessageType.QUERY``), answered by ``{"partition-id": int}``.

The payload is the algorithm's own encoded message, unchanged, in an ``ArrayRecord`` because
Flower splits large arrays into chunks (full-model FedAvg payloads are tens of MB); the bytes
reported are ``len(payload)``, never Flower's framing. ``config`` is the run's resolved TOML (a
few KB), so a node needs nothing but its node config and fedtune installed; it is sent until the
node has answered a task once, then only its hash (the node keeps the text in its cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedtune.wire import MessageError

META, PAYLOAD, BYTES = "fedtune", "payload", "bytes"


def pack(payload: bytes) -> ArrayRecord:
    return ArrayRecord({BYTES: Array(np.frombuffer(payload, dtype=np.uint8))})


def unpack(content: RecordDict) -> bytes:
    """The algorithm bytes of a message (MessageError if the record is not there)."""
    try:
        record = content.array_records[PAYLOAD]
        arr = record[BYTES].numpy()
    except (KeyError, TypeError, ValueError) as e:
        raise MessageError(f"message has no '{PAYLOAD}/{BYTES}' array: {e}") from e
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise MessageError(f"payload array has dtype {arr.dtype} and {arr.ndim} dims, "
                           "expected a flat uint8 array")
    return arr.tobytes()


def _meta(content: RecordDict) -> ConfigRecord:
    try:
        return content.config_records[META]
    except KeyError as e:
        raise MessageError(f"message has no '{META}' config record") from e


def _int(meta: ConfigRecord, key: str) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MessageError(f"'{META}/{key}' = {value!r} is not an integer")
    return value


@dataclass(frozen=True)
class Task:
    round: int
    client_id: int
    seed: int
    config_sha256: str
    config: str  # "" when the node already holds it
    payload: bytes

    def content(self) -> RecordDict:
        return RecordDict({
            META: ConfigRecord({"round": self.round, "client-id": self.client_id,
                                "seed": self.seed, "config-sha256": self.config_sha256,
                                "config": self.config}),
            PAYLOAD: pack(self.payload),
        })

    @classmethod
    def read(cls, msg: Message) -> Task:
        meta = _meta(msg.content)
        config, digest = meta.get("config"), meta.get("config-sha256")
        if not isinstance(config, str) or not isinstance(digest, str):
            raise MessageError(f"'{META}/config' or '{META}/config-sha256' is not a string")
        return cls(_int(meta, "round"), _int(meta, "client-id"), _int(meta, "seed"), digest,
                   config, unpack(msg.content))


@dataclass(frozen=True)
class Reply:
    round: int
    client_id: int
    payload: bytes
    holds: int = -1  # the round whose global model the node now keeps (-1: none)

    def content(self) -> RecordDict:
        return RecordDict({
            META: ConfigRecord({"round": self.round, "client-id": self.client_id,
                                "holds": self.holds}),
            PAYLOAD: pack(self.payload),
        })

    @classmethod
    def read(cls, msg: Message) -> Reply:
        meta = _meta(msg.content)
        holds = _int(meta, "holds") if "holds" in meta else -1
        return cls(_int(meta, "round"), _int(meta, "client-id"), unpack(msg.content), holds)


def partition_query() -> RecordDict:
    return RecordDict({META: ConfigRecord({"ask": "partition-id"})})


def partition_answer(partition_id: int) -> RecordDict:
    return RecordDict({META: ConfigRecord({"partition-id": partition_id})})


def read_partition(msg: Message) -> int:
    value = _int(_meta(msg.content), "partition-id")
    if value < 0:
        raise MessageError(f"partition-id {value} < 0")
    return value
