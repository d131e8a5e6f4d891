"""The quality harness's statistics over seeds (bench.quality.summarise) on hand-made runs."""

import pytest

from bench.quality import seed_overrides, summarise, text_report
from fedtune.eval.stats import sign_test


def _seed(before, after, guard_before=2.0, guard_after=2.1):
    return {"rougeL_before": sum(before) / len(before), "rougeL_after": sum(after) / len(after),
            "gain": (sum(after) - sum(before)) / len(before), "eval_loss_after": 1.0,
            "guard_loss_before": guard_before, "guard_loss_after": guard_after,
            "guard_repetition_after": 0.0, "repetition_after": 0.0, "answers_up": 0,
            "answers_down": 0, "run_wall_s": 10.0, "scores_before": before,
            "scores_after": after}


def test_spread_and_paired_tests_by_hand():
    base = [0.0, 0.2, 0.5, 1.0]
    arms = {"a": [_seed(base, [0.5, 0.2, 0.4, 1.0]), _seed(base, [0.3, 0.4, 0.5, 1.0])],
            "b": [_seed(base, [0.1, 0.1, 0.6, 1.0], guard_after=2.3),
                  _seed(base, [0.1, 0.1, 0.6, 1.0], guard_after=2.5)]}
    r = summarise(arms)
    a = r["arms"]["a"]
    # seed 0: one win (0.0 -> 0.5), one loss (0.5 -> 0.4), two ties; seed 1: two wins, two ties
    per = a["vs_base"]["per_seed"]
    assert [(p["wins"], p["losses"], p["ties"]) for p in per] == [(1, 1, 2), (2, 0, 2)]
    # seed means per example: 0.4, 0.3, 0.45, 1.0 against 0.0, 0.2, 0.5, 1.0
    m = a["vs_base"]["seed_mean"]
    assert (m["wins"], m["losses"], m["ties"]) == (2, 1, 1)
    assert m["sign_p"] == pytest.approx(sign_test(2, 1))
    g = r["arms"]["b"]["spread"]["guard_loss_delta"]
    assert g["mean"] == pytest.approx(0.4) and g["min"] == pytest.approx(0.3)
    assert g["std"] == pytest.approx(0.1414213562, rel=1e-6)
    between = r["between"]["b vs a"]["seed_mean"]  # b: 0.1, 0.1, 0.6, 1.0 against a's means
    assert (between["wins"], between["losses"], between["ties"]) == (1, 2, 1)
    text = text_report({"protocol": {"data": "hand-made", "seeds": 2}, **r})
    assert "a vs base" in text and "b vs a" in text and "0.4000 ± 0.1414" in text


def test_a_seed_moves_sampling_batches_and_z_together():
    assert seed_overrides(2) == ["federation.seed=2", "algorithm.fedkseed.seed=2"]
