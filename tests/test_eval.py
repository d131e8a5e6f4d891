"""Tests of fedtune.eval: greedy generation, Rouge-L, eval loss, evaluate(), EvalConfig."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from fedtune.configbase import ConfigError  # noqa: E402
from fedtune.data.records import Record  # noqa: E402
from fedtune.eval import (  # noqa: E402
    EvalConfig,
    eval_loss,
    evaluate,
    greedy_generate,
    rouge_l,
    select_eval_records,
)
from fedtune.models import load_model_and_tokenizer, tiny_model_for_tests  # noqa: E402

PROMPTS = [
    "The quick brown",
    "Federated learning trains one model on",
    "x",
    "### Instruction:\nName three colours.\n\n### Response:\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9",
    "Zeroth-order",
]

RECORDS = [
    Record("Name three colours.", "", "Red, green and blue.", "brainstorming"),
    Record("Summarise the text.", "The fox jumps over the dog.", "A fox jumps.", "summarization"),
    Record("What is 2 + 2?", "", "4", "qa"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = tiny_model_for_tests(tmp_path_factory.mktemp("eval"))
    return load_model_and_tokenizer(path, "float32", "cpu")


# --- Rouge-L ---------------------------------------------------------------------------------

def test_rouge_l_identical_and_disjoint() -> None:
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["The Cat sat!"], ["the cat sat"]) == pytest.approx(1.0)  # case, punctuation
    assert rouge_l(["dog runs fast"], ["the cat sat"]) == 0.0
    assert rouge_l(["", "x"], ["a b", "x"]) == pytest.approx(0.5)


def test_rouge_l_hand_computed_lcs() -> None:
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    assert rouge_l(["a b c d"], ["a c e"]) == pytest.approx(4 / 7)
    # LCS = "the cat on the mat" (5 of 6 words each side): F = 5/6; mean with 4/7.
    preds = ["the cat sat on the mat", "a b c d"]
    refs = ["the cat is on the mat", "a c e"]
    assert rouge_l(preds, refs) == pytest.approx((5 / 6 + 4 / 7) / 2)


def test_rouge_l_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])
    assert rouge_l([], []) == 0.0


# --- eval loss -------------------------------------------------------------------------------

def _batch(tokenizer: PreTrainedTokenizerBase, texts: list[str], prompt_tokens: int
           ) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels -100 on the first ``prompt_tokens`` tokens and on padding."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[:, :prompt_tokens] = -100
    labels[enc["attention_mask"] == 0] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": labels}


def test_eval_loss_is_token_weighted(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny
    batches = [
        _batch(tokenizer, ["The quick brown fox jumps over the lazy dog.", "Red and blue."], 2),
        _batch(tokenizer, ["Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 and more."], 3),
    ]
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            targets = b["labels"][:, 1:]
            s = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                targets.reshape(-1), ignore_index=-100, reduction="sum")
            n = int((targets != -100).sum())
            total, count = total + float(s), count + n
            means.append(float(s) / n)
    model.train()
    got = eval_loss(model, iter(batches))
    assert model.training  # previous mode restored
    model.eval()
    assert count == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert got == pytest.approx(total / count, rel=1e-6)
    # Not a mean of batch means (the random model's losses are all near log(vocab), so the two
    # differ by ~5e-4 only, still far above float noise).
    assert abs(got - sum(means) / len(means)) > 1e-4
    # Hugging Face's own loss on a single batch agrees (same shift, same masking).
    b = batches[1]
    with torch.no_grad():
        hf = model(**b).loss
    assert eval_loss(model, [b]) == pytest.approx(float(hf), rel=1e-5)


# --- generation ------------------------------------------------------------------------------

def test_greedy_generate_batch_invariant(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny
    assert tokenizer.padding_side == "right"
    one = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    four = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    assert one == four
    assert len(one) == len(PROMPTS) and all(isinstance(t, str) for t in one)
    assert tokenizer.padding_side == "right"  # restored
    assert not model.training


def _force_next_token(model: PreTrainedModel, token_id: int) -> torch.utils.hooks.RemovableHandle:
    """Make the model always predict ``token_id`` (a forward hook on the LM head)."""
    def hook(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(out, -1e4)
        forced[..., token_id] = 1e4
        return forced
    return model.get_output_embeddings().register_forward_hook(hook)


def test_greedy_generate_returns_new_tokens_only_and_stops_at_eos(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny
    handle = _force_next_token(model, tokenizer.eos_token_id)
    try:
        assert greedy_generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5) == ["", "", ""]
    finally:
        handle.remove()
    word = tokenizer(" a", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    handle = _force_next_token(model, word[0])
    try:
        out = greedy_generate(model, tokenizer, PROMPTS[:2], max_new_tokens=3, batch_size=2)
    finally:
        handle.remove()
    assert out == ["a a a"] * 2  # exactly max_new_tokens new tokens, no prompt text


# --- evaluate --------------------------------------------------------------------------------

def test_evaluate_reports_both_metrics(
    tiny: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny
    model.train()
    res = evaluate(model, tokenizer, RECORDS, max_new_tokens=8, batch_size=2, max_length=128)
    assert model.training
    model.eval()
    assert set(res) == {"num_examples", "rougeL", "eval_loss", "repetition"}
    assert res["num_examples"] == 3
    assert 0.0 <= res["rougeL"] <= 1.0
    assert 0.0 < res["eval_loss"] < 20.0
    only_loss = evaluate(model, tokenizer, RECORDS, max_new_tokens=8, batch_size=3,
                         max_length=128, rouge=False)
    assert set(only_loss) == {"num_examples", "eval_loss"}
    assert only_loss["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-5)
    only_rouge = evaluate(model, tokenizer, RECORDS, max_new_tokens=8, batch_size=1,
                          max_length=128, loss=False)
    assert set(only_rouge) == {"num_examples", "rougeL", "repetition"}
    assert only_rouge["rougeL"] == pytest.approx(res["rougeL"])


def test_select_eval_records() -> None:
    records = [Record(f"q{i}", "", f"a{i}") for i in range(50)]
    sub = select_eval_records(records, 10, seed=1)
    assert len(sub) == 10
    assert sub == select_eval_records(records, 10, seed=1)
    assert sub != select_eval_records(records, 10, seed=2)
    positions = [records.index(r) for r in sub]
    assert positions == sorted(positions)  # original order kept
    assert select_eval_records(records, 0, seed=1) == records
    assert select_eval_records(records, 500, seed=1) == records


# --- EvalConfig ------------------------------------------------------------------------------

def test_eval_config_defaults() -> None:
    cfg = EvalConfig()
    cfg.validate()
    assert (cfg.max_new_tokens, cfg.batch_size, cfg.max_examples) == (32, 16, 40)
    assert (cfg.loss_interval, cfg.rouge_interval, cfg.evaluate_base) == (0, 0, True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", 0), ("batch_size", 0), ("max_examples", -1), ("loss_interval", -1),
     ("rouge_interval", -2)],
)
def test_eval_config_errors_name_the_key(field: str, value: int) -> None:
    cfg = EvalConfig()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate("eval")
    assert info.value.key == f"eval.{field}" and info.value.value == value



def test_fit_context_left_truncates_to_the_model_positions():
    from types import SimpleNamespace

    from fedtune.eval.generation import fit_context

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10))
    out = fit_context(model, [list(range(12)), [1, 2]], max_new_tokens=4)  # type: ignore[arg-type]
    assert out == [list(range(6, 12)), [1, 2]]
    with pytest.raises(ValueError, match="no room"):
        fit_context(model, [[1]], max_new_tokens=10)  # type: ignore[arg-type]
