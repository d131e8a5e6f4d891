"""Crash-safe checkpoints of the server state after each completed round.

Layout under ``RUN_DIR/checkpoint/``: ``server-rNNNN.safetensors`` (the algorithm's state) and
``engine.json`` (the last completed round and the engine's counters). Each file is written to a
temporary name and renamed (atomic on POSIX); ``engine.json`` is written last and names the state
file, so a crash at any point leaves the previous complete checkpoint readable.

Rounds named in ``output.keep_checkpoints`` keep their state file after later rounds; ``kept.json``
records each one's round, file and SHA-256, so ``fedtune eval RUN_DIR --round N`` can score it
(the last round's checkpoint is always there).

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
from collections.abc import Collection
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


KEPT = "kept.json"


def kept_rounds(run_dir: Path) -> dict[int, dict[str, str]]:
    """The kept checkpoints: round -> {"state_file", "state_sha256"}."""
    path = run_dir / "checkpoint" / KEPT
    if not path.is_file():
        return {}
    try:
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from e


def save_checkpoint(run_dir: Path, round_: int, state: dict[str, torch.Tensor],
                    engine: dict[str, Any], keep: Collection[int] = ()) -> None:
    """Write round ``round_``'s checkpoint; drop the previous one unless its round is in
    ``keep`` (``output.keep_checkpoints``)."""
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"server-r{round_:04d}.safetensors"
    flat = {k: v.contiguous() for k, v in state.items()}
    _atomic_write(ckpt / name, lambda p: save_file(flat, str(p)))
    digest = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    if round_ in keep:  # recorded before engine.json names it, so a crash cannot orphan it
        kept = {r: v for r, v in kept_rounds(run_dir).items() if r < round_}
        kept[round_] = {"state_file": name, "state_sha256": digest}
        _atomic_write(ckpt / KEPT, lambda p: p.write_text(json.dumps(
            {str(r): v for r, v in sorted(kept.items())}, indent=1)))
    meta = {"round": round_, "state_file": name, "state_sha256": digest, **engine}
    _atomic_write(ckpt / "engine.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    keep_files = {v["state_file"] for v in kept_rounds(run_dir).values()} | {name}
    for old in ckpt.glob("server-r*.safetensors"):
        if old.name not in keep_files:
            old.unlink()


def load_checkpoint(run_dir: Path, round_: int | None = None
                    ) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(last completed round, server state, engine counters), or None without a checkpoint.

    ``round_``: that round's checkpoint instead (the last one or a kept one; None if neither);
    its engine counters are then only ``{"round": round_}``.
    """
    meta_path = run_dir / "checkpoint" / "engine.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        last, name = int(meta["round"]), str(meta["state_file"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path} is damaged ({e}); the run cannot resume") from e
    if round_ is not None and round_ != last:
        kept = kept_rounds(run_dir).get(round_)
        if kept is None:
            return None
        meta = {"round": round_, **kept}
        name, meta_path = kept["state_file"], run_dir / "checkpoint" / KEPT
    round_ = int(meta["round"])
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
