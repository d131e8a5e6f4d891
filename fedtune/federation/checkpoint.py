"""Crash-safe checkpoints of the server state after each completed round.

Layout under ``RUN_DIR/checkpoint/``: ``server-rNNNN.safetensors`` (the algorithm's state) and
``engine.json`` (the last completed round and the engine's counters). Each file is written to a
temporary name and renamed (atomic on POSIX); ``engine.json`` is written last and names the state
file, so a crash at any point leaves the previous complete checkpoint readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


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
    meta = {"round": round_, "state_file": name, **engine}
    _atomic_write(ckpt / "engine.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    for old in ckpt.glob("server-r*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(last completed round, server state, engine counters), or None without a checkpoint."""
    meta_path = run_dir / "checkpoint" / "engine.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    state = load_file(str(run_dir / "checkpoint" / meta["state_file"]))
    return int(meta["round"]), state, meta
