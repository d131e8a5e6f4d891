"""Evaluation hold-outs and federated partitions of records over clients, all seeded.

Every function takes an explicit ``seed`` and draws from ``numpy.random.default_rng(seed)``; the
same records and seed give the same split on every machine. Partitions never drop a training
record, except :func:`partition_by_id` when asked for fewer clients than there are ids (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.data.loaders import DataError
from fedtune.data.records import Record

logger = logging.getLogger(__name__)

MAX_DIRICHLET_TRIES = 1000


# ----------------------------------------------------------------------------------------------
# Evaluation hold-outs


def split_heldout(records: Sequence[Record], category: str) -> tuple[list[Record], list[Record]]:
    """``(train, heldout)``: every record of ``category`` held out whole (FedKSeed's Dolly protocol
    holds out 'summarization'), order kept."""
    present = sorted({r.category for r in records})
    if category not in present:
        raise DataError(f"held-out category {category!r} does not occur; categories present: "
                        f"{present}")
    train = [r for r in records if r.category != category]
    heldout = [r for r in records if r.category == category]
    if not train:
        raise DataError(f"held-out category {category!r} is the only category: nothing to train on")
    return train, heldout


def random_holdout(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """``(train, eval)``: ``round(fraction * n)`` records (at least 1, at most ``n - 1``) drawn
    without replacement for evaluation; both lists keep the input order."""
    n = len(records)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise DataError(f"cannot hold out a share of {n} record(s): need at least 2")
    n_eval = min(n - 1, max(1, round(fraction * n)))
    rng = np.random.default_rng(seed)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[rng.choice(n, size=n_eval, replace=False)] = True
    train = [r for r, e in zip(records, is_eval, strict=True) if not e]
    held = [r for r, e in zip(records, is_eval, strict=True) if e]
    return train, held


# ----------------------------------------------------------------------------------------------
# Partitions


def partition_iid(records: Sequence[Record], num_clients: int, seed: int) -> list[list[Record]]:
    """Shuffle, then split into ``num_clients`` near-equal parts: the first ``n mod k`` clients
    hold ``floor(n / k) + 1`` records, the others ``floor(n / k)``."""
    _check_clients(records, num_clients)
    order = np.random.default_rng(seed).permutation(len(records))
    return [[records[int(i)] for i in part] for part in np.array_split(order, num_clients)]


def _check_clients(records: Sequence[Record], num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if len(records) < num_clients:
        raise DataError(f"cannot split {len(records)} records over {num_clients} clients: "
                        "lower num_clients")


def dirichlet_cuts(proportions: np.ndarray, n: int) -> np.ndarray:
    """Cut points of ``n`` records by cumulative proportions: ``floor(cumsum(q) * n)[:-1]``, so
    client j receives the records in ``[cut_{j-1}, cut_j)``."""
    return (np.cumsum(proportions) * n).astype(int)[:-1]


def partition_dirichlet(
    records: Sequence[Record],
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    balance: bool = True,
) -> list[list[Record]]:
    """Label-skewed split over the ``category`` column (FedIT/FedKSeed ``partition_idx_labeldir``).

    For each category c (sorted by name) with ``n_c`` records: permute them, draw
    ``q ~ Dir(alpha * 1_N)`` over the N clients and give client j the records between
    ``floor(n_c * sum_{i<j} q_i)`` and ``floor(n_c * sum_{i<=j} q_i)``. With ``balance`` (as in the
    reference) a client already holding ``>= n / N`` records gets ``q_j = 0`` and q is
    renormalised, so no client grows far past the mean. The whole draw repeats (same generator,
    so still seeded) until every client holds ``>= min_size`` records; each client's records are
    then shuffled. Smaller alpha: more skew.
    """
    _check_clients(records, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(records):
        raise DataError(f"cannot give each of {num_clients} clients >= {min_size} records out of "
                        f"{len(records)}: lower num_clients or min_size")
    rng = np.random.default_rng(seed)
    categories = sorted({r.category for r in records})
    by_cat = {c: [i for i, r in enumerate(records) if r.category == c] for c in categories}
    n, cap = len(records), len(records) / num_clients
    for attempt in range(1, MAX_DIRICHLET_TRIES + 1):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in categories:
            idx = np.asarray(by_cat[c])[rng.permutation(len(by_cat[c]))]
            q = rng.dirichlet(np.full(num_clients, alpha))
            if balance:
                open_ = np.array([len(p) < cap for p in parts])
                if not open_.all():
                    q = q * open_
                    # a tiny alpha can underflow every open share to 0: split those evenly
                    q = q / q.sum() if q.sum() > 0 else open_ / open_.sum()
            for j, chunk in enumerate(np.split(idx, dirichlet_cuts(q, len(idx)))):
                parts[j].extend(int(i) for i in chunk)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            if attempt > 1:
                logger.info("dirichlet partition: %d draws until every client held >= %d records",
                            attempt, min_size)
            return [[records[parts[j][int(i)]] for i in rng.permutation(len(parts[j]))]
                    for j in range(num_clients)]
    raise DataError(
        f"dirichlet partition: after {MAX_DIRICHLET_TRIES} draws some client still held fewer "
        f"than {min_size} records ({n} records, {len(categories)} categories, {num_clients} "
        f"clients, alpha={alpha}): too many clients for too few records; raise alpha or lower "
        "num_clients (or min_size)"
    )


def partition_by_id(
    records: Sequence[Record], num_clients: int, seed: int
) -> list[list[Record]]:
    """One ``source_id`` per client (FedKSeed NI: one task per client), ids in sorted order.

    With fewer clients than ids, ``num_clients`` ids are sampled without replacement (seeded) and
    the other ids' records are left out (logged); with more clients than ids, an error.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    unnamed = sum(1 for r in records if not r.source_id)
    if unnamed:
        raise DataError(f"partition by id: {unnamed} of {len(records)} records have no source_id "
                        "(this data source has no natural id); use 'iid' or 'dirichlet'")
    ids = sorted({r.source_id for r in records})
    if num_clients > len(ids):
        raise DataError(f"partition by id: {num_clients} clients asked for but the records have "
                        f"only {len(ids)} distinct source ids; lower num_clients to {len(ids)}")
    if num_clients < len(ids):
        rng = np.random.default_rng(seed)
        keep = sorted(ids[int(i)] for i in rng.choice(len(ids), size=num_clients, replace=False))
        kept = set(keep)
        left_out = sum(1 for r in records if r.source_id not in kept)
        logger.warning("partition by id: sampled %d of %d ids (seed %d); %d records of the other "
                       "ids are left out", num_clients, len(ids), seed, left_out)
        ids = keep
    groups: dict[str, list[Record]] = {i: [] for i in ids}
    for r in records:
        if r.source_id in groups:
            groups[r.source_id].append(r)
    return [groups[i] for i in ids]


