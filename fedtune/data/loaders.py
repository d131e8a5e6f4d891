"""Loaders: every data source becomes a list of :class:`~fedtune.data.records.Record`.

Sources: Dolly-15k (JSONL, optionally gzipped), Alpaca-style JSON lists, any JSONL with a field
map, anything ``datasets.load_dataset`` reads (hub ids for users who are online, local files), and
Natural Instructions task folders with the paper's sampling.

Errors name the file and the line or record: a missing file or malformed JSON raises
:class:`DataError`. A record missing a required key, or with an empty instruction or output, is a
*bad record*: by default (``on_bad="skip"``) it is skipped and one warning per file gives the count
and the first offender; ``on_bad="error"`` raises at the first one instead.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

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


class DataError(ValueError):
    """A data problem; the message names the file (and the line or record) it was found in."""


class _BadRecords:
    """Bad records of one source: raise at the first (``error``) or count them and warn once."""

    def __init__(self, source: str, on_bad: str) -> None:
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {list(ON_BAD)}, got {on_bad!r}")
        self.source = source
        self.on_bad = on_bad
        self.count = 0
        self.first = ""

    def add(self, where: str, reason: str) -> None:
        if self.on_bad == "error":
            raise DataError(f"{self.source}, {where}: {reason}")
        self.count += 1
        if not self.first:
            self.first = f"{where}: {reason}"

    def report(self, total: int) -> None:
        if self.count:
            logger.warning(
                "%s: skipped %d of %d records with a missing key or empty text (first: %s); "
                "pass on_bad='error' to stop at the first one instead",
                self.source, self.count, total, self.first,
            )


def _open_text(path: Path) -> IO[str]:
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
    with _open_text(path) as f:
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


def _read_json(path: Path) -> Any:
    """The parsed content of one JSON document (optionally gzipped)."""
    with _open_text(path) as f:
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
    return Record(**values)


def _records_from_rows(
    rows: Iterable[tuple[str, Any]], fields: Mapping[str, str], source: str, on_bad: str
) -> list[Record]:
    """Records of ``(location, row)`` pairs; bad rows skipped-and-counted or raised."""
    bad = _BadRecords(source, on_bad)
    out: list[Record] = []
    total = 0
    for where, row in rows:
        total += 1
        rec = _make_record(row, fields)
        if isinstance(rec, str):
            bad.add(where, rec)
        else:
            out.append(rec)
    bad.report(total)
    logger.info("loaded %d records from %s", len(out), source)
    return out


def load_dolly(path: str | Path, on_bad: str = "skip") -> list[Record]:
    """Dolly-15k JSONL (``.jsonl`` or ``.jsonl.gz``): instruction, context -> input,
    response -> output, category."""
    p = Path(path)
    rows = ((f"line {n}", obj) for n, obj in _iter_jsonl(p))
    return _records_from_rows(rows, DOLLY_FIELDS, str(p), on_bad)


def load_alpaca(path: str | Path, on_bad: str = "skip") -> list[Record]:
    """An Alpaca-style JSON list of ``{instruction, input?, output, category?}`` objects."""
    p = Path(path)
    data = _read_json(p)
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    rows = ((f"record {i}", obj) for i, obj in enumerate(data))
    return _records_from_rows(rows, ALPACA_FIELDS, str(p), on_bad)


def load_jsonl(path: str | Path, fields: Mapping[str, str], on_bad: str = "skip") -> list[Record]:
    """Any JSONL file; ``fields`` maps record field -> source key (instruction, output required;
    input, category, source_id optional)."""
    check_fields(fields)
    p = Path(path)
    rows = ((f"line {n}", obj) for n, obj in _iter_jsonl(p))
    return _records_from_rows(rows, fields, str(p), on_bad)


_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_hub(
    name_or_path: str,
    split: str,
    fields: Mapping[str, str],
    on_bad: str = "skip",
    cache_dir: str | None = None,
) -> list[Record]:
    """Records through ``datasets.load_dataset``: a hub id (online users), a local dataset folder,
    or a local ``.json/.jsonl/.csv/.parquet`` file (optionally ``.gz``) read by the matching
    builder as split ``split``."""
    check_fields(fields)
    from datasets import load_dataset  # heavy import, only paid by this loader

    p = Path(name_or_path)
    suffixes = [s for s in p.suffixes if s != ".gz"]
    builder = _LOCAL_BUILDERS.get(suffixes[-1] if suffixes else "")
    try:
        if p.is_file() and builder is not None:
            ds = load_dataset(builder, data_files={split: str(p)}, split=split,
                              cache_dir=cache_dir)
        elif p.suffix and builder is not None and not p.exists():
            raise DataError(f"{p}: no such file")
        else:
            ds = load_dataset(name_or_path, split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; keep the cause chained
        raise DataError(f"{name_or_path} (split {split!r}): datasets.load_dataset failed: "
                        f"{type(e).__name__}: {e}") from e
    columns = list(ds.column_names)
    for name in REQUIRED_FIELDS:
        if fields[name] not in columns:
            raise DataError(f"{name_or_path} (split {split!r}): no column {fields[name]!r} "
                            f"for record field {name!r}; columns are {columns}")
    rows = ((f"row {i}", row) for i, row in enumerate(ds))
    return _records_from_rows(rows, fields, f"{name_or_path} (split {split!r})", on_bad)


# ----------------------------------------------------------------------------------------------
# Natural Instructions


def ni_sample_size(n: int, fraction: float, min_instances: int, train: bool) -> int:
    """How many of a task's ``n`` instances (after the length filter) the paper's protocol keeps.

    train: ``0`` (task skipped) when ``n < min_instances``, else ``max(1, floor(fraction * n))``
    (FedKSeed: 20%); eval: ``min(n, max(min_instances, floor(fraction * n)))`` (FedKSeed:
    max(20, 2%); a test task with fewer instances is kept whole, as in the reference).
    """
    if train:
        return 0 if n < min_instances else max(1, int(fraction * n))
    return min(n, max(min_instances, int(fraction * n)))


def _find_task(root: Path, task: str) -> Path | None:
    """The task file of ``task``: ``tasks_full/<task>.json.gz`` first, then the plain layouts."""
    for sub in ("tasks_full", "tasks"):
        for ext in (".json.gz", ".json"):
            candidate = root / sub / f"{task}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _ni_definition(data: Any, path: Path) -> str:
    """Definition[0] of a task file (stripped: the template adds its own separators)."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (a Natural Instructions task)")
    definition = data.get("Definition")
    if isinstance(definition, list) and definition:
        definition = definition[0]
    if not isinstance(definition, str) or not definition.strip():
        raise DataError(f"{path}: missing or empty 'Definition'")
    if not isinstance(data.get("Instances"), list):
        raise DataError(f"{path}: missing 'Instances' list")
    return definition.strip()


