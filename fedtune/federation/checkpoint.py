"""Crash-safe checkpoints of the server state after each completed round.

Layout under ``RUN_DIR/checkpoint/``: ``server-rNNNN.safetensors`` (the algorithm's state) and
``engine.json`` (the last completed round and the engine's counters). Each file is written to a
temporary name and renamed (atomic on POSIX); ``engine.json`` is written last and names the state
file, so a crash at any point leaves the previous complete checkpoint readable.

A checkpoint cannot lie: ``engine.json`` also holds the SHA-256 of the state file, and loading
verifies it and that every value of the state is finite. A damaged or altered checkpoint is
refused with :class:`CheckpointError` (never resumed into a different or non-finite model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is damaged, altered or holds non-finite state: refused."""


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, round_: int, state: dict[str, torch.Tensor],
                    engine: dict[str, Any]) -> None:
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"server-r{round_:04d}.safetensors"
    flat = {k: v.contiguous() for k, v in state.items()}
    _atomic_write(ckpt / name, lambda p: save_file(flat, str(p)))
    digest = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    meta = {"round": round_, "state_file": name, "state_sha256": digest, **engine}
    _atomic_write(ckpt / "engine.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    for old in ckpt.glob("server-r*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(last completed round, server state, engine counters), or None without a checkpoint."""
    meta_path = run_dir / "checkpoint" / "engine.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        round_, name = int(meta["round"]), str(meta["state_file"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path} is damaged ({e}); the run cannot resume") from e
    path = run_dir / "checkpoint" / Path(name).name
    if not path.is_file():
        raise CheckpointError(f"{meta_path} names {path.name}, which is missing")
    data = path.read_bytes()
    want = meta.get("state_sha256")
    if want is None:
        log.warning("%s has no checksum (written before checksums); its state is only checked "
                    "for finite values", meta_path)
    elif hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{path} does not match the checksum in {meta_path.name}: the "
                              "state was damaged or altered after it was written; refusing to "
                              "resume from it")
    try:
        state = load(data)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable state file: {e}") from e
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: state tensor {key!r} holds non-finite values; "
                                  "refusing to resume into a non-finite model")
    if not math.isfinite(float(meta.get("wall_s", 0.0))):
        raise CheckpointError(f"{meta_path}: wall_s is not finite")
    return round_, state, meta