# ----------------------------------------------------------------------------------------------
# Summary


@dataclass
class PartitionSummary:
    """Who holds what: ``counts[i][j]`` records of ``categories[j]`` on client i."""

    sizes: list[int]
    categories: list[str]
    counts: list[list[int]]
    method: str = ""
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (plain lists, ints and strings)."""
        return {
            "method": self.method,
            "seed": self.seed,
            "params": dict(self.params),
            "num_clients": len(self.sizes),
            "total": sum(self.sizes),
            "sizes": list(self.sizes),
            "categories": list(self.categories),
            "counts": [list(row) for row in self.counts],
        }

    def format_table(self, max_rows: int = 20, max_cols: int = 12) -> str:
        """A text table: client, size, count per category, and a total row.

        Beyond ``max_rows`` clients the middle rows are elided. Beyond ``max_cols`` categories
        (e.g. one Natural Instructions task per client) a per-category column would be unreadable,
        so each row gives the number of categories the client holds and its largest one instead.
        """
        wide = len(self.categories) > max_cols
        if wide:
            header = ["client", "size", "categories", "largest category"]
        else:
            header = ["client", "size"] + [c or "(none)" for c in self.categories]

        def cells(label: str, size: int, row: list[int]) -> list[str]:
            if not wide:
                return [label, str(size)] + [str(v) for v in row]
            held = sum(1 for v in row if v)
            top = max(range(len(row)), key=lambda j: row[j]) if held else -1
            largest = f"{self.categories[top] or '(none)'}: {row[top]}" if held else "-"
            return [label, str(size), str(held), largest]

        rows = enumerate(zip(self.sizes, self.counts, strict=True))
        body = [cells(str(i), size, row) for i, (size, row) in rows]
        elided = 0
        if len(body) > max_rows:
            head = max(1, max_rows // 2)
            tail = max(1, max_rows - head)
            elided = len(body) - head - tail
            body = body[:head] + [["..."] * len(header)] + body[-tail:]
        col_totals = [sum(row[j] for row in self.counts) for j in range(len(self.categories))]
        total = cells("total", sum(self.sizes), col_totals)
        widths = [max(len(r[k]) for r in [header, total] + body) for k in range(len(header))]

        def line(r: list[str]) -> str:
            padded = [c.ljust(w) if wide and k == 3 else c.rjust(w)
                      for k, (c, w) in enumerate(zip(r, widths, strict=True))]
            return "  ".join(padded).rstrip()

        out = [line(header)] + [line(r) for r in body] + [line(total)]
        if elided:
            out.append(f"({elided} clients elided)")
        return "\n".join(out)


def summarize(clients: Sequence[Sequence[Record]]) -> PartitionSummary:
    """Sizes and the clients x categories count matrix of a partition."""
    categories = sorted({r.category for c in clients for r in c})
    col = {c: j for j, c in enumerate(categories)}
    counts = [[0] * len(categories) for _ in clients]
    for i, client in enumerate(clients):
        for r in client:
            counts[i][col[r.category]] += 1
    return PartitionSummary(sizes=[len(c) for c in clients], categories=categories, counts=counts)