def _ni_record(inst: Any, instruction: str, task: str) -> Record | str:
    """Record of one instance (output = output[0]), or the reason it is bad."""
    if not isinstance(inst, dict):
        return f"expected a JSON object, got {type(inst).__name__}"
    if not isinstance(inst.get("input"), str):
        return "missing or non-text 'input'"
    output = inst.get("output")
    if isinstance(output, list):
        output = output[0] if output else None
    if not isinstance(output, str) or not output.strip():
        return "missing or empty 'output'"
    return Record(instruction=instruction, input=inst["input"], output=output,
                  category=task, source_id=task)


def load_natural_instructions(
    root: str | Path,
    split: str = "train",
    fraction: float | None = None,
    min_instances: int = 20,
    max_input_chars: int = 4096,
    seed: int = 0,
    on_bad: str = "skip",
) -> list[Record]:
    """Natural Instructions tasks of ``splits/default/<split>_tasks.txt``, sampled as in FedKSeed.

    Per instance: instruction = Definition[0], input, output = output[0], category = source_id =
    the task name. Instances whose input is longer than ``max_input_chars`` are dropped (counted),
    then :func:`ni_sample_size` instances per task are drawn without replacement (``fraction``
    defaults to 0.2 for ``train``, 0.02 otherwise). Each task has its own generator seeded by
    ``(seed, crc32(task))``, so a task's sample does not change when other tasks are absent.
    Tasks listed but not on disk are counted and logged once (only part of NI may be present).
    """
    base = Path(root)
    train = split == "train"
    frac = fraction if fraction is not None else (0.2 if train else 0.02)
    if not 0 < frac <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {frac}")
    split_file = base / "splits" / "default" / f"{split}_tasks.txt"
    with _open_text(split_file) as f:
        tasks = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    found = [(task, _find_task(base, task)) for task in tasks]
    present = [(task, path) for task, path in found if path is not None]
    missing = [task for task, path in found if path is None]
    if missing:
        logger.warning(
            "%s: %d of %d tasks listed in %s have no task file under tasks_full/ or tasks/ "
            "(first: %s); loading the %d present",
            base, len(missing), len(tasks), split_file.name, missing[0], len(present),
        )
    if not present:
        raise DataError(f"{base}: none of the {len(tasks)} tasks of {split_file} has a task file "
                        "under tasks_full/ or tasks/")

    bad = _BadRecords(f"{base} ({split})", on_bad)
    total = too_long = 0
    small: list[str] = []
    out: list[Record] = []
    for task, path in present:
        assert path is not None
        data = _read_json(path)
        instruction = _ni_definition(data, path)
        kept: list[Record] = []
        for i, inst in enumerate(data["Instances"]):
            total += 1
            rec = _ni_record(inst, instruction, task)
            if isinstance(rec, str):
                bad.add(f"{path.name} instance {i}", rec)
            elif len(rec.input) > max_input_chars:
                too_long += 1
            else:
                kept.append(rec)
        size = ni_sample_size(len(kept), frac, min_instances, train)
        if size == 0:
            small.append(f"{task} ({len(kept)})")
            continue
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        chosen = np.sort(rng.choice(len(kept), size=size, replace=False))
        out.extend(kept[int(i)] for i in chosen)
    bad.report(total)
    if too_long:
        logger.warning("%s (%s): dropped %d of %d instances whose input is longer than "
                       "max_input_chars=%d", base, split, too_long, total, max_input_chars)
    if small:
        logger.warning("%s (%s): skipped %d tasks with fewer than %d instances left: %s",
                       base, split, len(small), min_instances, ", ".join(small[:10])
                       + (", ..." if len(small) > 10 else ""))
    if not out:
        raise DataError(f"{base} ({split}): no instances left after filtering and sampling")
    logger.info("%s (%s): %d records from %d tasks (fraction %.3g, seed %d)", base, split,
                len(out), len(present) - len(small), frac, seed)
    return out
