"""The corpus side of ``fedtune pretrain``: documents in, held-out split, one token stream.

Steps 1, 2 and 4 of :mod:`fedtune.models.pretrain`: ``.jsonl`` / ``.jsonl.gz`` files with a text
field (one document per line) and ``.txt`` files (one document per file), whole documents held
out for validation (by name, or a seeded random choice of a count), every document tokenised into
one stream with an EOS token between documents, and the fixed validation block starts.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from fedtune.configbase import ConfigError

NAME_FIELDS = ("file", "id", "name", "title")


@dataclass
class Document:
    name: str
    text: str


# ----------------------------------------------------------------------------------------------
# 1. Corpus


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file()
                 and (p.name.endswith((".jsonl", ".jsonl.gz", ".txt")))]
        if files:
            return files
        raise FileNotFoundError(f"no .jsonl, .jsonl.gz or .txt files under {path}")
    raise FileNotFoundError(f"corpus {path} does not exist")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: no string field {text_field!r}")
            name = next((str(obj[k]) for k in NAME_FIELDS if obj.get(k)), f"{path.name}:{lineno}")
            yield Document(name, text)


def load_corpus(corpus: str | Path, text_field: str = "text") -> list[Document]:
    """Every non-empty document of the corpus, in file order; names must be unique."""
    root = Path(corpus)
    docs: list[Document] = []
    for file in _corpus_files(root):
        if file.name.endswith((".jsonl", ".jsonl.gz")):
            docs.extend(_jsonl_documents(file, text_field))
        else:
            name = str(file.relative_to(root)) if root.is_dir() else file.name
            docs.append(Document(name, file.read_text(encoding="utf-8")))
    docs = [d for d in docs if d.text.strip()]
    seen: set[str] = set()
    for d in docs:
        if d.name in seen:
            raise ValueError(f"document name {d.name!r} occurs twice in {corpus}")
        seen.add(d.name)
    if len(docs) < 2:
        raise ValueError(f"corpus {corpus} has {len(docs)} document(s); need at least 2 "
                         "(some are held out for validation)")
    return docs


# ----------------------------------------------------------------------------------------------
# 2. Held-out documents


def split_documents(
    docs: list[Document], names: list[str], count: int, seed: int
) -> tuple[list[Document], list[Document]]:
    """``(train, val)``: the documents named, or else ``count`` drawn by ``seed``; order kept."""
    all_names = [d.name for d in docs]
    if names:
        missing = [n for n in names if n not in all_names]
        if missing:
            raise ConfigError("val_docs", missing, f"not in the corpus; e.g. {all_names[:5]}")
        held = set(names)
    else:
        if count >= len(docs):
            raise ConfigError("val_count", count, f"must be < the {len(docs)} documents")
        held = set(random.Random(seed).sample(all_names, count))
    return [d for d in docs if d.name not in held], [d for d in docs if d.name in held]


# ----------------------------------------------------------------------------------------------
# 3-4. Tokenizer and token stream


def token_stream(tokenizer: PreTrainedTokenizerBase, docs: list[Document]) -> np.ndarray:
    """All documents as one token stream, EOS after each document (uint16 when it fits)."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer  # type: ignore[attr-defined]
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.int32
    parts: list[np.ndarray] = []
    for i in range(0, len(docs), 8):
        for enc in backend.encode_batch([d.text for d in docs[i:i + 8]],
                                        add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def val_block_starts(n_tokens: int, block_size: int, n_blocks: int) -> list[int]:
    """Fixed, evenly spaced starts of up to ``n_blocks`` held-out blocks of ``block_size + 1``."""
    span = n_tokens - (block_size + 1)
    if span < 0:
        raise ValueError(f"the held-out documents have {n_tokens} tokens, fewer than one block "
                         f"of {block_size + 1}: hold out more or lower block_size")
    n = min(n_blocks, span // (block_size + 1) + 1)
    return [round(i * span / max(1, n - 1)) if n > 1 else 0 for i in range(n)]
