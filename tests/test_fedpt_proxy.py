"""Proxy-tuning maths and decoding (FedPT): exactness, processors, the shared-tokenizer check."""

import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.algorithms.fedpt.proxy import (
    ProxyModel,
    make_processors,
    proxy_decode,
    proxy_generate_ids,
    proxy_logits,
)
from fedtune.eval.generation import greedy_generate_ids
from fedtune.logits import LocalLogits, TokenizerMismatch
from fedtune.logits.local import LogitsRequestError, UnknownSession
from fedtune.models.loading import load_model_and_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL, LARGE = ROOT / "fedtune/base_models/small", ROOT / "fedtune/base_models/large"


class StubTokenizer:
    """Just what a logits source reads of a tokenizer: the token -> id map and the pad id."""

    def __init__(self, n: int, extra: str = "") -> None:
        self.vocab = {f"t{i}{extra if i == n - 1 else ''}": i for i in range(n)}
        self.pad_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


def llama(seed: int, hidden: int = 16, vocab: int = 40) -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=64)).eval()


PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [20, 21, 22, 23, 24, 25, 26]]


def test_proxy_logits_by_hand_and_vocab_cut():
    large = torch.tensor([[1.0, 2.0, 3.0, 99.0]])  # 4th column: a padded embedding row
    tuned = torch.tensor([[0.5, 0.0, 1.0]])
    base = torch.tensor([[0.0, 1.0, 1.0]])
    out = proxy_logits(large, tuned, base, alpha=2.0, vocab_size=3)
    assert torch.equal(out, torch.tensor([[2.0, 0.0, 3.0]]))  # 1+2*.5, 2+2*(-1), 3+0
    with pytest.raises(ValueError, match="fewer than"):
        proxy_logits(large, tuned, base, alpha=1.0, vocab_size=4)


def test_proxy_logits_equal_the_large_when_tuned_is_base():
    g = torch.Generator().manual_seed(0)
    large = torch.randn(3, 7, 48, generator=g) * 30
    small = torch.randn(3, 7, 40, generator=g) * 30
    for alpha in (1.0, 0.37, 5.0):
        assert torch.equal(proxy_logits(large, small, small.clone(), alpha, 40), large[..., :40])


def test_plausibility_offset_acts_only_on_the_large_models_candidates():
    # p_large ~ softmax([4, 3.5, 0, -1]): with beta 0.1 the plausible set is tokens 0 and 1
    large = torch.tensor([[4.0, 3.5, 0.0, -1.0]])
    tuned = torch.tensor([[0.0, 2.0, 9.0, 0.0]])  # a big push on token 2, outside the set
    base = torch.zeros(1, 4)
    out = proxy_logits(large, tuned, base, alpha=1.0, vocab_size=4, plausibility=0.1)
    lp = torch.log_softmax(large, -1)
    assert torch.allclose(out.logsumexp(-1), torch.zeros(1), atol=1e-6)  # a proper distribution
    assert torch.allclose(out[0, 2:], lp[0, 2:])  # outside S: the large model's own
    mass = lp[0, :2].logsumexp(-1)
    inside = torch.log_softmax(torch.tensor([4.0, 5.5]), -1)  # S shares P_large(S) by s_proxy
    assert torch.allclose(out[0, :2], mass + inside, atol=1e-6)
    assert int(out.argmax()) == 1  # the offset re-ranks within S
    assert int(proxy_logits(large, tuned, base, 1.0, 4).argmax()) == 2  # unconstrained: token 2


def test_plausibility_with_tuned_equal_base_is_the_large_distribution():
    g = torch.Generator().manual_seed(1)
    large = torch.randn(2, 5, 48, generator=g) * 5
    small = torch.randn(2, 5, 40, generator=g) * 5
    out = proxy_logits(large, small, small.clone(), 1.0, 40, plausibility=0.05)
    assert torch.allclose(out, torch.log_softmax(large[..., :40], -1), atol=1e-5)


