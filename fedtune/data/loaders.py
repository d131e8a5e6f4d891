"""Loaders: every data source becomes a list of :class:`~fedtune.data.records.Record`.

Sources: Dolly-15k (JSONL, optionally gzipped), Alpaca-style JSON lists, any JSONL with a field
map, chat conversations (``{"messages": [{"role": ..., "content": ...}, ...]}`` per record, as
TRL and most instruction sets ship them), anything ``datasets.load_dataset`` reads (local
CSV / JSON / Parquet files, hub ids for users who are online). Natural Instructions task folders
have their own module (:mod:`fedtune.data.natural_instructions`).

Errors name the file and the line or record: a missing file or malformed JSON raises
:class:`DataError`. A record missing a required key, or with an empty instruction or output, is a
*bad record*: by default (``on_bad="skip"``) it is skipped and one warning per file gives the count
and the first offender; ``on_bad="error"`` raises at the first one instead. Locations are 1-based:
``line N`` of a JSONL or CSV file (a CSV row spanning lines is named by its first), ``record N,
line L`` of a JSON list, ``row N`` of a Parquet file or hub split. A source whose every record is
bad raises too, naming the first.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any

from fedtune.data.records import Record

logger = logging.getLogger(__name__)

ON_BAD = ("skip", "error")
RECORD_FIELDS = ("instruction", "input", "output", "category", "source_id")
REQUIRED_FIELDS = ("instruction", "output")
DOLLY_FIELDS: Mapping[str, str] = {
    "instruction": "instruction", "input": "context", "output": "response", "category": "category",
}
ALPACA_FIELDS: Mapping[str, str] = {
    "instruction": "instruction", "input": "input", "output": "output", "category": "category",
}
CHAT_ROLES = ("system", "user", "assistant")
CHAT_FIELDS = ("messages", "category", "source_id")  # what a chat source's field map may name


class DataError(ValueError):
    """A data problem; the message names the file (and the line or record) it was found in."""


class BadRecords:
    """Bad records of one source: raise at the first (``error``) or count them and warn once."""

    def __init__(self, source: str, on_bad: str) -> None:
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {list(ON_BAD)}, got {on_bad!r}")
        self.source = source
        self.on_bad = on_bad
        self.count = 0
        self.first = ""

    def add(self, where: str | Callable[[], str], reason: str) -> None:
        """Count (or raise for) one bad record; a callable ``where`` is only called to name the
        first (finding a record's line may mean reading the file again)."""
        if self.on_bad == "error":
            raise DataError(f"{self.source}, {_name(where)}: {reason}")
        self.count += 1
        if not self.first:
            self.first = f"{_name(where)}: {reason}"

    def report(self, total: int) -> None:
        if self.count:
            logger.warning(
                "%s: skipped %d of %d records that are bad (first: %s); set data.on_bad = "
                "'error' to stop at the first one instead",
                self.source, self.count, total, self.first,
            )


def _name(where: str | Callable[[], str]) -> str:
    return where if isinstance(where, str) else where()


def open_text(path: Path) -> IO[str]:
    """Open ``path`` as UTF-8 text, gunzipping ``*.gz``; a missing file is a :class:`DataError`."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed object) of every non-blank line of a JSONL file."""
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})"
                    ) from e
        except (UnicodeDecodeError, OSError) as e:
            raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from e


def read_json(path: Path) -> Any:
    """The parsed content of one JSON document (optionally gzipped)."""
    with open_text(path) as f:
        try:
            text = f.read()
        except (UnicodeDecodeError, OSError) as e:
            raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from e


def check_fields(fields: Mapping[str, str]) -> None:
    """Check a field map (record field -> source key): known record fields, required ones set."""
    for key in fields:
        if key not in RECORD_FIELDS:
            raise DataError(f"unknown record field {key!r} in the field map; "
                            f"expected some of {list(RECORD_FIELDS)}")
    for key in REQUIRED_FIELDS:
        if not fields.get(key):
            raise DataError(f"the field map {dict(fields)} must map {key!r} to a source key")


