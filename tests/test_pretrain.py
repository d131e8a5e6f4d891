"""fedtune pretrain: a tiny run end to end, exact resume, the model card, and the embedded base
models (offline loading, one shared vocabulary, the large one larger and better)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.configbase import ConfigError
from fedtune.models import pretrain_cli
from fedtune.models.loading import base_model_path, resolve_model_source
from fedtune.models.pretrain import PretrainConfig, learning_rate, pretrain
from fedtune.models.pretrain_data import load_corpus, split_documents, val_block_starts

WORDS = ("the cat sat on the mat . a dog ran in the park . birds sing at dawn . rain falls on "
         "the roof . children play by the river . the sun sets over hills .").split()


def _write_corpus(root: Path) -> Path:
    """Six small documents: four as JSONL lines (one gzipped file), two as .txt files."""
    import gzip
    import random

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(400)) for _ in range(6)]
    corpus = root / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "books.jsonl.gz", "wt") as f:
        for i, text in enumerate(docs[:4]):
            f.write(json.dumps({"file": f"book{i}.txt", "text": text}) + "\n")
    (corpus / "extra").mkdir()
    (corpus / "extra" / "a.txt").write_text(docs[4])
    (corpus / "extra" / "b.txt").write_text(docs[5])
    return corpus


def _cfg(corpus: Path, out: Path, **kw: object) -> PretrainConfig:
    base: dict[str, object] = dict(
        corpus=str(corpus), out_dir=str(out), vocab_size=300, hidden_size=32, num_layers=2,
        num_heads=2, block_size=32, batch_size=2, steps=6, lr=3e-3, warmup_steps=2,
        val_count=2, val_every=3, val_blocks=4, checkpoint_every=2, seed=3, threads=1,
    )
    base.update(kw)
    return PretrainConfig(**base)  # type: ignore[arg-type]


def test_corpus_loading_and_heldout_documents(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path)
    docs = load_corpus(corpus)
    names = [d.name for d in docs]
    assert names == ["book0.txt", "book1.txt", "book2.txt", "book3.txt", "extra/a.txt",
                     "extra/b.txt"]
    train, val = split_documents(docs, [], 2, seed=0)
    assert len(val) == 2 and len(train) == 4 and not {d.name for d in train} & {
        d.name for d in val}
    assert split_documents(docs, [], 2, seed=0) == (train, val)  # seeded
    _, named = split_documents(docs, ["extra/a.txt"], 0, seed=0)
    assert [d.name for d in named] == ["extra/a.txt"]
    with pytest.raises(ConfigError):
        split_documents(docs, ["nope.txt"], 0, seed=0)


def test_schedule_and_val_blocks() -> None:
    cfg = PretrainConfig(corpus="x", out_dir="y", steps=100, warmup_steps=10, lr=1.0,
                         min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(100, cfg) == pytest.approx(0.1)
    assert learning_rate(55, cfg) == pytest.approx(0.55)
    starts = val_block_starts(1000, 32, 5)
    assert starts[0] == 0 and starts[-1] == 1000 - 33 and len(starts) == 5
    with pytest.raises(ValueError):
        val_block_starts(10, 32, 5)


def test_tiny_pretrain_resume_and_model_card(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path)
    straight = pretrain(_cfg(corpus, tmp_path / "straight"), command="fedtune pretrain x",
                        progress=False)
    assert straight.steps == 6 and straight.tokens_seen == 6 * 2 * 32
    assert [h["step"] for h in straight.history] == [0, 3, 6]

    # an interrupted run (stopped after step 3, checkpointed), then resumed
    cut = tmp_path / "cut"
    part = pretrain(_cfg(corpus, cut), progress=False, stop_after=3)
    assert part.steps == 3 and not (cut / "model.safetensors").exists()
    with pytest.raises(ConfigError):  # a checkpoint is there: no silent restart
        pretrain(_cfg(corpus, cut), progress=False)
    with pytest.raises(ConfigError):  # resuming with another schedule is refused
        pretrain(_cfg(corpus, cut, steps=7, resume=True), progress=False)
    resumed = pretrain(_cfg(corpus, cut, resume=True), progress=False)
    assert resumed.steps == 6 and resumed.tokens_seen == straight.tokens_seen
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float16 for v in a.values())
    assert resumed.val_loss == straight.val_loss

    out = tmp_path / "straight"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
    model32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert next(model32.parameters()).dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size and tok.eos_token == "</s>"
    assert sum(p.numel() for p in model.parameters()) == straight.parameters
    card = (out / "README.md").read_text()
    for needle in ("fedtune pretrain x", "tokens seen", "384", "validation loss",
                   f"{straight.val_loss:.4f}", f"{straight.parameters:,}", "seed | 3",
                   "wall time"):
        assert needle in card, needle
    summary = json.loads((out / "training.json").read_text())
    assert summary["tokens_seen"] == 384 and len(summary["validation_documents"]) == 2
    assert (out / "checkpoint" / "checkpoint.pt").is_file()  # the checkpoint at the end


def test_shared_tokenizer(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path)
    small = pretrain(_cfg(corpus, tmp_path / "s", steps=2), progress=False)
    big = pretrain(_cfg(corpus, tmp_path / "b", steps=2, hidden_size=48, num_heads=4,
                        tokenizer=str(small.out_dir)), progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (small.out_dir / name).read_bytes() == (big.out_dir / name).read_bytes(), name
    assert big.parameters > small.parameters


def test_cli_parses_into_config() -> None:
    parser = argparse.ArgumentParser(prog="fedtune")
    pretrain_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain", "c.jsonl", "--out", "o", "--size", "large",
                              "--layers", "3", "--val-docs", "a.txt,b.txt", "--steps", "9",
                              "--resume"])
    cfg = pretrain_cli.config_from_args(args)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (256, 3, 8)
    assert cfg.val_docs == ["a.txt", "b.txt"] and cfg.steps == 9 and cfg.resume
    args = parser.parse_args(["pretrain", "c.jsonl", "--out", "o", "--val-docs", "5"])
    cfg = pretrain_cli.config_from_args(args)
    assert cfg.val_docs == [] and cfg.val_count == 5 and cfg.hidden_size == 128
    help_text = parser._subparsers._group_actions[0].choices["pretrain"].format_help()  # type: ignore[union-attr]
    for flag in ("--tokenizer", "--steps", "--block-size", "--batch-size", "--lr", "--val-docs",
                 "--seed", "--resume", "--size"):
        assert flag in help_text


# ----------------------------------------------------------------------------------------------
# The embedded base models


def test_base_models_load_offline_and_share_the_vocabulary() -> None:
    small_dir, large_dir = base_model_path("small"), base_model_path("large")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (small_dir / name).read_bytes() == (large_dir / name).read_bytes(), name
    tok_s = AutoTokenizer.from_pretrained(small_dir)
    tok_l = AutoTokenizer.from_pretrained(large_dir)
    assert tok_s.get_vocab() == tok_l.get_vocab()
    small = AutoModelForCausalLM.from_pretrained(small_dir)
    large = AutoModelForCausalLM.from_pretrained(large_dir)
    assert next(small.parameters()).dtype == torch.float32
    assert small.config.vocab_size == large.config.vocab_size == len(tok_s)
    n_small = sum(p.numel() for p in small.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    assert 1_000_000 <= n_small <= 4_000_000 and n_large >= 3 * n_small
    size = sum(f.stat().st_size for d in (small_dir, large_dir)
               for f in d.glob("*.safetensors"))
    assert size <= 40 * 2**20
    ids = tok_s("It was a dark and stormy night.", return_tensors="pt").input_ids
    with torch.no_grad():
        for model in (small, large):
            assert torch.isfinite(model(input_ids=ids).logits).all()


def test_large_base_model_has_lower_validation_loss() -> None:
    s = json.loads((base_model_path("small") / "training.json").read_text())
    large = json.loads((base_model_path("large") / "training.json").read_text())
    assert s["validation_documents"] == large["validation_documents"]
    assert large["val_loss"] < s["val_loss"] - 0.1
    for name, summary in (("small", s), ("large", large)):
        assert summary["command"].startswith("fedtune pretrain ")
        card = (base_model_path(name) / "README.md").read_text()
        assert summary["command"] in card and f"{summary['val_loss']:.4f}" in card


def test_small_and_large_name_the_embedded_models_unless_a_directory_exists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("small") == str(base_model_path("small"))
    assert resolve_model_source("large") == str(base_model_path("large"))
    (tmp_path / "small").mkdir()
    assert resolve_model_source("small") == "small"  # a local directory of that name wins
    with pytest.raises(ValueError, match="unknown base model"):
        base_model_path("medium")


@pytest.fixture(scope="module")
def small_service():
    """fedtune's small base model behind `fedtune serve-logits`, with its token."""
    from fedtune.logits.service import spawn_service

    svc = spawn_service(str(base_model_path("small")), max_batch=8, threads=1)
    try:
        yield svc
    finally:
        svc.stop()  # by its pid


