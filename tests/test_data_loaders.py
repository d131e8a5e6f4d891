"""Loaders on small files written to tmp_path, each error case, and the real shared data."""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedtune.data import (
    DataError,
    Record,
    load_alpaca,
    load_dolly,
    load_hub,
    load_jsonl,
    load_natural_instructions,
)
from fedtune.data.loaders import ni_sample_size

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

DOLLY_ROWS = [
    {"instruction": "What is 2+2?", "context": "", "response": "4", "category": "open_qa"},
    {"instruction": "Summarise.", "context": "A long text.", "response": "Text.",
     "category": "summarization"},
    {"instruction": "Name a colour.", "context": "", "response": "Red",
     "category": "brainstorming"},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- dolly -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dolly.jsonl", "dolly.jsonl.gz"])
def test_load_dolly(tmp_path: Path, name: str) -> None:
    recs = load_dolly(write_jsonl(tmp_path / name, DOLLY_ROWS))
    assert recs == [
        Record("What is 2+2?", "", "4", "open_qa"),
        Record("Summarise.", "A long text.", "Text.", "summarization"),
        Record("Name a colour.", "", "Red", "brainstorming"),
    ]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    for load in (load_dolly, load_alpaca):
        with pytest.raises(DataError, match="nope.jsonl: no such file"):
            load(missing)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [DOLLY_ROWS[0], "{not json", DOLLY_ROWS[1]])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_dolly(path)


def test_empty_output_skipped_with_one_warning(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    rows = [DOLLY_ROWS[0], {**DOLLY_ROWS[1], "response": "  "},
            {"instruction": "no response key", "context": "", "category": "x"}, DOLLY_ROWS[2]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="fedtune.data.loaders"):
        recs = load_dolly(path)
    assert [r.output for r in recs] == ["4", "Red"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 of 4" in warnings[0].getMessage()
    assert "line 2" in warnings[0].getMessage()
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: empty or non-text 'response'"):
        load_dolly(path, on_bad="error")
    with pytest.raises(ValueError, match="on_bad"):
        load_dolly(path, on_bad="ignore")


# --- alpaca ------------------------------------------------------------------------------------


def test_load_alpaca(tmp_path: Path) -> None:
    data = [{"instruction": "Add.", "input": "1 + 2", "output": "3"},
            {"instruction": "Greet.", "output": "Hello", "category": "chat"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(data, indent=2))
    assert load_alpaca(path) == [Record("Add.", "1 + 2", "3"),
                                 Record("Greet.", "", "Hello", "chat")]


def test_alpaca_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a",\n   "output": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        load_alpaca(bad)
    obj = tmp_path / "obj.json"
    obj.write_text('{"instruction": "a"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_alpaca(obj)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"instruction": "a", "output": "b"},
                                 {"instruction": "", "output": "b"}]))
    with caplog.at_level(logging.WARNING, logger="fedtune.data.loaders"):
        assert len(load_alpaca(empty)) == 1
    assert "skipped 1 of 2" in caplog.text and "record 1" in caplog.text
    with pytest.raises(DataError, match="record 1"):
        load_alpaca(empty, on_bad="error")


# --- generic jsonl and hub ---------------------------------------------------------------------

QA_ROWS: list[dict[str, Any]] = [
    {"q": "Capital of France?", "a": "Paris", "topic": "geo", "user": "u1"},
    {"q": "2 * 3?", "a": 6, "topic": "math", "user": "u2", "ctx": "arithmetic"},
]
QA_FIELDS = {"instruction": "q", "output": "a", "input": "ctx", "category": "topic",
             "source_id": "user"}
QA_RECORDS = [Record("Capital of France?", "", "Paris", "geo", "u1"),
              Record("2 * 3?", "arithmetic", "6", "math", "u2")]


def test_load_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    assert load_jsonl(path, QA_FIELDS) == QA_RECORDS
    with pytest.raises(DataError, match="must map 'output'"):
        load_jsonl(path, {"instruction": "q"})
    with pytest.raises(DataError, match="unknown record field 'answer'"):
        load_jsonl(path, {"instruction": "q", "output": "a", "answer": "a"})
    # input is optional: a map without it gives records with an empty input
    got = load_jsonl(path, {"instruction": "q", "output": "a", "category": "topic"})
    assert [(r.instruction, r.input, r.output, r.category) for r in got] == [
        ("Capital of France?", "", "Paris", "geo"), ("2 * 3?", "", "6", "math")]


def test_load_hub_local_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{**r, "a": str(r["a"]), "ctx": r.get("ctx", "")}
                                               for r in QA_ROWS])
    cache = str(tmp_path / "cache")
    assert load_hub(str(path), "train", QA_FIELDS, cache_dir=cache) == QA_RECORDS
    with pytest.raises(DataError, match="no column 'answer'"):
        load_hub(str(path), "train", {"instruction": "q", "output": "answer"}, cache_dir=cache)
    with pytest.raises(DataError, match="no such file"):
        load_hub(str(tmp_path / "missing.json"), "train", QA_FIELDS, cache_dir=cache)


