"""A tiny random Llama-style model with a tokenizer trained on the run's own texts.

``model.path = "tiny"`` lets every fedtune pipeline (and every test) run offline in seconds: a
byte-level BPE tokenizer is trained on the run's texts with ``tokenizers`` and a randomly
initialised :class:`~transformers.LlamaForCausalLM` is sized to it. Both are written with
``save_pretrained`` so the directory loads with ``AutoTokenizer`` / ``AutoModelForCausalLM``
exactly like any downloaded checkpoint, and the rest of fedtune has a single loading path.

Tokenizer conventions: special tokens ``<pad>`` (id 0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3);
pad/bos/eos/unk are all set. There is *no* post-processor: encoding adds neither BOS nor EOS
(fedtune appends EOS to responses itself, and without BOS the prompt and response token ids
concatenate exactly). Byte-level BPE covers every byte, so nothing is ever ``<unk>``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

TEST_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Federated learning trains one model on data that stays with its owners.",
    "Below is an instruction that describes a task. Write a response.",
    "### Instruction:\nName three colours.\n\n### Response:\nRed, green and blue.",
    "Zeroth-order optimisation estimates gradients from two forward passes.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026.",
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``, wrapped as a transformers tokenizer.

    Deterministic: the same texts (in the same order) give the same vocabulary and merges. The
    vocabulary may come out smaller than ``vocab_size`` when the texts are too short to learn that
    many merges; size the model with ``len(tokenizer)``.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD
    )


def tiny_llama_config(
    vocab_size: int, *, hidden_size: int, num_layers: int, num_heads: int, max_positions: int,
    pad_token_id: int, bos_token_id: int, eos_token_id: int, tie_embeddings: bool = False,
) -> LlamaConfig:
    """The Llama config of the tiny model: full multi-head attention and an MLP ratio of 4;
    ``tie_embeddings`` shares the input embedding with the output head."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_embeddings,
    )


def build_tiny_model(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on ``texts``, build a random tiny Llama and save both to ``out_dir``.

    The weights depend only on the texts (through the vocabulary size) and ``seed``: they are
    drawn inside ``torch.random.fork_rng()`` so the caller's global RNG state is left untouched.
    Returns ``out_dir``, loadable as is with ``AutoTokenizer``/``AutoModelForCausalLM``.
    """
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.model_max_length = max_positions
    config = tiny_llama_config(
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_positions=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # written beside ``out`` and renamed: a crash mid-way never leaves a model without its
    # tokenizer where a later run (or a resume) would take it for a complete one
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def tiny_model_for_tests(tmp_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny model directory (vocabulary trained on :data:`TEST_SENTENCES`) under ``tmp_dir``."""
    return build_tiny_model(
        TEST_SENTENCES, Path(tmp_dir) / "tiny-model", vocab_size=384, hidden_size=32,
        num_layers=2, num_heads=4, max_positions=256, seed=seed,
    )