def test_proxy_decoding_with_tuned_equal_base_is_the_large_model_exactly():
    tok = StubTokenizer(40)
    large, small = llama(0, hidden=32), llama(1)
    proxy = ProxyModel(LocalLogits(large, tok), LocalLogits(small, tok), LocalLogits(small, tok),
                       alpha=1.0)
    dec = proxy_decode(proxy, PROMPTS, max_new_tokens=6, eos_id=None, pad_id=0, keep_logits=True)
    only = ProxyModel(LocalLogits(large, tok), LocalLogits(large, tok), LocalLogits(large, tok),
                      alpha=0.0)
    ref = proxy_decode(only, PROMPTS, max_new_tokens=6, eos_id=None, pad_id=0, keep_logits=True)
    assert dec.tokens == ref.tokens and all(len(t) == 6 for t in dec.tokens)
    for a, b, p, t in zip(dec.logits, ref.logits, PROMPTS, dec.tokens, strict=True):
        assert torch.equal(a, b)
        # and each row is what the large model alone computes on that row, unbatched
        full = large(torch.tensor([p + t[:-1]])).logits[0, len(p) - 1:]
        torch.testing.assert_close(a, full, rtol=1e-5, atol=1e-5)


def test_proxy_decoding_moves_towards_the_expert():
    tok = StubTokenizer(40)
    large, base, tuned = llama(0, hidden=32), llama(1), llama(2)
    proxy = ProxyModel(LocalLogits(large, tok), LocalLogits(tuned, tok), LocalLogits(base, tok),
                       alpha=1.0)
    dec = proxy_decode(proxy, PROMPTS, max_new_tokens=1, eos_id=None, pad_id=0, keep_logits=True)
    with torch.no_grad():
        for p, got in zip(PROMPTS, dec.logits, strict=True):
            x = torch.tensor([p])
            want = large(x).logits[0, -1] + tuned(x).logits[0, -1] - base(x).logits[0, -1]
            torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def test_greedy_proxy_generation_with_the_base_pair_equals_hf_generate_of_the_large():
    large, tok = load_model_and_tokenizer(LARGE, "float32", "cpu")
    small, _ = load_model_and_tokenizer(SMALL, "float32", "cpu")
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "The river ran", "She said")]
    proxy = ProxyModel(LocalLogits(large, tok), LocalLogits(small, tok), LocalLogits(small, tok))
    ids = proxy_generate_ids(proxy, prompts, max_new_tokens=12, eos_id=tok.eos_token_id,
                             pad_id=tok.pad_token_id, batch_size=2)
    got = [tok.decode(i, skip_special_tokens=True).strip() for i in ids]
    assert got == greedy_generate_ids(large, tok, prompts, max_new_tokens=12)


def test_processors_apply_after_the_arithmetic():
    tok = StubTokenizer(40)
    large, base, tuned = llama(0, hidden=32), llama(1), llama(2)
    proxy = ProxyModel(LocalLogits(large, tok), LocalLogits(tuned, tok), LocalLogits(base, tok))
    # top-p this small keeps only the proxy's argmax: sampling must then equal greedy decoding,
    # which holds only if the warper saw s~ (not s_large or any single model)
    greedy = proxy_generate_ids(proxy, PROMPTS, max_new_tokens=5, eos_id=None, pad_id=0)
    sampled = proxy_generate_ids(proxy, PROMPTS, max_new_tokens=5, eos_id=None, pad_id=0,
                                 do_sample=True, temperature=0.7, top_p=1e-6, seed=3)
    assert sampled == greedy
    hot = proxy_generate_ids(proxy, PROMPTS, max_new_tokens=5, eos_id=None, pad_id=0,
                             do_sample=True, temperature=50.0, seed=3)
    assert hot != greedy
    assert len(make_processors(0.7, 0.9)) == 2 and len(make_processors(None, None)) == 0