# --- natural instructions ----------------------------------------------------------------------


def ni_task(name: str, n: int, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    instances = [{"id": f"{name}-{i}", "input": f"{name} input {i}", "output": [f"out {i}", "alt"]}
                 for i in range(n)]
    return {"Definition": [f"Do {name}.\n\n"], "Instances": instances + (extra or [])}


@pytest.fixture
def ni_root(tmp_path: Path) -> Path:
    root = tmp_path / "ni"
    (root / "splits" / "default").mkdir(parents=True)
    (root / "tasks_full").mkdir()
    (root / "tasks").mkdir()
    (root / "splits" / "default" / "train_tasks.txt").write_text(
        "task_a\ntask_b\ntask_missing\ntask_small\n")
    (root / "splits" / "default" / "test_tasks.txt").write_text("task_a\ntask_small\n")
    with gzip.open(root / "tasks_full" / "task_a.json.gz", "wt") as f:
        json.dump(ni_task("task_a", 30), f)
    # 23 good instances + one too long + one with an empty output
    extra = [{"id": "long", "input": "x" * 100, "output": ["y"]},
             {"id": "bad", "input": "z", "output": []}]
    (root / "tasks" / "task_b.json").write_text(json.dumps(ni_task("task_b", 23, extra)))
    (root / "tasks" / "task_small.json").write_text(json.dumps(ni_task("task_small", 5)))
    return root


def test_ni_sample_size() -> None:
    assert ni_sample_size(30, 0.2, 20, train=True) == 6
    assert ni_sample_size(19, 0.2, 20, train=True) == 0
    assert ni_sample_size(2161, 0.02, 20, train=False) == 43
    assert ni_sample_size(281, 0.02, 20, train=False) == 20
    assert ni_sample_size(5, 0.02, 20, train=False) == 5


def test_load_ni_train(ni_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedtune.data.loaders"):
        recs = load_natural_instructions(ni_root, "train", max_input_chars=50, seed=1)
    assert Counter(r.source_id for r in recs) == {"task_a": 6, "task_b": 4}  # 20% of 30 and 23
    assert all(r.category == r.source_id for r in recs)
    a = next(r for r in recs if r.source_id == "task_a")
    assert a.instruction == "Do task_a."
    i = int(a.input.rsplit(" ", 1)[1])
    assert a.output == f"out {i}"  # output[0]
    text = caplog.text
    assert "1 of 4 tasks listed in train_tasks.txt have no task file" in text
    assert "task_missing" in text
    assert "dropped 1 of 60 instances whose input is longer than max_input_chars=50" in text
    assert "skipped 1 tasks with fewer than 20" in text and "task_small (5)" in text
    assert "skipped 1 of 60 records" in text
    assert load_natural_instructions(ni_root, "train", max_input_chars=50, seed=1) == recs
    assert load_natural_instructions(ni_root, "train", max_input_chars=50, seed=2) != recs
    with pytest.raises(DataError, match="task_b.json instance 24"):
        load_natural_instructions(ni_root, "train", on_bad="error")


def test_load_ni_test(ni_root: Path) -> None:
    recs = load_natural_instructions(ni_root, "test", seed=0)
    # max(20, 2%) of task_a's 30; task_small (5 < 20) is kept whole, as in the reference
    assert Counter(r.source_id for r in recs) == {"task_a": 20, "task_small": 5}


def test_ni_errors(tmp_path: Path, ni_root: Path) -> None:
    with pytest.raises(DataError, match="train_tasks.txt: no such file"):
        load_natural_instructions(tmp_path / "empty")
    (ni_root / "tasks" / "task_small.json").write_text('{"Definition": ["x"],\n "Instances": [}')
    with pytest.raises(DataError, match=r"task_small\.json:2: malformed JSON"):
        load_natural_instructions(ni_root)


# --- the real data (skipped where ../shared/data is absent) ------------------------------------


def test_real_dolly() -> None:
    path = SHARED / "dolly" / "databricks-dolly-15k.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    recs = load_dolly(path)
    counts = Counter(r.category for r in recs)
    assert len(recs) == 15011
    assert len(counts) == 8
    assert counts["summarization"] == 1188


def test_real_natural_instructions() -> None:
    root = SHARED / "natural-instructions"
    if not root.exists():
        pytest.skip(f"{root} not present")
    train_tasks = set((root / "splits" / "default" / "train_tasks.txt").read_text().split())
    train = load_natural_instructions(root, "train", seed=0)
    ids = {r.source_id for r in train}
    assert ids <= train_tasks and len(ids) == 57
    assert all(r.instruction and r.output for r in train)
    test = load_natural_instructions(root, "test", seed=0)
    assert Counter(r.source_id for r in test) == {
        "task648_answer_generation": 20,
        "task1393_superglue_copa_text_completion": 20,
        "task957_e2e_nlg_text_generation_generate": 43,
    }
