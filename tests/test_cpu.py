"""The thread policy: a fixed count is kept; auto follows the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from fedtune import cpu
from fedtune.cpu import CpuShare, ThreadPolicy, usable_cpus


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_fixed_count_is_applied_and_kept() -> None:
    policy = ThreadPolicy(1)
    assert torch.get_num_threads() == 1 and policy.update() == 1
    with pytest.raises(ValueError, match=">= 0"):
        ThreadPolicy(-1)


def test_auto_uses_what_the_competition_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
    readings = iter([(0.0, 0.0, 0.0), (3.0, 0.0, 1.0),  # 3 cores busy elsewhere: 1 left
                     (3.0, 0.0, 1.0), (3.2, 0.2, 2.0)])  # only our own work: all 4
    monkeypatch.setattr(CpuShare, "_snapshot", lambda self: next(readings))
    policy = ThreadPolicy(0, probe_s=0)
    assert policy.threads == 1 and torch.get_num_threads() == 1
    assert policy.update() == 4 and torch.get_num_threads() == 4


def test_without_proc_stat_auto_uses_every_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_busy_seconds", lambda: None)
    assert ThreadPolicy(0, probe_s=0).threads == usable_cpus()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_on_every_core_is_seen() -> None:
    n = usable_cpus()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)
        share = CpuShare()
        time.sleep(1.0)
        others = share.others_busy()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert others is not None and others > 0.5 * n
