"""One SuperNode's part of a round, without Flower: the device side of the in-process engine.

A node receives the run config (TOML text, or only its hash once the node keeps it), the round,
its client id, the client's seed and the algorithm's download bytes; it returns the algorithm's
reply bytes. Everything else comes from the node itself, through its Flower node config
(``flower-supernode --node-config "k=v ..."``):

``partition-id``   the client id this node plays (simulation fills it in); a task for another id
                   is refused
``num-partitions`` optional: checked against ``data.num_clients``
``model-dir``      a local model directory to start from (default: the run's ``model.path``; for
                   ``tiny`` the node builds the same tiny model the server builds, in its cache)
``data-path``      optional: this node's own records file, read whole with the run's
                   ``data.format`` / ``data.fields`` (default: the node rebuilds its partition
                   from the run's data config, which is deterministic by seed)
``trust-remote-code`` ``true`` lets a run config with ``model.trust_remote_code`` run model code
                   from a hub on this device (default: such a run is refused)
``cache-dir``      where the node keeps what it built (default: ``partition-N`` under
                   $FEDTUNE_FLOWER_CACHE, else under the system temp dir)

Because a deployed ClientApp runs in a fresh process per message, what is worth keeping between
rounds lives on disk under ``cache-dir``: the built tiny base model and, for FedKSeed, the model
the node last trained from (the device half's cache, :class:`fedtune.algorithms.base.DeviceEnv`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fedtune.algorithms import Method, MethodContext
    from fedtune.config import RunConfig
    from fedtune.federation.secagg import DeviceUpdate

log = logging.getLogger(__name__)
CACHE_ENV = "FEDTUNE_FLOWER_CACHE"  # the default cache-dir's parent (simulation: no node config)


class NodeConfigError(ValueError):
    """A node config value is missing, of the wrong type, or contradicts the run config."""


def _int(cfg: Mapping[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise NodeConfigError(f"node config {key} = {value!r} must be an integer")
    try:
        return int(value)
    except ValueError as e:
        raise NodeConfigError(f"node config {key} = {value!r} must be an integer") from e


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int | None = None
    model_dir: str = ""
    data_path: str = ""
    cache_dir: Path | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        pid = _int(node_config, "partition-id")
        if pid is None or pid < 0:
            raise NodeConfigError("node config needs partition-id = the client id this node "
                                  "plays (flower-supernode --node-config 'partition-id=0')")
        cache = str(node_config.get("cache-dir", "") or "")
        trust = node_config.get("trust-remote-code", False)
        if not isinstance(trust, bool):
            raise NodeConfigError(f"node config trust-remote-code = {trust!r} must be true or "
                                  "false")
        return cls(pid, _int(node_config, "num-partitions"),
                   str(node_config.get("model-dir", "") or ""),
                   str(node_config.get("data-path", "") or ""),
                   Path(cache) if cache else None, trust)

    @property
    def cache(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        base = os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "fedtune-flower"
        return Path(base) / f"partition-{self.partition_id}"


def config_sha256(config_text: str) -> str:
    return hashlib.sha256(config_text.encode()).hexdigest()


def run_cache(settings: NodeSettings, digest: str) -> Path:
    """The node's cache folder of one run config (keyed by the config's hash)."""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise NodeConfigError(f"config hash {digest!r} is not a sha256 hex digest")
    path = settings.cache / "runs" / digest[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_run_config(digest: str, config_text: str, cache: Path) -> Any:
    """The run config the server sent, or the one kept from an earlier task (by its hash)."""
    from fedtune.config import load_config

    path = cache / "config.toml"
    if config_text:
        if config_sha256(config_text) != digest:
            raise NodeConfigError("the run config does not match its sha256")
        if not path.is_file() or path.read_text() != config_text:
            tmp = path.with_name("config.toml.tmp")
            tmp.write_text(config_text)
            os.replace(tmp, path)
    elif not path.is_file() or config_sha256(path.read_text()) != digest:
        raise NodeConfigError(f"this node holds no run config {digest[:16]}; the server sends "
                              "it with the next task")
    return load_config(path)


def node_round(settings: NodeSettings, digest: str, config_text: str, round_: int,
               client_id: int, seed: int, payload: bytes) -> tuple[bytes, int]:
    """Play client ``client_id`` in ``round_``: the exact call the in-process engine makes.

    Returns the reply bytes and the round whose global model the node now keeps in its cache
    (-1: none; FedKSeed with ``federation.delta_downloads`` keeps this round's start model).
    """
    played = _play(settings, digest, config_text, round_, client_id, seed, payload, False)
    return played.reply, played.holds


def secure_node_round(settings: NodeSettings, digest: str, config_text: str, round_: int,
                      client_id: int, seed: int, payload: bytes) -> tuple[DeviceUpdate, int]:
    """:func:`node_round` inside SecAgg+: the same device round, then its reply as the update
    the server averages (the method's ``update_of``, clipped as the run's rules and SecAgg+'s
    clipping range say) instead of the reply bytes."""
    from fedtune.federation.secagg import device_update, params_of

    p = _play(settings, digest, config_text, round_, client_id, seed, payload, True)
    if p.method.update_of is None:
        raise NodeConfigError(f"{p.method.name} cannot aggregate securely")
    update, info = p.method.update_of(p.ctx, p.model, payload, p.reply, round_)
    return device_update(update, info, params_of(p.cfg), p.ctx.rules().clip), p.holds


@dataclass
class _Played:
    """A node's round: what it ran with, the trained model and its reply."""

    cfg: RunConfig
    method: Method
    ctx: MethodContext
    model: torch.nn.Module
    reply: bytes
    holds: int


def _play(settings: NodeSettings, digest: str, config_text: str, round_: int, client_id: int,
          seed: int, payload: bytes, secure: bool) -> _Played:
    import torch

    from fedtune.algorithms import METHODS, DeviceEnv, MethodContext
    from fedtune.cpu import ThreadPolicy
    from fedtune.data.pipeline import all_texts, build_federated_data, load_records
    from fedtune.data.prompts import tokenize_records
    from fedtune.models.loading import load_model_and_tokenizer, resolve_model_source
    from fedtune.runner import base_model_path

    if client_id != settings.partition_id:
        raise NodeConfigError(f"task for client {client_id} sent to the node of partition "
                              f"{settings.partition_id}")
    cache = run_cache(settings, digest)
    cfg = load_run_config(digest, config_text, cache)
    n = cfg.data.num_clients
    if settings.num_partitions is not None and settings.num_partitions != n:
        raise NodeConfigError(f"node config num-partitions = {settings.num_partitions} but the "
                              f"run has data.num_clients = {n}")
    if not 0 <= client_id < n:
        raise NodeConfigError(f"partition-id {client_id} outside the run's {n} clients")
    if cfg.federation.secure_aggregation != secure:
        raise NodeConfigError("the run asks for secure aggregation: this node sends its update "
                              "only through SecAgg+" if not secure else
                              "a SecAgg+ task for a run without federation.secure_aggregation")
    if cfg.model.trust_remote_code and not settings.trust_remote_code:
        raise NodeConfigError("the run asks for model.trust_remote_code; this node runs no "
                              "downloaded model code unless its node config says "
                              "trust-remote-code=true")
    torch.manual_seed(cfg.federation.seed)  # as the in-process run does
    ThreadPolicy(cfg.model.threads)  # the node's free cores (nodes often share a machine)

    data = None
    if settings.data_path:
        records = load_records(replace(cfg.data, path=settings.data_path))
    else:
        data = build_federated_data(cfg.data)
        records = data.clients[client_id]
    if settings.model_dir:
        model_path = settings.model_dir
    elif cfg.model.path == "tiny":
        if data is None:
            raise NodeConfigError("model.path = 'tiny' builds the tokenizer from the whole run's "
                                  "data; with a node-local data-path set model-dir as well")
        model_path = base_model_path(cfg, cache, all_texts(data))
    else:
        model_path = cfg.model.path
    model, tokenizer = load_model_and_tokenizer(model_path, cfg.model.dtype, cfg.model.device,
                                                trust_remote_code=cfg.model.trust_remote_code,
                                                cache_dir=cfg.model.cache_dir or None)
    examples = tokenize_records(records, tokenizer, cfg.data.max_length,
                                template=cfg.data.template)
    if not examples:
        raise ValueError(f"client {client_id} has no trainable example after tokenisation")
    method = METHODS[cfg.algorithm.name]  # FedPT's devices are its device trainer's
    ctx = MethodContext(cfg.algorithm, int(tokenizer.pad_token_id), tokenizer)
    prepared = method.prepare(ctx, model)
    # one client per process: about inference memory. w0 may be read from the model's files
    # (float32 only: a model loaded in a lower precision and upcast is not the file's w0)
    source = Path(resolve_model_source(model_path, cfg.model.cache_dir or None))
    w0_dir = (source if cfg.model.dtype == "float32" and source.is_dir()
              and any(source.glob("*.safetensors")) else None)
    env = DeviceEnv(one_client=True, w0_dir=w0_dir,
                    cache_dir=cache if cfg.federation.delta_downloads else None)
    device = method.device(ctx, prepared, env)
    log.info("node of partition %d: round %d, %d examples, model %s", client_id, round_,
             len(examples), model_path)
    reply = device.round(prepared, payload, examples, round_, seed)
    return _Played(cfg, method, ctx, prepared, reply, device.kept_round(round_))
