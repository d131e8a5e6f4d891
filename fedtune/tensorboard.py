"""TensorBoard event files of a run's per-round metrics: ``RUN_DIR/tb/``, beside metrics.jsonl.

Every number of a metrics row becomes a scalar at step = round (round 0 = the base model), under
a tag grouped by what it measures (``loss/train``, ``loss/eval``, ``eval/rougeL``,
``bytes/up_per_client``, ``time/round_wall_s``, ``memory/peak_mb``, ``privacy/epsilon``, ...).
Rows are written and flushed as the metrics log appends them, so ``tensorboard --logdir runs``
follows a live run. A resumed run opens a new event file whose first event is a session start
at the first round it writes (``purge_step``): TensorBoard's readers then drop that round and
later ones from the earlier files, so rounds a crash left half-recorded are not shown twice.

Written with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package, a
dependency); without it the run goes on and says once that no event files are written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TB_DIR = "tb"
TAGS = {  # metrics.jsonl key -> TensorBoard tag
    "train_loss": "loss/train",
    "eval_loss": "loss/eval",
    "rougeL": "eval/rougeL",
    "small_rougeL": "eval/small_rougeL",
    "repetition": "eval/repetition_share",
    "guard_eval_loss": "guard/eval_loss",
    "guard_rougeL": "guard/rougeL",
    "guard_repetition": "guard/repetition_share",
    "num_examples": "eval/num_examples",
    "bytes_up_per_client": "bytes/up_per_client",
    "bytes_down_per_client": "bytes/down_per_client",
    "bytes_up": "bytes/up_round",
    "bytes_down": "bytes/down_round",
    "cum_bytes_up": "bytes/cumulative_up",
    "cum_bytes_down": "bytes/cumulative_down",
    "cum_bytes": "bytes/cumulative_total",
    "wall_s": "time/round_wall_s",
    "peak_memory_mb": "memory/peak_mb",
    "epsilon": "privacy/epsilon",
    "accepted": "replies/accepted",
    "rejected": "replies/rejected",
    "failed": "replies/failed",
}


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers by tag (keys without a tag of their own go under ``other/``; None,
    lists and booleans are not scalars)."""
    out = {}
    for key, value in row.items():
        if key == "round" or value is None or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[TAGS.get(key, f"other/{key}")] = float(value)
    return out


def _after_existing_files(log_dir: Path) -> None:
    """Wait (under a second) until a new event file's name sorts after every existing one.

    Readers take a directory's event files in name order, and the name starts with the creation
    second (then host, pid and a per-process counter, compared as text). A resumed run's file must
    come last for its purge to drop the old rounds; in a real resume whole seconds pass, but a
    resume within the second the first file was made (tests, a crash at once) could sort before it.
    """
    seconds = [int(parts[3]) for f in log_dir.glob("events.out.tfevents.*")
               if len(parts := f.name.split(".")) > 3 and parts[3].isdigit()]
    if seconds:  # at most 2 s: a file from a clock far ahead cannot be outwaited
        time.sleep(min(max(0.0, max(seconds) + 1 - time.time()), 2.0))


class TensorBoardLog:
    """An event-file writer for one run; ``first_round``: the first round this process writes
    (earlier files' events from that round on are superseded)."""

    def __init__(self, log_dir: Path, first_round: int = 0) -> None:
        self.writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no event files in %s (pip install "
                        "tensorboard)", log_dir)
            return
        if first_round > 0:
            _after_existing_files(log_dir)
        self.writer = SummaryWriter(str(log_dir), purge_step=first_round)

    def add(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
