"""Tokenisation with the loss on the response only, truncation, and batch collation."""

from __future__ import annotations

import logging
import os
import string
from typing import Any

import pytest
import torch

from fedtune.data import IGNORE_INDEX, Record, collate, format_prompt, tokenize_record
from fedtune.data.prompts import (
    TokenizedExample,
    end_of_turn_id,
    fit_example,
    middle_cut,
    prompt_ids,
    resolve_template,
    stop_token_ids,
    tokenize_records,
)

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


def test_a_long_answer_is_cut_from_the_right_once_the_prompt_is_down_to_half(tok: Any) -> None:
    full = prompt_ids(RECORD, tok)
    long = Record(instruction=RECORD.instruction, input="", output="abcdefghij" * 20)
    n = len(full) + 5  # the answer alone would fill it
    ex = tokenize_record(long, tok, max_length=n)
    assert len(ex.input_ids) == len(ex.labels) == n
    half = n // 2
    assert ex.labels.count(IGNORE_INDEX) == half
    assert ex.input_ids[:half] == full[:half // 2] + full[len(full) - (half - half // 2):]
    assert ex.labels[half:] == char_ids(tok, ("abcdefghij" * 20)[:n - half])


def test_a_long_prompt_loses_its_middle_and_keeps_the_answer(tok: Any) -> None:
    long = Record(instruction="Say hi.", input="x" * 300 + "END", output="hi")
    full = prompt_ids(long, tok)
    ex = tokenize_record(long, tok, max_length=100)
    answer = char_ids(tok, "hi") + [EOS]
    assert len(ex.input_ids) == 100
    assert ex.labels[-3:] == answer and ex.input_ids[-3:] == answer  # the whole answer
    kept = ex.input_ids[:-3]
    assert kept[:48] == full[:48]  # the head (template, instruction) ...
    assert kept[-49:] == full[-49:]  # ... and the tail (end of input, the response cue) stay
    assert char_ids(tok, "END") == full[-len(char_ids(tok, "END\n\n### Response:\n")):][:3]
    assert ex.labels.count(IGNORE_INDEX) == 97


def test_fit_example_gives_the_answer_at_least_half() -> None:
    prompt, response = list(range(100)), list(range(1000, 1300))
    p, r = fit_example(prompt, response, 64)
    assert len(p) == 32 and len(r) == 32 and r == response[:32]
    assert p == prompt[:16] + prompt[-16:]
    p, r = fit_example(prompt[:10], response, 64)  # a short prompt stays whole
    assert p == prompt[:10] and r == response[:54]
    assert fit_example(prompt[:10], response[:5], 64) == (prompt[:10], response[:5])
    assert middle_cut([1, 2, 3, 4, 5], 3) == [1, 4, 5] and middle_cut([1, 2], 5) == [1, 2]


def test_tokenize_records_keeps_every_record_and_logs_cuts(
        tok: Any, caplog: pytest.LogCaptureFixture) -> None:
    long = Record(instruction="x" * 500, input="", output="y")
    with caplog.at_level(logging.INFO, logger="fedtune.data.prompts"):
        out = tokenize_records([RECORD, long], tok, max_length=200)
    assert len(out) == 2 and len(out[1].input_ids) == 200
    assert out[1].labels[-2:] == char_ids(tok, "y") + [EOS]
    assert "1 of 2 examples reach max_length=200" in caplog.text


# -- chat templates ----------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tok() -> Any:
    """The character tokenizer with ChatML special tokens and template (EOS stays <eos>)."""
    t = char_tokenizer(False)
    t.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    t.chat_template = CHATML
    return t


def test_template_resolution(tok: Any, chat_tok: Any) -> None:
    assert resolve_template(chat_tok, "auto") == "chat"
    assert resolve_template(tok, "auto") == "alpaca"
    assert resolve_template(chat_tok, "alpaca") == "alpaca"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template(tok, "chat")


def test_chat_mask_covers_exactly_the_answer_and_end_of_turn(chat_tok: Any) -> None:
    rec = Record(instruction="Add.", input="2 3", output="5")
    im_end = chat_tok.convert_tokens_to_ids(IM_END)
    assert end_of_turn_id(chat_tok) == im_end != chat_tok.eos_token_id
    ex = tokenize_record(rec, chat_tok, max_length=1000)
    text = "".join(chat_tok.convert_ids_to_tokens(ex.input_ids))
    assert text == "<|im_start|>user\nAdd.\n\n2 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    answer = [lab for lab in ex.labels if lab != IGNORE_INDEX]
    assert answer == char_ids(chat_tok, "5") + [im_end]
    first = ex.labels.index(answer[0])
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:first])
    assert ex.input_ids[first:] == answer  # nothing after the end of turn is trained
    assert stop_token_ids(chat_tok) == [im_end, chat_tok.eos_token_id]


def test_chat_prompt_is_the_rendered_generation_prompt(chat_tok: Any) -> None:
    rec = Record(instruction="Say hi.", input="", output="hi")
    ids = prompt_ids(rec, chat_tok, "chat")
    assert "".join(chat_tok.convert_ids_to_tokens(ids)) == (
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids(rec, chat_tok, "alpaca") == char_ids(chat_tok, format_prompt(rec))


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
