"""How many CPU threads torch should use, given the cores this process really has.

Why this exists: torch's CPU kernels run on an OpenMP team of ``torch.get_num_threads()``
threads (by default one per core), and at the end of every parallel region the team waits for its
slowest thread, *spinning*. When another process is busy on the same cores, one thread of the team
is often descheduled, and every operation then waits a scheduler time slice for it. Measured on
this project's 2-core machine (``python -m bench.threads``), with two busy processes beside it,
a forward of the 2.1M small model took 0.26 s at 2 threads against 0.005 s at 1 thread (and 0.004
s at 2 threads on idle cores): a 70x collapse, which is what made the quick start stall on a
shared CI box. ``OMP_WAIT_POLICY=PASSIVE`` avoids the spinning but costs 1.4-3x on idle cores, so
fedtune does not set it; it sizes the team instead:

* ``threads > 0`` (``model.threads``): exactly that many, always;
* ``threads = 0`` (auto, the default): the cores this process may use (CPU affinity and a cgroup
  quota) minus those other processes kept busy, measured from ``/proc/stat`` against this
  process's own CPU time, first over a short window at start and then over every round, so a
  competing job that starts or stops mid-run is followed within a round. At least 1.

The figure only sizes torch's thread team (and, through it, the zeroth-order generator's pool);
no result depends on it: every reduction fedtune's methods rely on for bitwise reproducibility is
computed the same way for any thread count.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """Cores this process may run on: its affinity set, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have spent busy on this process's cores (None: unknown)."""
    try:
        cpus = os.sched_getaffinity(0)
        lines = Path("/proc/stat").read_text().splitlines()
    except (AttributeError, OSError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
        busy += user + nice + system + irq + softirq + steal
    return busy / hz


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuShare:
    """Measures how many cores other processes keep busy, window by window."""

    def __init__(self) -> None:
        self.cpus = usable_cpus()
        self._mark = self._snapshot()

    def _snapshot(self) -> tuple[float | None, float, float]:
        return _busy_seconds(), _own_seconds(), time.monotonic()

    def others_busy(self) -> float | None:
        """Cores busy with other processes since the last call (or construction)."""
        then, self._mark = self._mark, self._snapshot()
        if then[0] is None or self._mark[0] is None:
            return None
        wall = self._mark[2] - then[2]
        if wall <= 0:
            return None
        others = (self._mark[0] - then[0]) - (self._mark[1] - then[1])
        return max(0.0, others / wall)

    def free(self) -> int:
        """Cores left for this process by the last window's competition (at least 1)."""
        others = self.others_busy()
        if others is None:
            return self.cpus
        return max(1, min(self.cpus, self.cpus - int(others + 0.5)))


class ThreadPolicy:
    """Applies ``model.threads``: a fixed count, or (0) the free cores, re-measured on demand."""

    def __init__(self, threads: int, *, probe_s: float = 0.25) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.fixed = threads
        self.share = CpuShare() if threads == 0 else None
        if self.share is not None and probe_s > 0:
            time.sleep(probe_s)  # an idle window: everything busy in it is someone else
        self.threads = 0
        self.update(reason="start")

    def update(self, reason: str = "round") -> int:
        """Set torch's thread count for what comes next; returns it."""
        want = self.fixed if self.share is None else self.share.free()
        if want != self.threads:
            if self.threads:
                log.info("torch threads %d -> %d (%s: %s)", self.threads, want, reason,
                         "other processes busy on this machine's cores" if
                         self.share is not None and want < self.share.cpus else "cores free")
            else:
                log.info("torch threads: %d of %d usable cores%s", want, usable_cpus(),
                         "" if self.share is None else " (model.threads = 0: the free ones)")
            torch.set_num_threads(want)
            self.threads = want
        return want