def test_mismatched_tokenizers_are_refused():
    a, b = llama(0), llama(1)
    with pytest.raises(TokenizerMismatch, match="do not share one tokenizer"):
        ProxyModel(LocalLogits(a, StubTokenizer(40)), LocalLogits(b, StubTokenizer(40, "x")),
                   LocalLogits(b, StubTokenizer(40, "x")))
    # the real pair shares its tokenizer; one extra token is enough to refuse it
    tok = load_tokenizer(SMALL)
    other = load_tokenizer(SMALL)
    other.add_tokens(["<extra>"])
    large, _ = load_model_and_tokenizer(LARGE, "float32", "cpu")
    with pytest.raises(TokenizerMismatch):
        ProxyModel(LocalLogits(large, tok), LocalLogits(large, other), LocalLogits(large, tok))


def test_local_source_validates_requests():
    src = LocalLogits(llama(0), StubTokenizer(40), max_batch=2)
    with pytest.raises(LogitsRequestError, match=r"token id 40 .*\[0, 40\)"):
        src.start([[1, 40]])
    with pytest.raises(LogitsRequestError, match="exceeds the limit of 2"):
        src.start([[1], [2], [3]])
    with pytest.raises(LogitsRequestError, match="non-empty"):
        src.start([[]])
    sid, logits = src.start([[1, 2], [3]])
    assert logits.shape == (2, 40)
    with pytest.raises(LogitsRequestError, match="one token per row"):
        src.step(sid, [1])
    assert src.step(sid, [4, 5]).shape == (2, 40)
    src.close(sid)
    with pytest.raises(UnknownSession):
        src.step(sid, [1, 2])


def test_extend_equals_stepping_token_by_token():
    src = LocalLogits(llama(0), StubTokenizer(40))
    sid, first = src.start(PROMPTS)
    block = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    many = src.extend(sid, block)  # (B, 3, V)
    sid2, first2 = src.start(PROMPTS)
    assert torch.equal(first, first2)
    for j in range(3):
        one = src.step(sid2, [row[j] for row in block])
        torch.testing.assert_close(many[:, j], one, rtol=1e-5, atol=1e-5)
    with pytest.raises(LogitsRequestError, match="same number"):
        src.extend(sid, [[1], [2, 3], [4]])
    with pytest.raises(LogitsRequestError, match="would pass the model's 64 positions"):
        src.extend(sid, [[1] * 60] * 3)


def test_idle_sessions_expire_and_open_sessions_are_capped():
    src = LocalLogits(llama(0), StubTokenizer(40), ttl_s=0.0, max_sessions=2)
    old, _ = src.start([[1, 2]])
    time.sleep(0.01)
    src.start([[3]])  # starting a session drops the ones idle past ttl_s
    with pytest.raises(UnknownSession):
        src.step(old, [4])
    capped = LocalLogits(llama(0), StubTokenizer(40), max_sessions=2)
    a, _ = capped.start([[1]])
    capped.start([[2]])
    with pytest.raises(LogitsRequestError, match="2 sessions are open"):
        capped.start([[3]])
    capped.close(a)
    capped.start([[3]])
    assert capped.open_sessions() == 2


def test_proxy_evaluation_with_chat_prompts_equals_the_large_model_alone():
    """FedPT scores chat-template prompts exactly as every other method does: with tuned equal
    to base, the proxy's answers and eval loss are the large model's under the same template."""
    from fedtune.algorithms.fedpt.evaluate import evaluate_proxy
    from fedtune.data.records import Record
    from fedtune.eval.evaluate import evaluate

    large, tok = load_model_and_tokenizer(LARGE, "float32", "cpu")
    small, _ = load_model_and_tokenizer(SMALL, "float32", "cpu")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n"
                         "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
    records = [Record("Name a colour.", "", "Red."), Record("Add the numbers.", "2 and 3", "5")]
    proxy = ProxyModel(LocalLogits(large, tok), LocalLogits(small, tok), LocalLogits(small, tok))
    kw = {"max_new_tokens": 8, "batch_size": 2, "max_length": 128, "template": "chat"}
    got = evaluate_proxy(proxy, tok, records, **kw)
    want = evaluate(large, tok, records, **kw)
    assert got["rougeL"] == want["rougeL"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-4)
