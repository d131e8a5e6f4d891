"""Tokenisation with the loss on the response only, truncation, and batch collation."""

from __future__ import annotations

import logging
import os
import string
from typing import Any

import pytest
import torch

from fedtune.data import IGNORE_INDEX, Record, collate, format_prompt, tokenize_record
from fedtune.data.prompts import TokenizedExample, prompt_ids, tokenize_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAD, EOS, BOS, UNK = 0, 1, 2, 3


def char_tokenizer(with_specials: bool) -> Any:
    """One token per character; with_specials: the post-processor wraps every encoding in
    BOS ... EOS (the case tokenize_record must not put an EOS inside the prompt for)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if with_specials:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   bos_token="<bos>", unk_token="<unk>")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "bos-eos-postprocessor"])
def tok(request: pytest.FixtureRequest) -> Any:
    return char_tokenizer(request.param)


RECORD = Record(instruction="Say hi.", input="", output="hi")


def char_ids(tok: Any, text: str) -> list[int]:
    return [tok.convert_tokens_to_ids(ch) for ch in text]


def test_prompt_ids_have_bos_but_never_eos(tok: Any) -> None:
    prompt = format_prompt(RECORD)
    ids = prompt_ids(RECORD, tok)
    expected = ([BOS] if tok("x")["input_ids"][0] == BOS else []) + char_ids(tok, prompt)
    assert ids == expected
    assert EOS not in ids


def test_labels_mask_the_prompt_and_end_with_eos(tok: Any) -> None:
    n_prompt = len(prompt_ids(RECORD, tok))
    ex = tokenize_record(RECORD, tok, max_length=1000)
    assert ex is not None
    assert ex.input_ids == prompt_ids(RECORD, tok) + char_ids(tok, "hi") + [EOS]
    assert ex.labels == [IGNORE_INDEX] * n_prompt + char_ids(tok, "hi") + [EOS]
    assert ex.labels.count(IGNORE_INDEX) == n_prompt
    assert ex.labels[-1] == EOS and ex.input_ids[-1] == EOS
    assert ex.input_ids.count(EOS) == 1


def test_truncation_from_the_right(tok: Any) -> None:
    n_prompt = len(prompt_ids(RECORD, tok))
    ex = tokenize_record(RECORD, tok, max_length=n_prompt + 1)  # keeps the 'h' only
    assert ex is not None
    assert len(ex.input_ids) == len(ex.labels) == n_prompt + 1
    assert ex.labels[-1] == char_ids(tok, "h")[0]
    assert ex.labels.count(IGNORE_INDEX) == n_prompt


def test_none_when_no_response_token_survives(tok: Any) -> None:
    n_prompt = len(prompt_ids(RECORD, tok))
    assert tokenize_record(RECORD, tok, max_length=n_prompt) is None
    assert tokenize_record(RECORD, tok, max_length=n_prompt - 5) is None


def test_tokenize_records_counts_and_logs_drops(tok: Any, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    long = Record(instruction="x" * 500, input="", output="y")
    with caplog.at_level(logging.WARNING, logger="fedtune.data.prompts"):
        out = tokenize_records([RECORD, long], tok, max_length=200)
    assert len(out) == 1
    assert "dropped 1 of 2" in caplog.text


def test_collate_pads_right_and_masks() -> None:
    a = TokenizedExample(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    b = TokenizedExample(input_ids=[5, 6, 7, 8, 9], labels=[IGNORE_INDEX] * 3 + [8, 9])
    batch = collate([a, b], pad_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.dtype == torch.long and t.shape == (2, 5)
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD, PAD], [5, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX],
                                        [IGNORE_INDEX] * 3 + [8, 9]]


def test_collate_of_tokenized_records(tok: Any) -> None:
    recs = [RECORD, Record(instruction="Say hi.", input="ctx", output="hello there")]
    exs = tokenize_records(recs, tok, max_length=1000)
    batch = collate(exs, pad_id=tok.pad_token_id)
    lengths = [len(e.input_ids) for e in exs]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    with pytest.raises(ValueError):
        collate([], pad_id=0)
