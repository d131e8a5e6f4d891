"""Hold-outs, IID / Dirichlet / by-id partitions and their summary, with hand-computable cases."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest

from fedtune.data import (
    DataError,
    Record,
    partition_by_id,
    partition_dirichlet,
    partition_iid,
    random_holdout,
    split_heldout,
    summarize,
)


def make(counts: dict[str, int]) -> list[Record]:
    """Records with unique inputs, ``counts[c]`` of category c, source_id = category."""
    return [Record(instruction="do", input=f"{c}-{i}", output="x", category=c, source_id=c)
            for c, n in counts.items() for i in range(n)]


def keys(clients: list[list[Record]]) -> list[list[str]]:
    return [[r.input for r in c] for c in clients]


RECS = make({"a": 30, "b": 20, "c": 10})


# --- hold-outs -------------------------------------------------------------------------------


def test_split_heldout() -> None:
    train, held = split_heldout(RECS, "b")
    assert len(train) == 40 and len(held) == 20
    assert {r.category for r in held} == {"b"} and "b" not in {r.category for r in train}
    with pytest.raises(DataError, match=r"'zzz'.*\['a', 'b', 'c'\]"):
        split_heldout(RECS, "zzz")


def test_random_holdout() -> None:
    recs = make({"a": 10})
    train, held = random_holdout(recs, 0.3, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert sorted(r.input for r in train + held) == sorted(r.input for r in recs)
    assert random_holdout(recs, 0.3, seed=0) == (train, held)
    # order is kept within each side
    assert [r.input for r in train] == [r.input for r in recs if r in train]


# --- iid ---------------------------------------------------------------------------------------


def test_iid_sizes_and_coverage() -> None:
    recs = make({"a": 10})
    clients = partition_iid(recs, 3, seed=1)
    assert sorted(len(c) for c in clients) == [3, 3, 4]
    assert sorted(sum(keys(clients), [])) == sorted(r.input for r in recs)
    assert keys(partition_iid(recs, 3, seed=1)) == keys(clients)
    with pytest.raises(DataError):
        partition_iid(recs, 11, seed=1)


# --- dirichlet ---------------------------------------------------------------------------------


def test_dirichlet_seeded() -> None:
    a = partition_dirichlet(RECS, 4, alpha=0.5, seed=7)
    assert keys(partition_dirichlet(RECS, 4, alpha=0.5, seed=7)) == keys(a)
    assert keys(partition_dirichlet(RECS, 4, alpha=0.5, seed=8)) != keys(a)


@pytest.mark.parametrize("balance", [True, False])
def test_dirichlet_covers_every_record_once_and_respects_min_size(balance: bool) -> None:
    clients = partition_dirichlet(RECS, 5, alpha=0.3, seed=3, min_size=4, balance=balance)
    assert sum(len(c) for c in clients) == len(RECS)
    assert sorted(sum(keys(clients), [])) == sorted(r.input for r in RECS)
    assert min(len(c) for c in clients) >= 4


def test_dirichlet_large_alpha_approaches_global_shares() -> None:
    recs = make({"a": 600, "b": 400, "c": 200})
    clients = partition_dirichlet(recs, 4, alpha=1e5, seed=0)
    for c in clients:
        shares = Counter(r.category for r in c)
        for cat, n in {"a": 600, "b": 400, "c": 200}.items():
            assert shares[cat] / len(c) == pytest.approx(n / 1200, abs=0.02)


def test_dirichlet_hand_checked_one_category_two_clients() -> None:
    # The draws, in order: permutation of the category's records, then q ~ Dir(alpha, alpha);
    # client 0 gets the first floor(10 * q0) permuted records, client 1 the rest.
    recs = make({"only": 10})
    rng = np.random.default_rng(5)
    perm = rng.permutation(10)
    q = rng.dirichlet([1.0, 1.0])
    cut = int(np.floor(10 * q[0]))
    assert 1 <= cut <= 9  # this seed needs no re-draw for min_size=1
    clients = partition_dirichlet(recs, 2, alpha=1.0, seed=5)
    assert [len(c) for c in clients] == [cut, 10 - cut]
    assert {r.input for r in clients[0]} == {recs[int(i)].input for i in perm[:cut]}


def test_dirichlet_impossible_raises() -> None:
    recs = make({"a": 3})
    with pytest.raises(DataError, match="raise alpha or lower num_clients"):
        partition_dirichlet(recs, 3, alpha=0.001, seed=0)
    with pytest.raises(DataError, match="lower num_clients"):
        partition_dirichlet(recs, 2, alpha=1.0, seed=0, min_size=2)


# --- by id -------------------------------------------------------------------------------------


def test_by_id_one_id_per_client() -> None:
    recs = make({"t1": 3, "t2": 4, "t3": 5, "t4": 1, "t5": 2})
    clients = partition_by_id(recs, 5, seed=0)
    assert [{r.source_id for r in c} for c in clients] == [{"t1"}, {"t2"}, {"t3"}, {"t4"}, {"t5"}]
    assert [len(c) for c in clients] == [3, 4, 5, 1, 2]


def test_by_id_samples_ids_when_fewer_clients(caplog: pytest.LogCaptureFixture) -> None:
    recs = make({"t1": 3, "t2": 4, "t3": 5, "t4": 1, "t5": 2})
    with caplog.at_level(logging.WARNING, logger="fedtune.data.partition"):
        clients = partition_by_id(recs, 3, seed=0)
    ids = [r.source_id for c in clients for r in c]
    assert len(clients) == 3 and len(set(ids)) == 3
    assert all(len({r.source_id for r in c}) == 1 for c in clients)
    assert "sampled 3 of 5 ids" in caplog.text
    assert keys(partition_by_id(recs, 3, seed=0)) == keys(clients)


def test_by_id_errors() -> None:
    recs = make({"t1": 3, "t2": 4})
    with pytest.raises(DataError, match=r"3 clients.*only 2"):
        partition_by_id(recs, 3, seed=0)
    with pytest.raises(DataError, match="no source_id"):
        partition_by_id([Record("i", "", "o", category="c")], 1, seed=0)


# --- summary -----------------------------------------------------------------------------------


def test_summary_counts_and_table() -> None:
    clients = [make({"a": 2, "b": 1}), make({"b": 5}), make({"c": 17})]
    s = summarize(clients)
    assert s.sizes == [3, 5, 17]
    assert s.categories == ["a", "b", "c"]
    assert s.counts == [[2, 1, 0], [0, 5, 0], [0, 0, 17]]
    d = json.loads(json.dumps(s.to_dict()))
    assert d["sizes"] == [3, 5, 17] and d["total"] == 25
    table = s.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["client", "size", "a", "b", "c"]
    assert lines[1].split() == ["0", "3", "2", "1", "0"]
    assert lines[3].split() == ["2", "17", "0", "0", "17"]
    assert lines[-1].split() == ["total", "25", "2", "6", "17"]


def test_summary_table_elides_rows_and_many_categories() -> None:
    clients = [make({f"task{i}": i + 1}) for i in range(30)]
    table = summarize(clients).format_table(max_rows=6)
    lines = table.splitlines()
    assert len(lines) == 1 + 6 + 1 + 1 + 1  # header, rows, '...', total, elided note
    assert "(24 clients elided)" in table
    assert lines[1].split()[:3] == ["0", "1", "1"]  # client 0: 1 record of 1 category
    assert lines[-3].split()[:2] == ["29", "30"]
    assert "task29: 30" in lines[-3]
