"""One metrics path: a JSON line per round in ``RUN_DIR/metrics.jsonl``, always carrying cost.

Each line holds the round's train loss, eval loss and Rouge-L (when measured, else null), the
bytes up and down (per client and in total, cumulative too), accepted/rejected/failed replies,
wall time and peak memory. Lines are flushed and fsync'ed one by one, so a crash leaves every
completed round readable; round 0 is the base model's evaluation.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
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
    def __init__(self, path: Path, keep_through_round: int | None = None) -> None:
        """Open ``path`` for appending; on resume, keep only rounds <= ``keep_through_round``."""
        self.path = path
        self.rows = read_metrics(path)
        if keep_through_round is not None:
            self.rows = [r for r in self.rows if r["round"] <= keep_through_round]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif path.exists():
            path.unlink()
            self.rows = []

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
