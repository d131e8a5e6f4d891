"""Config of the data concern: where the records come from, how they split over clients."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, check_choices, option
from fedtune.data.generated import FAMILIES
from fedtune.data.loaders import CHAT_FIELDS

TEMPLATES = ("auto", "alpaca", "chat")
FORMATS = ("generated", "dolly", "natural-instructions", "alpaca", "jsonl", "csv", "parquet",
           "chat", "hub")
PARTITIONS = ("iid", "dirichlet", "natural")
ON_BAD = ("skip", "error")
MAPPED_FORMATS = ("jsonl", "csv", "parquet", "hub")  # the formats whose field map is required


@dataclass
class DataConfig:
    format: str = option(
        "generated",
        "Record source: 'generated' (fedtune's own suite, no files needed), 'dolly' (Dolly-15k "
        "JSONL), 'natural-instructions' (task JSON files + split files), 'alpaca' (Alpaca-style "
        "JSON list), 'jsonl', 'csv' or 'parquet' (any such file, columns named by data.fields), "
        "'chat' (records {messages = [{role, content}, ...]} with roles system, user and "
        "assistant, in JSONL, a JSON list or Parquet; the loss is on every assistant turn) or "
        "'hub' (anything datasets.load_dataset reads: a hub id, a dataset folder or a local "
        ".json/.jsonl/.csv/.parquet file, columns named by data.fields).",
        FORMATS,
    )
    path: str = option(
        "",
        "File or directory of the records (for natural-instructions: the folder holding "
        "'tasks_full/' or 'tasks/' and 'splits/default/'; for hub: a hub id or local path). "
        "A relative path resolves against data.root, else the config file's folder (the "
        "current folder for a path given by --set or with no config file).",
    )
    root: str = option(
        "",
        "Folder that a relative data.path (and algorithm.fedpt.distill_path) resolves against; "
        "empty: the config file's folder. Itself relative: to the config file's folder, or to "
        "the current folder when given by --set (e.g. --set data.root=../shared/data).",
    )
    fields: dict = option(
        {},
        "For 'jsonl', 'csv', 'parquet' and 'hub': map of record field -> source key, e.g. "
        "{instruction = 'question', output = 'answer', input = 'context', category = 'topic'} "
        "(instruction and output required). For 'chat', optional: messages, category and "
        "source_id (e.g. {messages = 'conversation'}).",
    )
    hub_split: str = option("train", "For 'hub' (and 'chat' read by datasets): the split.")
    on_bad: str = option(
        "skip",
        "A bad record (a missing key, empty text, a malformed conversation): 'skip' it (one "
        "warning per file with the count and the first, by file and line) or 'error' (stop at "
        "the first, naming its file and line). A file with no good record is always an error.",
        ON_BAD,
    )
    generated_per_family: int = option(
        100, "For 'generated': examples generated per task family."
    )
    generated_families: list = option(
        [], "For 'generated': the task families to generate (names from "
            "fedtune.data.generated.FAMILIES, e.g. [\"uppercase\", \"month_name\"]); empty = "
            "all 24. Each family's examples do not depend on which others are chosen.")
    heldout_category: str = option(
        "",
        "Category held out whole for evaluation (the FedKSeed Dolly protocol holds out "
        "'summarization'). Empty (and no heldout_categories): hold out a random eval_fraction "
        "instead.",
    )
    heldout_categories: list = option(
        [],
        "Categories held out whole for evaluation, several at once (e.g. the generated suite's "
        "fedtune.data.generated.HELDOUT_FAMILIES); combines with heldout_category. Empty and no "
        "heldout_category: hold out a random eval_fraction instead.",
    )
    eval_fraction: float = option(
        0.1, "Share of records held out at random for evaluation when no category is held out."
    )
    partition: str = option(
        "dirichlet",
        "How training records are split over clients: 'iid', 'dirichlet' (Dirichlet(alpha) over "
        "the category column) or 'natural' (one natural id, e.g. one NI task, per client).",
        PARTITIONS,
    )
    num_clients: int = option(20, "Number of clients the training records are split over.")
    alpha: float = option(0.5, "Dirichlet concentration; smaller is more heterogeneous.")
    dirichlet_balance: bool = option(
        True,
        "Dirichlet: as in the FedIT/FedKSeed reference, a client already holding >= n/num_clients "
        "records gets no share of the categories drawn after that (keeps sizes near the mean).",
    )
    min_client_size: int = option(
        1, "Dirichlet draws are repeated (seeded) until every client holds at least this many."
    )
    ni_train_fraction: float = option(
        0.2, "Natural Instructions: share of each train task's instances used (paper: 20%)."
    )
    ni_min_instances: int = option(
        20,
        "Natural Instructions: train tasks with fewer instances (after the length filter) are "
        "skipped; each test task is sampled to at least this many (or kept whole).",
    )
    ni_eval_fraction: float = option(
        0.02, "Natural Instructions: share of each test task's instances evaluated (at least 20)."
    )
    ni_max_input_chars: int = option(
        4096, "Natural Instructions: instances whose input is longer are dropped (and counted)."
    )
    max_length: int = option(
        256,
        "Tokens per training example (prompt + response). A longer one keeps its answer: the "
        "prompt loses tokens from its middle, down to half of max_length, before the answer is "
        "cut. Evaluation prompts keep max(max_length - max_new_tokens, max_length // 2) tokens.",
    )
    template: str = option(
        "auto",
        "Prompt template: 'chat' (the tokenizer's chat template, one user turn, the loss on the "
        "assistant's answer and its end-of-turn token, generation stops there), 'alpaca' (the "
        "Alpaca template of FedKSeed's reference) or 'auto' (chat when the tokenizer has a chat "
        "template, e.g. smollm2-135m; alpaca otherwise, e.g. fedtune's own base models).",
        TEMPLATES,
    )
    seed: int = option(42, "Seed of the partition and of every data sampling step.")

    def validate(self, prefix: str = "data") -> None:
        check_choices(self, prefix)
        check(self.num_clients >= 1, f"{prefix}.num_clients", self.num_clients, "must be >= 1")
        check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be > 0")
        check(0 < self.eval_fraction < 1, f"{prefix}.eval_fraction", self.eval_fraction,
              "must be in (0, 1)")
        check(self.max_length >= 8, f"{prefix}.max_length", self.max_length, "must be >= 8")
        check(self.min_client_size >= 1, f"{prefix}.min_client_size", self.min_client_size,
              "must be >= 1")
        check(self.generated_per_family >= 1, f"{prefix}.generated_per_family",
              self.generated_per_family, "must be >= 1")
        check(isinstance(self.generated_families, list)
              and all(f in FAMILIES for f in self.generated_families)
              and len(set(self.generated_families)) == len(self.generated_families),
              f"{prefix}.generated_families", self.generated_families,
              f"must list distinct family names of {list(FAMILIES)}")
        for frac_key in ("ni_train_fraction", "ni_eval_fraction"):
            v = getattr(self, frac_key)
            check(0 < v <= 1, f"{prefix}.{frac_key}", v, "must be in (0, 1]")
        check(isinstance(self.heldout_categories, list)
              and all(isinstance(c, str) and c for c in self.heldout_categories),
              f"{prefix}.heldout_categories", self.heldout_categories,
              "must be a list of non-empty category names")
        check(len(set(self.heldout_categories)) == len(self.heldout_categories),
              f"{prefix}.heldout_categories", self.heldout_categories,
              "names a category twice")
        check(self.format == "generated" or bool(self.path), f"{prefix}.path", self.path,
              f"is required when data.format = {self.format!r}")
        if self.format in MAPPED_FORMATS:
            for required in ("instruction", "output"):
                check(required in self.fields, f"{prefix}.fields", self.fields,
                      f"must map '{required}' to a source key for format {self.format!r}")
        allowed = (set(CHAT_FIELDS) if self.format == "chat" else
                   {"instruction", "input", "output", "category", "source_id"})
        for k in self.fields:
            check(k in allowed, f"{prefix}.fields.{k}", self.fields[k],
                  f"unknown field for format {self.format!r}; expected one of {sorted(allowed)}")
            check(isinstance(self.fields[k], str) and bool(self.fields[k]),
                  f"{prefix}.fields.{k}", self.fields[k], "must be a source key (a string)")
