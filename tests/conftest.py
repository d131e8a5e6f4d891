import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def interrupt_at_round(monkeypatch):
    """``interrupt_at_round(n)``: the in-process engine raises KeyboardInterrupt (a Ctrl-C) when
    round ``n`` starts, as a crash mid-run; ``interrupt_at_round(None)`` undoes it."""
    from fedtune.federation.simulation import InProcessEngine

    real = InProcessEngine.run_round

    def interrupt(n):
        if n is None:
            monkeypatch.setattr(InProcessEngine, "run_round", real)
            return

        def interrupted(self, round_, on_client=None):
            if round_ == n:
                raise KeyboardInterrupt
            return real(self, round_, on_client)

        monkeypatch.setattr(InProcessEngine, "run_round", interrupted)

    return interrupt
