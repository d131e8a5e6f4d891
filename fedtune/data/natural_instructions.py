"""Natural Instructions task folders, sampled as FedKSeed samples them.

A folder holds ``splits/default/<split>_tasks.txt`` and one JSON file per task under
``tasks_full/`` or ``tasks/`` (optionally gzipped); each instance becomes a
:class:`~fedtune.data.records.Record` whose category and source id are the task name. Errors and
bad instances are handled as in :mod:`fedtune.data.loaders`.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.data.loaders import BadRecords, DataError, open_text, read_json
from fedtune.data.records import Record

logger = logging.getLogger(__name__)


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
    with open_text(split_file) as f:
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

    bad = BadRecords(f"{base} ({split})", on_bad)
    total = too_long = 0
    small: list[str] = []
    out: list[Record] = []
    for task, path in present:
        assert path is not None
        data = read_json(path)
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
