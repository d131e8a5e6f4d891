"""Building blocks of fedtune's typed config: fields with help text, and errors that name the key.

Every config section is a dataclass whose fields are declared with :func:`option`, which carries a
default, a help text and (optionally) the allowed choices. ``fedtune.config`` loads TOML into these
dataclasses, applies ``--set`` overrides and calls each section's ``validate()``; any problem
raises :class:`ConfigError` naming the dotted key and the offending value before any work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A config problem, always naming the dotted key and the value that was given."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"config key '{key}' = {value!r}: {reason}")


def option(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with a default, help text and optional choices (kept in its metadata)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(factory: Any, help: str) -> Any:
    """A nested config section (another dataclass), e.g. ``algorithm.lora``."""
    return dataclasses.field(default_factory=factory, metadata={"help": help, "choices": None})


def check(ok: bool, key: str, value: Any, reason: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, reason)


def check_choices(obj: Any, prefix: str) -> None:
    """Check every field of ``obj`` that declares choices against them."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{prefix}.{f.name}", value, f"must be one of {list(choices)}")
