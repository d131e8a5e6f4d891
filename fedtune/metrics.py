"""One metrics path: a JSON line per round in ``RUN_DIR/metrics.jsonl``, always carrying cost.

Each line holds the round's train loss, eval loss and Rouge-L (when measured, else null), the
bytes up and down (per client and in total, cumulative too), accepted/rejected/failed replies,
wall time and peak memory. Lines are flushed and fsync'ed one by one, so a crash leaves every
completed round readable; round 0 is the base model's evaluation. The same rows go to
TensorBoard event files in ``RUN_DIR/tb/`` (:mod:`fedtune.tensorboard`).
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (a run's own, even when a process runs several): the CUDA allocator's
    peak on a GPU, else the kernel's RSS high-water mark (Linux; elsewhere a no-op)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory` (or the start): CUDA allocator peak on a GPU,
    else the RSS high-water mark (VmHWM; ``ru_maxrss`` where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics file (a torn last line from a crash is ignored)."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class MetricsLog:
    """``metrics.jsonl`` and, beside it, the same rows as TensorBoard events (``tb/``)."""

    def __init__(self, path: Path, keep_through_round: int | None = None,
                 tensorboard: bool = True) -> None:
        """Open ``path`` for appending; on resume, keep only rounds <= ``keep_through_round``."""
        from fedtune.tensorboard import TB_DIR, TensorBoardLog

        self.path = path
        self.rows = read_metrics(path)
        if keep_through_round is not None:
            self.rows = [r for r in self.rows if r["round"] <= keep_through_round]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif path.exists():
            path.unlink()
            self.rows = []
        first = self.rows[-1]["round"] + 1 if self.rows else 0
        self.tb = TensorBoardLog(path.parent / TB_DIR, first) if tensorboard else None

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            self.tb.add(row)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
