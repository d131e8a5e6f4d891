"""The logits service: started and stopped here on 127.0.0.1; equal to in-process; robust;
only for whoever holds the token it was spawned with."""

import copy
import json
import os
import urllib.request
from pathlib import Path

import pytest
import torch

from fedtune.algorithms.fedpt.proxy import ProxyModel, proxy_decode, proxy_generate_ids
from fedtune.logits import LocalLogits, LogitsServiceError, RemoteLogits
from fedtune.logits.service import spawn_service
from fedtune.models.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL, LARGE = ROOT / "fedtune/base_models/small", ROOT / "fedtune/base_models/large"


@pytest.fixture(scope="module")
def service():
    svc = spawn_service(str(LARGE), device="cpu", max_batch=4, threads=1, timeout=120)
    try:
        yield svc
    finally:
        svc.stop()  # by its pid
        assert svc.process.poll() is not None


@pytest.fixture(scope="module")
def pair():
    large, tok = load_model_and_tokenizer(LARGE, "float32", "cpu")
    small, _ = load_model_and_tokenizer(SMALL, "float32", "cpu")
    tuned = copy.deepcopy(small)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return large, small, tuned, tok


def test_service_reports_its_tokenizer_and_shape(service, pair):
    large, _, _, tok = pair
    assert service.client().info() == LocalLogits(large, tok, max_batch=4,
                                                  name=str(LARGE)).info()


