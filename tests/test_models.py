"""Tests of fedtune.models: the offline tiny model, loading, pad-token handling, ModelConfig."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedtune.configbase import ConfigError  # noqa: E402
from fedtune.eval.generation import greedy_generate  # noqa: E402
from fedtune.models import (  # noqa: E402
    ModelConfig,
    build_tiny_model,
    ensure_pad_token,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tiny_model_for_tests,
    train_tokenizer,
)
from fedtune.models.tiny import TEST_SENTENCES  # noqa: E402

PROMPTS = ["The quick brown", "Federated learning trains", "x", "Numbers: 0 1 2 3 4 5 6 7 8"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_for_tests(tmp_path_factory.mktemp("models"))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_model_reloads_with_auto_classes(tiny_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_dir / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.pad_token_id == 0 and model.config.eos_token_id == 2
    # No post-processor: encoding adds neither BOS nor EOS, and decoding round-trips.
    text = "The quick brown fox, naïve café!"
    ids = tokenizer(text)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in ids and tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tiny_model_is_deterministic_and_leaves_global_rng(tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    a = build_tiny_model(TEST_SENTENCES, tmp_path / "a", vocab_size=300, hidden_size=16, seed=3)
    b = build_tiny_model(TEST_SENTENCES, tmp_path / "b", vocab_size=300, hidden_size=16, seed=3)
    c = build_tiny_model(TEST_SENTENCES, tmp_path / "c", vocab_size=300, hidden_size=16, seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb, sc = (_state(AutoModelForCausalLM.from_pretrained(p)) for p in (a, b, c))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_train_tokenizer_is_deterministic() -> None:
    t1 = train_tokenizer(TEST_SENTENCES, 320)
    t2 = train_tokenizer(TEST_SENTENCES, 320)
    assert t1.get_vocab() == t2.get_vocab()
    assert len(t1) == 320
    assert t1("quick brown")["input_ids"] == t2("quick brown")["input_ids"]


def test_load_model_and_tokenizer(tiny_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_dir, "float32", "cpu")
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0
    bf16 = load_model(str(tiny_dir), "bfloat16", "cpu")
    assert bf16.dtype == torch.bfloat16
    assert len(load_tokenizer(str(tiny_dir))) == model.config.vocab_size


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    for bad in (missing, str(missing), "./no/such/dir"):
        with pytest.raises(FileNotFoundError, match="no"):
            load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)


def test_resolve_dtype_and_device() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64")
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_ensure_pad_token_keeps_existing(tiny_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_dir, device="cpu")
    assert ensure_pad_token(tokenizer, model) == "present"
    assert tokenizer.pad_token_id == 0


def test_ensure_pad_token_reuses_eos(tiny_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir, device="cpu")
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    assert tokenizer.pad_token_id is None
    assert ensure_pad_token(tokenizer, model) == "reused eos"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert model.config.pad_token_id == 2 and model.generation_config.pad_token_id == 2
    batched = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    single = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1)
    assert batched == single and len(batched) == len(PROMPTS)


def _tokenizer_without_specials() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no pad, EOS, BOS or UNK at all."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(TEST_SENTENCES), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_ensure_pad_token_adds_and_resizes() -> None:
    tokenizer = _tokenizer_without_specials()
    assert tokenizer.pad_token is None and tokenizer.eos_token is None
    rows = len(tokenizer)
    config = LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
                         eos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    rng_before = torch.get_rng_state()
    assert ensure_pad_token(tokenizer, model) == "added"
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == rows
    assert model.get_input_embeddings().weight.shape[0] == rows + 1
    assert model.get_output_embeddings().weight.shape[0] == rows + 1
    assert model.config.pad_token_id == rows and model.generation_config.pad_token_id == rows
    batched = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=4)
    single = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=1)
    assert batched == single


def test_model_config_defaults_validate() -> None:
    cfg = ModelConfig()
    cfg.validate()
    assert (cfg.path, cfg.dtype, cfg.device) == ("smollm2-135m", "float32", "auto")
    assert (cfg.tiny_vocab_size, cfg.tiny_hidden_size, cfg.tiny_layers) == (512, 64, 2)


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("dtype", "float64", "model.dtype"),
        ("device", "tpu", "model.device"),
        ("tiny_hidden_size", 66, "model.tiny_hidden_size"),
        ("tiny_hidden_size", 12, "model.tiny_hidden_size"),
        ("tiny_hidden_size", 0, "model.tiny_hidden_size"),
        ("tiny_layers", 0, "model.tiny_layers"),
        ("tiny_heads", -1, "model.tiny_heads"),
        ("tiny_vocab_size", 100, "model.tiny_vocab_size"),
        ("tiny_max_positions", 0, "model.tiny_max_positions"),
        ("path", "", "model.path"),
    ],
)
def test_model_config_errors_name_the_key(field: str, value: object, key: str) -> None:
    cfg = ModelConfig()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.key == key and info.value.value == value
    assert key in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_model_config_cuda_without_cuda() -> None:
    with pytest.raises(ConfigError, match="model.device"):
        ModelConfig(device="cuda").validate()