def test_distilling_from_a_black_box_teacher_lowers_the_kl(tmp_path: Path, small_service,
                                                            monkeypatch) -> None:
    """The FedPT way of building a small partner: the teacher's tokenizer, the teacher reached
    at its URL with its token (logits only), tied embeddings. The KL to the teacher on the
    held-out blocks falls, and the card says where the model came from."""
    monkeypatch.setenv("FEDTUNE_LOGITS_TOKEN", small_service.token)
    corpus = _write_corpus(tmp_path)
    cfg = _cfg(corpus, tmp_path / "partner", tokenizer="small", teacher=small_service.url,
               teacher_weight=1.0, teacher_temperature=1.0, tie_embeddings=True, steps=12,
               val_every=6, lr=1e-2)
    res = pretrain(cfg, command="fedtune pretrain partner", progress=False)
    kls = [h["val_kl"] for h in res.history]
    assert [h["step"] for h in res.history] == [0, 6, 12]
    assert kls[-1] < 0.8 * kls[0], kls
    saved = load_file(tmp_path / "partner" / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied: one matrix
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "partner")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ours = AutoTokenizer.from_pretrained(tmp_path / "partner")
    theirs = AutoTokenizer.from_pretrained(base_model_path("small"))
    assert ours.get_vocab() == theirs.get_vocab()
    card = (tmp_path / "partner" / "README.md").read_text()
    assert "distilled from" in card and "its weights were never read" in card
    assert f"{kls[0]:.3f} -> {kls[-1]:.3f}" in card and "tied embeddings" in card

    monkeypatch.setenv("FEDTUNE_LOGITS_TOKEN", "wrong")
    from fedtune.logits import LogitsServiceError

    with pytest.raises(LogitsServiceError):  # the service wants its own token
        pretrain(_cfg(corpus, tmp_path / "p2", tokenizer="small", teacher=small_service.url),
                 progress=False)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path: Path, small_service,
                                                     monkeypatch) -> None:
    monkeypatch.setenv("FEDTUNE_LOGITS_TOKEN", small_service.token)
    corpus = _write_corpus(tmp_path)
    own = pretrain(_cfg(corpus, tmp_path / "own", steps=1), progress=False)  # its own BPE
    with pytest.raises(ConfigError, match="teacher.*does not share the tokenizer"):
        pretrain(_cfg(corpus, tmp_path / "p", tokenizer=str(own.out_dir),
                      teacher=small_service.url), progress=False)
    with pytest.raises(ConfigError, match="tokenizer"):  # a teacher needs a tokenizer named
        pretrain(_cfg(corpus, tmp_path / "q", teacher=small_service.url), progress=False)
    with pytest.raises(ConfigError, match="teacher_temperature"):  # top-k carries T = 1 only
        pretrain(_cfg(corpus, tmp_path / "r", tokenizer="small", teacher=small_service.url,
                      teacher_temperature=2.0), progress=False)


