"""From a :class:`DataConfig` to the federation's data: client partitions and an eval set.

Steps, each logged: load the records of ``cfg.format``; split off the eval set (a held-out
category if ``heldout_category`` is set, every category of ``heldout_categories`` if that is
non-empty (both may be used together), else Natural Instructions' test tasks for that format,
else a random ``eval_fraction``); partition the rest over ``num_clients`` by ``cfg.partition``.
Every random step is seeded by ``cfg.seed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedtune.data.config import DataConfig
from fedtune.data.generated import generate_suite
from fedtune.data.loaders import (
    DataError,
    load_alpaca,
    load_chat,
    load_dolly,
    load_hub,
    load_jsonl,
)
from fedtune.data.natural_instructions import load_natural_instructions
from fedtune.data.partition import (
    PartitionSummary,
    partition_by_id,
    partition_dirichlet,
    partition_iid,
    random_holdout,
    split_heldout,
    summarize,
)
from fedtune.data.prompts import record_text
from fedtune.data.records import Record

logger = logging.getLogger(__name__)


@dataclass
class FederatedData:
    """Training records per client, the (server-side) eval records, and who holds what."""

    clients: list[list[Record]]
    eval: list[Record]
    summary: PartitionSummary


def _load_ni(cfg: DataConfig, split: str) -> list[Record]:
    fraction = cfg.ni_train_fraction if split == "train" else cfg.ni_eval_fraction
    return load_natural_instructions(
        cfg.path, split=split, fraction=fraction, min_instances=cfg.ni_min_instances,
        max_input_chars=cfg.ni_max_input_chars, seed=cfg.seed, on_bad=cfg.on_bad,
    )


def _check_path(cfg: DataConfig) -> None:
    """A missing data file is named with how a relative path was resolved, before any loading.
    (A 'hub' or 'chat' path that is not on disk may be a hub id: datasets decides.)"""
    if cfg.format in ("generated", "hub", "chat") or Path(cfg.path).exists():
        return
    raise DataError(f"data.path = {cfg.path!r}: no such file or folder (a relative data.path "
                    "resolves against data.root, else the config file's folder; set data.root, "
                    "e.g. --set data.root=DIR, or give an absolute path)")


def load_records(cfg: DataConfig) -> list[Record]:
    """All records of ``cfg.format`` (for Natural Instructions: the sampled train tasks)."""
    _check_path(cfg)
    if cfg.format == "generated":
        return generate_suite(cfg.generated_per_family, cfg.seed,
                              cfg.generated_families or None)
    if cfg.format == "dolly":
        return load_dolly(cfg.path, cfg.on_bad)
    if cfg.format == "alpaca":
        return load_alpaca(cfg.path, cfg.on_bad)
    if cfg.format == "jsonl":
        return load_jsonl(cfg.path, cfg.fields, cfg.on_bad)
    if cfg.format in ("csv", "parquet"):
        return load_hub(cfg.path, cfg.hub_split, cfg.fields, cfg.on_bad, builder=cfg.format)
    if cfg.format == "chat":
        return load_chat(cfg.path, cfg.fields, cfg.on_bad, split=cfg.hub_split)
    if cfg.format == "hub":
        return load_hub(cfg.path, cfg.hub_split, cfg.fields, cfg.on_bad)
    if cfg.format == "natural-instructions":
        return _load_ni(cfg, "train")
    raise ValueError(f"unknown data.format {cfg.format!r}")


def heldout_categories(cfg: DataConfig) -> list[str]:
    """The categories held out whole: ``heldout_category`` and then ``heldout_categories``."""
    names = [cfg.heldout_category] if cfg.heldout_category else []
    return names + [c for c in cfg.heldout_categories if c not in names]


def split_eval(cfg: DataConfig, records: list[Record]) -> tuple[list[Record], list[Record]]:
    """``(train, eval)`` by the config's eval rule (see the module docstring)."""
    categories = heldout_categories(cfg)
    if len(categories) == 1:
        train, held = split_heldout(records, categories[0])
        logger.info("eval set: category %r held out whole (%d records; %d left to train on)",
                    categories[0], len(held), len(train))
        return train, held
    if categories:
        present = {r.category for r in records}
        missing = [c for c in categories if c not in present]
        if missing:
            raise DataError(f"held-out categories {missing} do not occur; categories present: "
                            f"{sorted(present)}")
        chosen = set(categories)
        train = [r for r in records if r.category not in chosen]
        held = [r for r in records if r.category in chosen]
        if not train:
            raise DataError(f"held-out categories {categories} are all the categories: nothing "
                            "to train on")
        logger.info("eval set: categories %s held out whole (%d records; %d left to train on)",
                    categories, len(held), len(train))
        return train, held
    if cfg.format == "natural-instructions":
        held = _load_ni(cfg, "test")
        logger.info("eval set: Natural Instructions test tasks, %d records", len(held))
        return records, held
    train, held = random_holdout(records, cfg.eval_fraction, cfg.seed)
    logger.info("eval set: random %.3g of the records (%d; seed %d), %d left to train on",
                cfg.eval_fraction, len(held), cfg.seed, len(train))
    return train, held


def partition(cfg: DataConfig, records: list[Record]) -> list[list[Record]]:
    """The training records split over ``cfg.num_clients`` clients by ``cfg.partition``."""
    if cfg.partition == "iid":
        return partition_iid(records, cfg.num_clients, cfg.seed)
    if cfg.partition == "dirichlet":
        return partition_dirichlet(records, cfg.num_clients, cfg.alpha, cfg.seed,
                                   min_size=cfg.min_client_size, balance=cfg.dirichlet_balance)
    if cfg.partition == "natural":
        return partition_by_id(records, cfg.num_clients, cfg.seed)
    raise ValueError(f"unknown data.partition {cfg.partition!r}")


def build_federated_data(cfg: DataConfig) -> FederatedData:
    """Load, split off the eval set, partition; the summary records the method, seed and sizes."""
    cfg.validate()
    records = load_records(cfg)
    logger.info("data: %d records from format %r%s", len(records), cfg.format,
                f" ({cfg.path})" if cfg.path else "")
    train, held = split_eval(cfg, records)
    clients = partition(cfg, train)
    summary = summarize(clients)
    summary.method = cfg.partition
    summary.seed = cfg.seed
    if cfg.partition == "dirichlet":
        summary.params = {"alpha": cfg.alpha, "min_size": cfg.min_client_size,
                          "balance": cfg.dirichlet_balance}
    sizes = summary.sizes
    logger.info("partition %r (seed %d): %d clients, sizes min %d / mean %.1f / max %d",
                cfg.partition, cfg.seed, len(clients), min(sizes), sum(sizes) / len(sizes),
                max(sizes))
    return FederatedData(clients=clients, eval=held, summary=summary)


def all_texts(data: FederatedData) -> list[str]:
    """The Alpaca text of every record (prompt and answers), clients' then eval's (to train a
    tiny tokenizer)."""
    return [record_text(r) for c in data.clients for r in c] + [
        record_text(r) for r in data.eval
    ]
