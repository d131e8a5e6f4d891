"""The damage guard: general instructions no run trains on, scored before and after every run."""

import json

import pytest
from conftest import rows, run_cli

from fedtune.config import load_config
from fedtune.configbase import ConfigError
from fedtune.eval.guard import guard_records, guard_verdict
from fedtune.report import compare_row, load_run, summary_text, table_row
from fedtune.tensorboard import scalars

TINY = [
    "model.path=tiny", "model.tiny_vocab_size=300", "algorithm.name=fedavg",
    "federation.rounds=1", "federation.clients_per_round=2", "data.num_clients=4",
    "data.generated_per_family=6", "algorithm.local_steps=2", "algorithm.batch_size=2",
    "algorithm.lr=0.003", "evaluation.max_examples=4", "evaluation.max_new_tokens=4",
    "evaluation.guard_generations=3", "evaluation.guard_max_new_tokens=6",
    "output.save_model=false", "output.plots=false",
]


def test_the_built_in_set_is_general_and_interleaved():
    records = guard_records()
    assert len(records) == 64
    cats = [r.category for r in records]
    assert len(set(cats)) == 8 and len(set(cats[:16])) == 8  # the answered 16 span every kind
    assert all(r.instruction and r.output for r in records)


def test_a_run_scores_the_guard_before_and_after(tmp_path):
    out = tmp_path / "run"
    assert run_cli(out, *TINY) == 0
    r = rows(out)
    for row in (r[0], r[-1]):
        assert row["guard_eval_loss"] > 0 and 0 <= row["guard_repetition"] <= 1
        assert 0 <= row["guard_rougeL"] <= 1
    s = json.loads((out / "summary.json").read_text())
    for side in ("base", "final"):
        g = s[side]["guard"]
        assert g["eval_loss"] == r[0 if side == "base" else -1]["guard_eval_loss"]
        assert set(g) == {"eval_loss", "rougeL", "repetition_share"}
        assert s[side]["repetition_share"] is not None  # the eval set's own loop share
    answers = [json.loads(x) for x in (out / "guard_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and {"before", "after", "rougeL_before"} <= set(answers[0])
    assert f"{r[0]['guard_eval_loss']:.4f}" in table_row(r[0])
    assert scalars(r[-1])["guard/eval_loss"] == r[-1]["guard_eval_loss"]
    line = compare_row(load_run(out))
    assert line["guard_loss_before"] == r[0]["guard_eval_loss"]
    assert line["guard_loss_after"] == r[-1]["guard_eval_loss"]
    assert "guard (general instructions, not trained on)" in summary_text(s)


def test_no_guard_when_switched_off(tmp_path):
    out = tmp_path / "run"
    assert run_cli(out, *TINY, "evaluation.guard=false") == 0
    assert not any(k.startswith("guard_") for row in rows(out) for k in row)
    s = json.loads((out / "summary.json").read_text())
    assert "guard" not in s["final"] and "guard (" not in summary_text(s)
    assert not (out / "guard_answers.jsonl").exists()


def test_the_verdict_warns_only_when_the_guard_got_worse():
    base = {"eval_loss": 2.0, "rougeL": 0.2, "repetition_share": 0.0}
    assert guard_verdict(base, {**base, "eval_loss": 2.02}) is None  # within the tolerance
    assert guard_verdict(base, {**base, "eval_loss": 1.5}) is None
    worse = guard_verdict(base, {**base, "eval_loss": 2.3, "repetition_share": 0.25})
    assert worse is not None and "2.0000 -> 2.3000 (+0.3000)" in worse and "0% -> 25%" in worse
    assert guard_verdict({}, base) is None


def test_a_guard_file_of_the_users_own(tmp_path):
    path = tmp_path / "guard.jsonl"
    path.write_text(json.dumps({"instruction": "Name a colour.", "context": "",
                                "response": "Blue is a colour.", "category": "open_qa"}) + "\n")
    (r,) = guard_records(str(path))
    assert (r.instruction, r.output, r.category) == ("Name a colour.", "Blue is a colour.",
                                                     "open_qa")


def test_an_unknown_scorer_is_a_config_error():
    with pytest.raises(ConfigError, match="evaluation.rouge"):
        load_config(None, ["evaluation.rouge=bleu"])
    assert load_config(None, ["evaluation.rouge=fedkseed"]).evaluation.rouge == "fedkseed"
