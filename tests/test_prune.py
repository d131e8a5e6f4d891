"""Tests of fedtune.models.prune: a layer-pruned copy of a decoder (FedPT's comparison partner)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fedtune.models import build_tiny_model  # noqa: E402
from fedtune.models.prune import keep_layers, main, parse_keep  # noqa: E402
from fedtune.models.tiny import TEST_SENTENCES  # noqa: E402


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        TEST_SENTENCES, tmp_path_factory.mktemp("prune") / "tiny4", vocab_size=384,
        hidden_size=32, num_layers=4, num_heads=4, max_positions=256, seed=3)


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 8, 99, 3, 250, 61]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def test_keeping_every_layer_changes_nothing(four_layers: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(four_layers).eval()
    before = _logits(model)
    keep_layers(model, [0, 1, 2, 3])
    assert torch.equal(_logits(model), before)


def test_pruned_model_equals_a_smaller_model_with_those_weights(four_layers: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(four_layers).eval()
    # the reference: a fresh 2-layer Llama given blocks 0 and 3's weights by name
    config = LlamaConfig.from_pretrained(four_layers)
    config.num_hidden_layers = 2
    ref = LlamaForCausalLM(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if ".layers.1." in key or ".layers.2." in key:
            continue
        state[key.replace(".layers.3.", ".layers.1.")] = value
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    full = _logits(model)
    keep_layers(model, [0, 3])
    assert model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.get_decoder().layers] == [0, 1]
    torch.testing.assert_close(_logits(model), _logits(ref))
    assert not torch.allclose(_logits(model), full)  # dropping blocks does change the model


def test_pruned_model_decodes_the_same_with_and_without_the_kv_cache(four_layers: Path) -> None:
    model = keep_layers(AutoModelForCausalLM.from_pretrained(four_layers).eval(), [1, 3])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(_ids(), use_cache=True, **kwargs)
        plain = model.generate(_ids(), use_cache=False, **kwargs)
    assert torch.equal(cached, plain)


def test_cli_saves_a_model_that_reloads_with_a_card(four_layers: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    assert main([str(four_layers), "--keep", "3,0", "--out", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = keep_layers(AutoModelForCausalLM.from_pretrained(four_layers).eval(), [0, 3])
    assert torch.equal(_logits(reloaded), _logits(expected))
    meta = json.loads((out / "pruned.json").read_text())
    assert meta["kept_blocks"] == [0, 3] and meta["of"] == 4
    card = (out / "README.md").read_text()
    assert "comparison only" in card and "Not a FedPT partner" in card
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("spec, message", [
    ("", "at least one"), ("0,x", "comma-separated"), ("0,4", r"\[4\] are outside 0..3"),
    ("-1", "outside")])
def test_parse_keep_errors_name_the_value(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_keep(spec, 4)


def test_parse_keep_sorts_and_deduplicates() -> None:
    assert parse_keep("3, 0,3,1", 4) == [0, 1, 3]


def test_a_model_without_decoder_layers_is_refused() -> None:
    class NoBlocks(torch.nn.Module):
        def get_decoder(self) -> torch.nn.Module:
            return self

    with pytest.raises(ValueError, match="no decoder.layers"):
        keep_layers(NoBlocks(), [0])  # type: ignore[arg-type]