def test_proxy_generation_through_the_service_equals_in_process(service, pair):
    large, small, tuned, tok = pair
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "The river ran", "She said",
                                             "### Instruction:\nName a colour.\n\n### Response:\n")]
    kw = {"max_new_tokens": 16, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
          "batch_size": 3}
    remote = ProxyModel(service.client(), LocalLogits(tuned, tok),
                        LocalLogits(small, tok))
    local = ProxyModel(LocalLogits(large, tok), LocalLogits(tuned, tok), LocalLogits(small, tok))
    got = proxy_generate_ids(remote, prompts, **kw)
    assert got == proxy_generate_ids(local, prompts, **kw)
    assert got != proxy_generate_ids(ProxyModel(*local.sources(), alpha=0.0), prompts, **kw)
    a = proxy_decode(remote, prompts[:2], max_new_tokens=4, eos_id=None, pad_id=0,
                     keep_logits=True).logits
    b = proxy_decode(local, prompts[:2], max_new_tokens=4, eos_id=None, pad_id=0,
                     keep_logits=True).logits
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def _post(url: str, path: str, body: bytes, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_malformed_requests_get_errors_and_the_service_stays_up(service):
    client = service.client()
    vocab = client.info().vocab_size
    cases = [
        ({"prefixes": [[1, vocab]]}, 400, f"token id {vocab}"),
        ({"prefixes": [[1, -1]]}, 400, "token id -1"),
        ({"prefixes": [[1, "a"]]}, 400, "token id 'a'"),
        ({"prefixes": [[1]] * 5}, 400, "exceeds the limit of 4"),
        ({"prefixes": []}, 400, "non-empty"),
        ({"prefixes": [[1] * 300]}, 400, "exceeds the model's 256 positions"),
        ({"prefix": [[1]]}, 400, "non-empty"),
    ]
    for payload, status, message in cases:
        code, err = _post(service.url, "/start", json.dumps(payload).encode(), service.token)
        assert code == status and message in err["error"], (payload, code, err)
    code, err = _post(service.url, "/start", b"{not json", service.token)
    assert code == 400 and "malformed JSON" in err["error"]
    code, err = _post(service.url, "/step", json.dumps({"session": "nope", "tokens": [1]}).encode(),
                      service.token)
    assert code == 404 and "unknown session" in err["error"]
    code, err = _post(service.url, "/nowhere", b"{}", service.token)
    assert code == 404
    with pytest.raises(LogitsServiceError, match="HTTP 404"):
        client.close("nope")
    sid, logits = client.start([[5, 6, 7], [8]])
    with pytest.raises(LogitsServiceError, match="one token per row"):
        client.step(sid, [1])
    assert client.step(sid, [1, 2]).shape == (2, client.info().logits_width)  # still serving
    with pytest.raises(LogitsServiceError, match="same number"):
        client.extend(sid, [[1, 2], [3]])
    assert client.extend(sid, [[1, 2], [3, 4]]).shape == (2, 2, client.info().logits_width)
    client.close(sid)
    with pytest.raises(LogitsServiceError, match="unknown session"):
        client.step(sid, [1, 2])
    assert service.process.poll() is None


def test_top_k_replies_equal_the_full_logits_top_k_in_far_fewer_bytes(service):
    from fedtune.logits.source import forced_logits, forced_top, top_logits

    client = service.client()
    rows = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    full = forced_logits(client, rows)  # (2, 6, V)
    top = forced_top(client, rows, 16)
    want = top_logits(full, 16)
    assert top.values.shape == (2, 6, 16) and torch.equal(top.indices, want.indices)
    assert torch.allclose(top.values, want.values) and torch.allclose(top.lse, want.lse)
    body = json.dumps({"prefixes": [[5, 6]], "top_k": 16}).encode()
    req = urllib.request.Request(service.url + "/start", data=body, headers={
        "Authorization": f"Bearer {service.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert len(resp.read()) == 16 * 8 + 4  # not V * 4
        assert resp.headers["X-Fedtune-Top-K"] == "16"
    v = client.info().logits_width
    for k in (0, v + 1, "8", True, 2048):
        code, err = _post(service.url, "/start",
                          json.dumps({"prefixes": [[5]], "top_k": k}).encode(), service.token)
        assert code == 400 and "top_k must be an integer" in err["error"], (k, code, err)
    sid, _ = client.start([[5]])
    code, err = _post(service.url, "/extend", json.dumps(
        {"session": sid, "tokens": [[6]], "top_k": -1}).encode(), service.token)
    assert code == 400 and "top_k" in err["error"]
    client.close(sid)
    assert service.process.poll() is None


def test_the_spawned_service_wants_its_token_which_is_not_on_its_command_line(service):
    """``ps`` shows every user a command line: the token travels in the child's environment."""
    cmdline = Path(f"/proc/{service.process.pid}/cmdline")
    if cmdline.is_file():
        assert service.token and service.token.encode() not in cmdline.read_bytes()
    assert service.token not in repr(service)
    for token in (None, "wrong", service.token[:-1]):
        with pytest.raises(LogitsServiceError, match="HTTP 401"):
            RemoteLogits(service.url, token=token).info()
    code, err = _post(service.url, "/start", b'{"prefixes": [[1]]}', "wrong")
    assert code == 401 and "token" in err["error"]
    assert RemoteLogits(service.url, token=service.token).info().vocab_size > 0
    assert os.environ.get("FEDTUNE_LOGITS_TOKEN") != service.token  # not leaked into ours


def test_fedpt_reaches_a_service_at_large_url_with_the_token_of_its_environment(service,
                                                                               monkeypatch):
    """``large_access = 'url'``: the config names the service, never the secret."""
    from types import SimpleNamespace

    from fedtune.algorithms.fedpt.config import FedPTConfig
    from fedtune.algorithms.fedpt.server import FedPTServer

    fake = SimpleNamespace(cfg=FedPTConfig(large_access="url", large_url=service.url))
    monkeypatch.delenv("FEDTUNE_LOGITS_TOKEN", raising=False)
    monkeypatch.delenv("FEDTUNE_LOGITS_TOKEN_FILE", raising=False)
    with pytest.raises(LogitsServiceError, match="HTTP 401"):
        FedPTServer._connect(fake).info()  # type: ignore[arg-type]
    monkeypatch.setenv("FEDTUNE_LOGITS_TOKEN", service.token)
    assert FedPTServer._connect(fake).info().vocab_size > 0  # type: ignore[arg-type]


def test_the_logits_sessions_use_the_current_cache_api():
    """No transformers deprecation (``past_key_values`` is removed in 5.40) on a FedPT step."""
    import warnings

    root = Path(__file__).resolve().parents[1] / "fedtune" / "base_models" / "small"
    model, tok = load_model_and_tokenizer(root, "float32", "cpu")
    src = LocalLogits(model, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sid, first = src.start([[5, 6, 7], [8, 9]])
        step = src.step(sid, [10, 11])
    assert first.shape == step.shape == (2, src.vocab_size)