def test_distilling_on_the_full_logits_lowers_the_kl_too(tmp_path: Path, small_service,
                                                         monkeypatch) -> None:
    monkeypatch.setenv("FEDTUNE_LOGITS_TOKEN", small_service.token)
    cfg = _cfg(_write_corpus(tmp_path), tmp_path / "full", tokenizer="small",
               teacher=small_service.url, teacher_weight=1.0, teacher_top_k=0,
               teacher_temperature=2.0, steps=8, val_every=8, lr=1e-2)
    kls = [h["val_kl"] for h in pretrain(cfg, progress=False).history]
    assert len(kls) == 2 and kls[-1] < 0.8 * kls[0], kls
    assert "on the full logits" in (tmp_path / "full" / "README.md").read_text()


def test_a_second_stage_starts_from_the_init_models_weights(tmp_path: Path, small_service,
                                                            monkeypatch) -> None:
    """--init: a partner trained further (here with its teacher) keeps its architecture and
    tokenizer and starts from its weights: step 0's validation loss is the init model's."""
    monkeypatch.setenv("FEDTUNE_LOGITS_TOKEN", small_service.token)
    corpus = _write_corpus(tmp_path)
    init = pretrain(_cfg(corpus, tmp_path / "stage1", tokenizer="small", steps=4, lr=1e-2,
                         tie_embeddings=True), progress=False)
    cfg = _cfg(corpus, tmp_path / "stage2", init=str(init.out_dir), teacher=small_service.url,
               hidden_size=64, num_layers=3, num_heads=4, steps=4, val_every=4)
    res = pretrain(cfg, command="fedtune pretrain stage2", progress=False)
    assert res.history[0]["val_loss"] == pytest.approx(init.val_loss, rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(init.out_dir)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stage2")
    assert (b.config.hidden_size, b.config.num_hidden_layers) == (32, 2)  # the init's, not 64/3
    assert b.config.tie_word_embeddings
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    card = (tmp_path / "stage2" / "README.md").read_text()
    assert f"initialised from | `{init.out_dir}`" in card and "hidden 32, 2 layers" in card
    with pytest.raises(ConfigError, match="block_size"):  # longer than the init's context
        pretrain(_cfg(corpus, tmp_path / "stage3", init=str(init.out_dir), block_size=64),
                 progress=False)


def test_instruction_corpus_is_the_teachers_greedy_answers_in_the_chat_format(tmp_path: Path):
    """python -m fedtune.models.instruct_corpus: the black box answers the server's prompts
    through its service; each document is the chat-formatted prompt and that answer."""
    from fedtune.logits import LocalLogits
    from fedtune.models.instruct_corpus import greedy_ids, prompts_records

    model = AutoModelForCausalLM.from_pretrained(base_model_path("small")).eval()
    tok = AutoTokenizer.from_pretrained(base_model_path("small"))
    prompts = [tok(t)["input_ids"] for t in ("the cat sat", "rain falls on the", "a dog")]
    got = greedy_ids(LocalLogits(model, tok), prompts, max_new_tokens=5, stop_ids=set(),
                     pad_id=0)
    for p, g in zip(prompts, got, strict=True):
        want = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert g == want
    first = [greedy_ids(LocalLogits(model, tok), prompts, max_new_tokens=5,
                        stop_ids={g[0]}, pad_id=0) for g in got[:1]][0]
    assert len(first[0]) == 1  # a row ends at its stop token, which it keeps
    records = prompts_records(10, seed=1)
    from fedtune.data.generated import HELDOUT_FAMILIES

    assert len(records) == 10 and not {r.category for r in records} & set(HELDOUT_FAMILIES)
    assert records == prompts_records(10, seed=1)
