"""A run's peak memory is its own, even when one process runs several (benchmarks do)."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from fedtune.metrics import peak_memory_mb, reset_peak_memory

CPU = torch.device("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_the_peak_restarts_after_a_reset() -> None:
    reset_peak_memory(CPU)
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    high = peak_memory_mb(CPU)
    del big
    gc.collect()
    reset_peak_memory(CPU)
    low = peak_memory_mb(CPU)
    assert high > 0 and low > 0
    assert low < high  # the 64 MiB of the earlier phase no longer count