def _as_text(value: Any) -> str | None:
    """A scalar as text (numbers and booleans via ``str``); None for missing or non-scalar."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    return None


def _make_record(row: Any, fields: Mapping[str, str]) -> Record | str:
    """The record ``fields`` maps out of ``row``, or the reason it is bad (a str)."""
    if not isinstance(row, Mapping):
        return f"expected a JSON object, got {type(row).__name__}"
    values = dict.fromkeys(RECORD_FIELDS, "")  # optional fields the map leaves out stay empty
    for name, key in fields.items():
        raw = row.get(key)
        text = _as_text(raw)
        if name in REQUIRED_FIELDS:
            if key not in row:
                return f"missing key {key!r}"
            if text is None or not text.strip():
                return f"empty or non-text {key!r}"
        elif raw is not None and text is None:
            return f"non-text {key!r} ({type(raw).__name__})"
        values[name] = text or ""
    return Record(values["instruction"], values["input"], values["output"], values["category"],
                  values["source_id"])


def chat_messages(value: Any) -> tuple[tuple[str, str], ...] | str:
    """The ``(role, content)`` pairs of one conversation, or the reason it is bad (a str).

    A trainable conversation: roles system (first only), user and assistant; the first turn after
    a system message is the user's, the last is the assistant's (the answer), and no assistant
    turn is empty.
    """
    if not isinstance(value, list) or not value:
        return "'messages' must be a non-empty list of {role, content} objects"
    out: list[tuple[str, str]] = []
    for j, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            return f"message {j} is a {type(message).__name__}, not a {{role, content}} object"
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            return f"message {j}: role {role!r}; expected one of {list(CHAT_ROLES)}"
        if not isinstance(content, str):
            return f"message {j} ({role}): content must be text, got {type(content).__name__}"
        if role == "system" and j > 1:
            return f"message {j}: a system message may only come first"
        if role == "assistant" and not content.strip():
            return f"message {j}: empty assistant content"
        out.append((role, content))
    turns = [role for role, _ in out if role != "system"]
    if not turns or turns[0] != "user":
        return "the first message after the system prompt must be the user's"
    if turns[-1] != "assistant":
        return "the last message must be the assistant's (the answer to learn)"
    return tuple(out)


def _make_chat_record(row: Any, fields: Mapping[str, str]) -> Record | str:
    """The chat record of ``row`` (its ``fields.get('messages', 'messages')`` list), or why not:
    instruction = the last user turn, output = the last assistant turn, messages = all turns."""
    if not isinstance(row, Mapping):
        return f"expected a JSON object, got {type(row).__name__}"
    key = fields.get("messages", "messages")
    if key not in row:
        return f"missing key {key!r} (a list of {{role, content}} messages)"
    messages = chat_messages(row[key])
    if isinstance(messages, str):
        return messages
    extra = {}
    for name in ("category", "source_id"):
        raw = row.get(fields[name]) if name in fields else None
        text = _as_text(raw)
        if raw is not None and text is None:
            return f"non-text {fields[name]!r} ({type(raw).__name__})"
        extra[name] = text or ""
    user = [content for role, content in messages if role == "user"][-1]
    return Record(instruction=user, input="", output=messages[-1][1], messages=messages, **extra)


def _records_from_rows(
    rows: Iterable[tuple[int, Any]], make: Callable[[Any], Record | str],
    locate: Callable[[int], str], source: str, on_bad: str,
) -> list[Record]:
    """Records of ``(index, row)`` pairs by ``make``; bad rows skipped-and-counted or raised,
    named by ``locate(index)``. No record left at all is an error naming the first bad one."""
    bad = BadRecords(source, on_bad)
    out: list[Record] = []
    total = 0
    for index, row in rows:
        total += 1
        rec = make(row)
        if isinstance(rec, str):
            bad.add(partial(locate, index), rec)
        else:
            out.append(rec)
    if not out:
        raise DataError(f"{source}: no usable record" + (
            f"; all {total} are bad, the first at {bad.first}" if total else " (empty)"))
    bad.report(total)
    logger.info("loaded %d records from %s", len(out), source)
    return out


def _line(n: int) -> str:
    return f"line {n}"


def _mapped(fields: Mapping[str, str]) -> Callable[[Any], Record | str]:
    return lambda row: _make_record(row, fields)


def load_dolly(path: str | Path, on_bad: str = "skip") -> list[Record]:
    """Dolly-15k JSONL (``.jsonl`` or ``.jsonl.gz``): instruction, context -> input,
    response -> output, category."""
    p = Path(path)
    return _records_from_rows(_iter_jsonl(p), _mapped(DOLLY_FIELDS), _line, str(p), on_bad)


def _json_list_lines(path: Path) -> list[int]:
    """The 1-based line on which each element of a (valid) JSON list file starts."""
    with open_text(path) as f:
        text = f.read()
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:  # past whitespace and the commas between elements
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        return i

    lines: list[int] = []
    line, pos = 1, 0
    i = skip(text.index("[") + 1)
    while i < len(text) and text[i] != "]":
        line, pos = line + text.count("\n", pos, i), i
        lines.append(line)
        i = skip(decoder.raw_decode(text, i)[1])
    return lines


def _list_locator(path: Path) -> Callable[[int], str]:
    """``record N, line L`` of the list element at 0-based ``index`` (lines read when asked)."""
    lines: list[int] = []

    def locate(index: int) -> str:
        if not lines:
            lines.extend(_json_list_lines(path))
        return f"record {index + 1}, line {lines[index]}"

    return locate


def load_alpaca(path: str | Path, on_bad: str = "skip") -> list[Record]:
    """An Alpaca-style JSON list of ``{instruction, input?, output, category?}`` objects."""
    p = Path(path)
    data = read_json(p)
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return _records_from_rows(enumerate(data), _mapped(ALPACA_FIELDS), _list_locator(p), str(p),
                              on_bad)


def load_jsonl(path: str | Path, fields: Mapping[str, str], on_bad: str = "skip") -> list[Record]:
    """Any JSONL file; ``fields`` maps record field -> source key (instruction, output required;
    input, category, source_id optional)."""
    check_fields(fields)
    p = Path(path)
    return _records_from_rows(_iter_jsonl(p), _mapped(fields), _line, str(p), on_bad)


_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _local_builder(p: Path) -> str | None:
    """The ``datasets`` builder of a local file by its suffix (``.gz`` looked through)."""
    suffixes = [s for s in p.suffixes if s != ".gz"]
    return _LOCAL_BUILDERS.get(suffixes[-1] if suffixes else "")


def _csv_row_lines(path: Path) -> list[int]:
    """The 1-based line on which each data row of a CSV file starts (blank lines skipped, as
    ``datasets``' csv builder skips them)."""
    starts: list[int] = []
    with open_text(path) as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        end = reader.line_num
        for row in reader:
            if row:
                starts.append(end + 1)
            end = reader.line_num
    return starts


def _jsonl_row_lines(path: Path) -> list[int]:
    return [n for n, _ in _iter_jsonl(path)]


def _row_locator(p: Path, builder: str | None) -> Callable[[int], str]:
    """The 1-based name of row ``index`` of a ``datasets`` split read from ``p``: its line in a
    local CSV or JSONL file, its record and line in a JSON list, else ``row N``."""
    lines: list[int] = []
    if not p.is_file():
        return lambda index: f"row {index + 1}"
    if builder == "json" and _read_first_char(p) == "[":
        return _list_locator(p)
    find = {"csv": _csv_row_lines, "json": _jsonl_row_lines}.get(builder or "")
    if find is None:
        return lambda index: f"row {index + 1}"

    def locate(index: int) -> str:
        if not lines:
            lines.extend(find(p))
        return f"line {lines[index]}" if index < len(lines) else f"row {index + 1}"

    return locate


def _read_first_char(p: Path) -> str:
    with open_text(p) as f:
        for line in f:
            if line.strip():
                return line.strip()[0]
    return ""


def _load_split(name_or_path: str, split: str, builder: str | None,
                cache_dir: str | None) -> tuple[Any, str | None]:
    """``(dataset, builder)`` of ``datasets.load_dataset``: a local file through ``builder``
    (default: by its suffix), else a local dataset folder or a hub id."""
    from datasets import load_dataset  # heavy import, only paid by these loaders

    p = Path(name_or_path)
    builder = builder or _local_builder(p)
    try:
        if p.is_file() and builder is not None:
            return load_dataset(builder, data_files={split: str(p)}, split=split,
                                cache_dir=cache_dir), builder
        if p.suffix and builder is not None and not p.exists():
            raise DataError(f"{p}: no such file")
        return load_dataset(name_or_path, split=split, cache_dir=cache_dir), None
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; keep the cause chained
        raise DataError(f"{name_or_path} (split {split!r}): datasets.load_dataset failed: "
                        f"{type(e).__name__}: {e}") from e


def load_hub(
    name_or_path: str,
    split: str,
    fields: Mapping[str, str],
    on_bad: str = "skip",
    cache_dir: str | None = None,
    builder: str | None = None,
) -> list[Record]:
    """Records through ``datasets.load_dataset``: a local ``.json/.jsonl/.csv/.parquet`` file
    (optionally ``.gz``; ``builder`` = 'csv', 'json' or 'parquet' for any other name) read as
    split ``split``, a local dataset folder, or a hub id (online users)."""
    check_fields(fields)
    ds, builder = _load_split(name_or_path, split, builder, cache_dir)
    columns = list(ds.column_names)
    for name in REQUIRED_FIELDS:
        if fields[name] not in columns:
            raise DataError(f"{name_or_path} (split {split!r}): no column {fields[name]!r} "
                            f"for record field {name!r}; columns are {columns}")
    source = name_or_path if Path(name_or_path).is_file() else f"{name_or_path} (split {split!r})"
    return _records_from_rows(enumerate(ds), _mapped(fields),
                              _row_locator(Path(name_or_path), builder), source, on_bad)


def check_chat_fields(fields: Mapping[str, str]) -> None:
    """Check a chat source's field map: only messages, category and source_id may be mapped."""
    for key in fields:
        if key not in CHAT_FIELDS:
            raise DataError(f"unknown field {key!r} in the field map of chat records; expected "
                            f"some of {list(CHAT_FIELDS)}")


def load_chat(
    path: str | Path,
    fields: Mapping[str, str] | None = None,
    on_bad: str = "skip",
    split: str = "train",
    cache_dir: str | None = None,
) -> list[Record]:
    """Chat records, ``{"messages": [{"role": ..., "content": ...}, ...]}`` each (see
    :func:`chat_messages`): a JSONL file (optionally gzipped) read line by line, or anything
    ``datasets.load_dataset`` reads (a JSON list, Parquet, a dataset folder or hub id) as split
    ``split``. ``fields`` may name other keys for messages, category and source_id."""
    fields = dict(fields or {})
    check_chat_fields(fields)

    def make(row: Any) -> Record | str:
        return _make_chat_record(row, fields)

    p = Path(path)
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        return _records_from_rows(_iter_jsonl(p), make, _line, str(p), on_bad)
    ds, builder = _load_split(str(path), split, None, cache_dir)
    source = str(p) if p.is_file() else f"{path} (split {split!r})"
    return _records_from_rows(enumerate(ds), make, _row_locator(p, builder), source, on_bad)
