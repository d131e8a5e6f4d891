"""The run config: one typed dataclass per concern, loaded from TOML with ``--set`` overrides.

``load_config(path, overrides)`` reads a TOML file (or nothing: the embedded defaults), applies
``key.sub=value`` overrides, checks every key and type against the dataclasses, then runs each
section's ``validate()`` and the cross-section checks. Any problem raises
:class:`fedtune.configbase.ConfigError` naming the dotted key and the value, before any work.
Relative data paths are made absolute on the way (:func:`resolve_data_paths`): against
``data.root`` when set, else against the config file's folder, so a config finds its data from
any working directory; paths given by ``--set`` (or with no file) against the current folder.
``save_config`` writes the resolved config back as TOML, so a run directory holds exactly what ran.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.algorithms.config import AlgorithmConfig
from fedtune.configbase import ConfigError, check, option, section
from fedtune.data.config import DataConfig
from fedtune.eval.config import EvalConfig
from fedtune.federation.config import FederationConfig
from fedtune.federation.secagg import check_config as check_secagg
from fedtune.models.config import ModelConfig


@dataclass
class OutputConfig:
    dir: str = option(
        "", "Run directory; empty: runs/<name>-<timestamp>. `fedtune run --out DIR` sets it."
    )
    name: str = option("", "Run name; empty: '<algorithm>-<data.format>'.")
    save_model: bool = option(
        True, "Export the final model as a directory transformers loads as it is."
    )
    plots: bool = option(True, "Write PNG plots (eval metric and cumulative bytes by round).")
    checkpoint: bool = option(
        True, "Checkpoint the server state after every round so `--resume` can continue."
    )
    keep_checkpoints: list = option(
        [], "Rounds whose checkpoint is kept after later rounds (e.g. [5, 10, 20]), so "
            "`fedtune eval RUN_DIR --round N` can score them; the last round's is always kept."
    )

    def validate(self, prefix: str = "output") -> None:
        bad = [r for r in self.keep_checkpoints if isinstance(r, bool) or not isinstance(r, int)
               or r < 1]
        check(not bad, f"{prefix}.keep_checkpoints", self.keep_checkpoints,
              "must list round numbers >= 1")
        check(self.checkpoint or not self.keep_checkpoints, f"{prefix}.keep_checkpoints",
              self.keep_checkpoints, "needs output.checkpoint = true")


def _seed_fields(obj: Any, prefix: str) -> list[tuple[str, int]]:
    """Every integer field named ``seed`` or ``*_seed``, by dotted key, at any depth."""
    out: list[tuple[str, int]] = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _seed_fields(value, key + ".")
        elif (f.name == "seed" or f.name.endswith("_seed")) and isinstance(value, int):
            out.append((key, value))
    return out


@dataclass
class RunConfig:
    data: DataConfig = section(DataConfig, "Where the records come from and how they split.")
    model: ModelConfig = section(ModelConfig, "The base model.")
    federation: FederationConfig = section(FederationConfig, "Rounds and client sampling.")
    algorithm: AlgorithmConfig = section(AlgorithmConfig, "The method and its local training.")
    evaluation: EvalConfig = section(EvalConfig, "Rouge-L and eval loss, before and after.")
    output: OutputConfig = section(OutputConfig, "What the run writes, and where.")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        for key, value in _seed_fields(self, ""):  # numpy's seeding refuses negatives, late
            check(value >= 0, key, value, "a seed must be >= 0")
        per_round = self.federation.clients_in_round(self.data.num_clients)
        key = ("federation.client_fraction" if self.federation.client_fraction > 0
               else "federation.clients_per_round")
        check(per_round <= self.data.num_clients, key, getattr(self.federation, key.split(".")[1]),
              f"asks for {per_round} clients per round but data.num_clients = "
              f"{self.data.num_clients}")
        if self.federation.secure_aggregation:
            check_secagg(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_name(self) -> str:
        return self.output.name or f"{self.algorithm.name}-{self.data.format}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp`` (ints are accepted where floats are)."""
    origin = typing.get_origin(tp) or tp
    if isinstance(origin, type) and origin is not types.NoneType:
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, bool):
            raise ConfigError(key, value, "must be an integer, not a boolean")
        if not isinstance(value, origin):
            raise ConfigError(key, value, f"must be of type {_type_name(origin)}, "
                                          f"got {type(value).__name__}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix, raw, "must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(dotted, value, f"unknown key; known keys here: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A ``--set`` value: any TOML value (5, 0.5, true, [1, 2], "x"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw TOML dict ``raw`` in place."""
    if "=" not in assignment:
        raise ConfigError(assignment, None, "an override must look like key.sub=value")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, text, "malformed key")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, text, f"'{part}' is not a table")
        node = child
    node[parts[-1]] = _parse_value(text.strip())


DATA_PATHS = ("data.path", "algorithm.fedpt.distill_path")  # resolved by resolve_data_paths
MAYBE_HUB_ID = ("hub", "chat")  # formats whose data.path may name a hub dataset, not a file


def _get(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _put(raw: dict[str, Any], key: str, value: str) -> None:
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value


def resolve_data_paths(raw: dict[str, Any], config_dir: Path | None,
                       overridden: set[str]) -> None:
    """Make ``data.root`` and the :data:`DATA_PATHS` of a raw config absolute, in place.

    ``data.root`` (when set) is relative to the config file's folder ``config_dir``, or to the
    current folder when it came from ``--set`` (its key is in ``overridden``) or there is no file.
    A relative data path then joins ``data.root`` if set, else the same base as the root would.
    A 'hub' or 'chat' data.path that is not a file or folder there stays as given: a hub id.
    Non-string values are left for the type check to name.
    """
    def base(key: str) -> Path:
        return Path.cwd() if config_dir is None or key in overridden else config_dir

    root = _get(raw, "data.root")
    if isinstance(root, str) and root:
        root = os.path.abspath(base("data.root") / Path(root).expanduser())
        _put(raw, "data.root", root)
    for key in DATA_PATHS:
        value = _get(raw, key)
        if not isinstance(value, str) or not value:
            continue
        resolved = (Path(root) if isinstance(root, str) and root else base(key)) / Path(
            value).expanduser()
        fmt = _get(raw, "data.format")
        if key == "data.path" and fmt in MAYBE_HUB_ID and not resolved.exists():
            continue
        _put(raw, key, os.path.abspath(resolved))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a run config; raises ConfigError naming the key and value."""
    raw: dict[str, Any] = {}
    config_dir = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(p), None, f"is not valid TOML: {e}") from e
        config_dir = p.resolve().parent
    for assignment in overrides or []:
        apply_override(raw, assignment)
    resolve_data_paths(raw, config_dir, {a.split("=", 1)[0].strip() for a in overrides or []})
    cfg = _build(RunConfig, raw, "")
    cfg.validate()
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as TOML (loadable again with :func:`load_config`)."""
    Path(path).write_text(tomli_w.dumps(cfg.to_dict()))


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every config field as (dotted key, type, default, help): for ``--help`` and the README."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, dotted))  # type: ignore[arg-type]
        else:
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_text += f" Choices: {', '.join(map(str, choices))}."
            rows.append((dotted, _type_name(tp), getattr(defaults, f.name), help_text))
    return rows
