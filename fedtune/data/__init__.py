"""Records, loaders, prompt template and tokenisation, partitions and the data pipeline."""

from fedtune.data.config import DataConfig
from fedtune.data.generated import FAMILIES, generate_suite
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
from fedtune.data.pipeline import FederatedData, all_texts, build_federated_data
from fedtune.data.prompts import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    format_prompt,
    prompt_ids,
    tokenize_record,
    tokenize_records,
)
from fedtune.data.records import Record

__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "DataConfig",
    "DataError",
    "FederatedData",
    "PartitionSummary",
    "Record",
    "TokenizedExample",
    "all_texts",
    "build_federated_data",
    "collate",
    "format_prompt",
    "generate_suite",
    "load_alpaca",
    "load_chat",
    "load_dolly",
    "load_hub",
    "load_jsonl",
    "load_natural_instructions",
    "partition_by_id",
    "partition_dirichlet",
    "partition_iid",
    "prompt_ids",
    "random_holdout",
    "split_heldout",
    "summarize",
    "tokenize_record",
    "tokenize_records",
]
