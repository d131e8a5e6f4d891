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

With ``federation.secure_aggregation`` the task travels inside SecAgg+'s masked-vector stage in
Flower's legacy FitIns layout (:meth:`Task.fit_ins`: the ``fedtune`` fields in
``"fitins.config"``, the payload as the one raw tensor of ``"fitins.parameters"``), and the reply
is a FitRes (:class:`SecureReply`): the update's arrays in ``"fitres.parameters"`` (which
``secaggplus_mod`` masks and clears), the weight in ``"fitres.num_examples"``, and in clear in
``"fitres.metrics"`` the ``fedtune`` fields plus ``num-samples``, ``train-loss`` and the
update's tensor names (JSON), which the server checks.

The payload is the algorithm's own encoded message, unchanged, in an ``ArrayRecord`` because
Flower splits large arrays into chunks (full-model FedAvg payloads are tens of MB); the bytes
reported are ``len(payload)``, never Flower's framing. ``config`` is the run's resolved TOML (a
few KB), so a node needs nothing but its node config and fedtune installed; it is sent until the
node has answered a task once, then only its hash (the node keeps the text in its cache).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters

from fedtune.wire import MAX_LOSS, MessageError

META, PAYLOAD, BYTES = "fedtune", "payload", "bytes"
FIT_INS, FIT_RES = "fitins", "fitres"  # Flower's legacy record prefixes (SecAgg+ reads them)
FIT_PAYLOAD = "fedtune.payload"  # the stype of the download's raw bytes in a FitIns


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


def _int(meta: Mapping[str, Any], key: str) -> int:
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
        return cls._of(_meta(msg.content), unpack(msg.content))

    @classmethod
    def _of(cls, meta: Mapping[str, Any], payload: bytes) -> Task:
        config, digest = meta.get("config"), meta.get("config-sha256")
        if not isinstance(config, str) or not isinstance(digest, str):
            raise MessageError(f"'{META}/config' or '{META}/config-sha256' is not a string")
        return cls(_int(meta, "round"), _int(meta, "client-id"), _int(meta, "seed"), digest,
                   config, payload)

    def fit_ins(self) -> FitIns:
        """The task as SecAgg+'s workflow sends it with its masked-vector stage."""
        return FitIns(Parameters(tensors=[self.payload], tensor_type=FIT_PAYLOAD),
                      {"round": self.round, "client-id": self.client_id, "seed": self.seed,
                       "config-sha256": self.config_sha256, "config": self.config})

    @classmethod
    def read_fit_ins(cls, msg: Message) -> Task:
        try:
            meta = msg.content.config_records[FIT_INS + ".config"]
            arrays = list(msg.content.array_records[FIT_INS + ".parameters"].values())
        except KeyError as e:
            raise MessageError(f"SecAgg+ task has no '{FIT_INS}' record {e}") from e
        if len(arrays) != 1 or arrays[0].stype != FIT_PAYLOAD:
            raise MessageError(f"SecAgg+ task's parameters are not one '{FIT_PAYLOAD}' payload")
        return cls._of(meta, arrays[0].data)


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


@dataclass(frozen=True)
class SecureReply:
    """A reply inside SecAgg+: the update for the masked sum, the rest in clear."""

    round: int
    client_id: int
    holds: int
    num_samples: int
    train_loss: float
    weight: int  # the weight SecAgg+ applies ("num_examples")
    names: list[str]  # the update's tensor names, in the order of its arrays

    def content(self, arrays: list[np.ndarray]) -> RecordDict:
        return RecordDict({
            FIT_RES + ".parameters": ArrayRecord(
                OrderedDict((n, Array(a)) for n, a in zip(self.names, arrays, strict=True))),
            FIT_RES + ".num_examples": MetricRecord({"num_examples": self.weight}),
            FIT_RES + ".metrics": ConfigRecord({
                "round": self.round, "client-id": self.client_id, "holds": self.holds,
                "num-samples": self.num_samples, "train-loss": self.train_loss,
                "update-names": json.dumps(self.names)}),
            FIT_RES + ".status": ConfigRecord({"code": 0, "message": ""}),
        })

    @classmethod
    def read(cls, res: FitRes) -> SecureReply:
        """The clear part of a reply (its parameters are the round's mean by now)."""
        meta = res.metrics
        loss, names = meta.get("train-loss"), meta.get("update-names")
        if not isinstance(loss, float) or not math.isfinite(loss) or not 0 <= loss <= MAX_LOSS:
            raise MessageError(f"train-loss = {loss!r} is not a finite loss")
        try:
            names = json.loads(names) if isinstance(names, str) else None
        except json.JSONDecodeError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MessageError("update-names is not a JSON list of names")
        num_samples = _int(meta, "num-samples")
        if num_samples < 1 or not isinstance(res.num_examples, int) or res.num_examples < 1:
            raise MessageError(f"num-samples = {num_samples}, weight = {res.num_examples!r}: "
                               "both must be >= 1")
        return cls(_int(meta, "round"), _int(meta, "client-id"), _int(meta, "holds"),
                   num_samples, loss, res.num_examples, names)


def partition_query() -> RecordDict:
    return RecordDict({META: ConfigRecord({"ask": "partition-id"})})


def partition_answer(partition_id: int) -> RecordDict:
    return RecordDict({META: ConfigRecord({"partition-id": partition_id})})


def read_partition(msg: Message) -> int:
    value = _int(_meta(msg.content), "partition-id")
    if value < 0:
        raise MessageError(f"partition-id {value} < 0")
    return value
