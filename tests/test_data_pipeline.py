"""build_federated_data: eval split, partition and summary from a DataConfig."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedtune.configbase import ConfigError
from fedtune.data import FAMILIES, DataConfig, all_texts, build_federated_data, format_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_generated_dirichlet_default() -> None:
    cfg = DataConfig(num_clients=6, generated_per_family=20, seed=1)
    data = build_federated_data(cfg)
    assert len(data.clients) == 6
    n = 20 * len(FAMILIES)
    assert len(data.eval) == round(0.1 * n)  # 10% of the suite
    assert sum(len(c) for c in data.clients) == n - round(0.1 * n) == sum(data.summary.sizes)
    assert data.summary.method == "dirichlet" and data.summary.seed == 1
    assert data.summary.params["alpha"] == 0.5
    json.dumps(data.summary.to_dict())
    again = build_federated_data(cfg)
    assert again.clients == data.clients and again.eval == data.eval


def test_heldout_family_and_natural_partition() -> None:
    cfg = DataConfig(num_clients=len(FAMILIES) - 1, generated_per_family=10,
                     heldout_category="addition", partition="natural")
    data = build_federated_data(cfg)
    assert {r.category for r in data.eval} == {"addition"} and len(data.eval) == 10
    held_by = [{r.source_id for r in c} for c in data.clients]
    assert all(len(ids) == 1 for ids in held_by)
    assert set().union(*held_by) == set(FAMILIES) - {"addition"}


def test_iid_and_all_texts() -> None:
    cfg = DataConfig(num_clients=4, generated_per_family=10, partition="iid")
    data = build_federated_data(cfg)
    n = 10 * len(FAMILIES)
    train = n - round(0.1 * n)
    assert sorted(data.summary.sizes) == sorted([train // 4 + (i < train % 4) for i in range(4)])
    texts = all_texts(data)
    assert len(texts) == n
    first = data.clients[0][0]
    assert texts[0] == format_prompt(first) + first.output


def test_dolly_file(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}",
             "category": ["open_qa", "summarization", "brainstorming"][i % 3]} for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(format="dolly", path=str(path), heldout_category="summarization",
                     num_clients=3, alpha=1.0)
    data = build_federated_data(cfg)
    assert len(data.eval) == 10 and sum(data.summary.sizes) == 20
    assert data.summary.categories == ["brainstorming", "open_qa"]


def test_invalid_config_is_rejected_first() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        build_federated_data(DataConfig(format="dolly"))


def test_real_ni_pipeline() -> None:
    root = SHARED / "natural-instructions"
    if not root.exists():
        pytest.skip(f"{root} not present")
    cfg = DataConfig(format="natural-instructions", path=str(root), partition="natural",
                     num_clients=10)
    data = build_federated_data(cfg)
    assert len(data.clients) == 10
    assert all(len({r.source_id for r in c}) == 1 for c in data.clients)
    assert len(data.eval) == 83  # the 3 test tasks present: 20 + 20 + 43
