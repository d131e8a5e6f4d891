"""The logits service against clients that do not play fair: no or a wrong token, abandoned
sessions, one client hoarding sessions or connections, huge replies, half-sent and trickled
requests, plain HTTP to a TLS port. Each service runs in a thread of this process on a tiny
model; other "clients" connect from other loopback addresses (127.0.0.2, ...)."""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import tiny_model

from fedtune import cli
from fedtune.logits import LocalLogits, LogitsServiceError, RemoteLogits
from fedtune.logits.guard import tls_context
from fedtune.logits.local import ServiceBusy, kv_bytes_per_token
from fedtune.logits.remote import TOKEN_ENV, TOKEN_FILE_ENV, remote_from_env, token_from_env
from fedtune.logits.service import LogitsHTTPServer, ServiceLimits, local_source

TOKEN = "test-token-0123456789"
V = 40  # the tiny model's vocabulary: one logits row is 160 bytes


class _Tok:
    """What LocalLogits reads of a tokenizer, for the tiny model's 40 ids."""

    pad_token_id = 0

    def __len__(self) -> int:
        return V

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(V)}


@contextmanager
def running(token: str | None = TOKEN, tls: Any = None, **limits: Any
            ) -> Iterator[tuple[LogitsHTTPServer, LocalLogits]]:
    """A service on 127.0.0.1 in a thread of this process, shut down on exit."""
    lim = ServiceLimits(**limits)
    src = local_source(tiny_model(), _Tok(), lim, "tiny")
    server = LogitsHTTPServer(src, "127.0.0.1", 0, token=token, limits=lim, tls=tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server, src
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _call(server: LogitsHTTPServer, method: str, path: str, payload: Any = None, *,
          auth: str | None = f"Bearer {TOKEN}", source: str = "127.0.0.1"
          ) -> tuple[int, dict[str, str], bytes]:
    """One request from the loopback address ``source``: (status, headers, body)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=10, source_address=(source, 0))
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
    body = None if payload is None else json.dumps(payload).encode()
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _start(server: LogitsHTTPServer, source: str = "127.0.0.1") -> tuple[int, str]:
    status, headers, body = _call(server, "POST", "/start", {"prefixes": [[1, 2, 3]]},
                                  source=source)
    return status, headers.get("X-Fedtune-Session", "") or json.loads(body).get("error", "")


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (None: still open after ``seconds``), sending
    ``trickle`` one byte per 0.1 s meanwhile."""
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        try:
            if i < len(trickle):
                sock.sendall(trickle[i:i + 1])
                i += 1
            if select.select([sock], [], [], 0.1)[0] and sock.recv(4096) == b"":
                return time.monotonic() - t0
        except OSError:  # reset by the server
            return time.monotonic() - t0
    return None


def _wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the service")
        time.sleep(0.02)


# -- 1. authentication --------------------------------------------------------------------------
def test_only_the_bearer_token_is_served():
    with running() as (srv, src):
        for auth in (None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN):
            assert _call(srv, "GET", "/info", auth=auth)[0] == 401, auth
            status, headers, body = _call(srv, "POST", "/start", {"prefixes": [[1]]}, auth=auth)
            assert status == 401 and "token" in json.loads(body)["error"]
            assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert src.open_sessions() == 0  # nothing was computed for them
        assert _call(srv, "GET", "/info")[0] == 200
        with pytest.raises(LogitsServiceError, match="HTTP 401"):
            RemoteLogits(srv.url).info()
        sid, logits = RemoteLogits(srv.url, token=TOKEN).start([[1, 2]])
        assert logits.shape == (1, V) and src.open_sessions() == 1


def test_without_a_token_only_a_loopback_address_is_served(monkeypatch, capsys, caplog):
    with pytest.raises(ValueError, match="without a token"):
        LogitsHTTPServer(LocalLogits(tiny_model(), _Tok()), "0.0.0.0", 0, token=None)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    # refused before the model is loaded: this one does not even exist
    assert cli.main(["serve-logits", "no-such-model", "--host", "0.0.0.0"]) == 1
    assert "without a token" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="fedtune.logits.service"):
        with running(token=None) as (srv, _):
            assert _call(srv, "GET", "/info", auth=None)[0] == 200
    assert "without a token" in caplog.text


def test_the_token_comes_from_the_environment_or_a_file(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert token_from_env() is None
    f = tmp_path / "token"
    f.write_text(f"{TOKEN}\n")
    f.chmod(0o600)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(f))
    with caplog.at_level(logging.WARNING):
        assert token_from_env() == TOKEN
    assert "readable by other users" not in caplog.text
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert token_from_env() == TOKEN
    assert "readable by other users" in caplog.text
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert token_from_env() == "from-env"  # the variable wins over the file
    f.write_text("\n")
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ValueError, match="empty"):
        token_from_env()
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with running() as (srv, _):
        assert remote_from_env(srv.url).info().vocab_size == V


# -- 2. sessions ----------------------------------------------------------------------------------
def test_one_client_cannot_take_every_session():
    with running(max_sessions=64, max_sessions_per_client=8) as (srv, src):
        mine = [_start(srv, "127.0.0.2") for _ in range(8)]
        assert all(status == 200 for status, _ in mine)
        status, err = _start(srv, "127.0.0.2")
        assert status == 429 and "limit per client" in err
        status, sid = _start(srv)  # another client still gets in
        assert status == 200
        # a session answers its own client only
        assert _call(srv, "POST", "/step", {"session": mine[0][1], "tokens": [4]})[0] == 404
        assert _call(srv, "POST", "/step", {"session": sid, "tokens": [4]})[0] == 200
        assert src.open_sessions() == 9


def test_abandoned_sessions_expire_without_anyone_asking():
    """64 abandoned sessions (8 clients x 8) fill the table: a newcomer gets 503 at first, and
    once they idle past the ttl the sweeper (not a /start) reclaims them and it gets in."""
    with running(max_sessions=64, max_sessions_per_client=8, session_ttl_s=600.0) as (srv, src):
        for c in range(8):
            for _ in range(8):
                src.start([[1, 2, 3]], owner=f"127.0.0.{c + 2}")  # as the handler would
        assert src.open_sessions() == 64
        status, err = _start(srv)
        assert status == 503 and "64 sessions are open" in err
        src.ttl_s = 1.0  # now they are abandoned (a short ttl from the start expires some of
        # them while the 64 are still being opened on a loaded machine)
        deadline = time.monotonic() + 10
        while src.open_sessions() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert src.open_sessions() == 0
        assert _start(srv)[0] == 200


def test_the_kv_cache_cap_refuses_with_503():
    model = tiny_model()
    assert kv_bytes_per_token(model) == 2 * 1 * 2 * 8 * 4  # K and V, 1 layer, 2 heads of 8, f32
    with running(max_cache_mb=10 * 128 / 2**20) as (srv, src):  # 10 cached tokens
        assert src.max_cache_tokens == 10
        status, headers, _ = _call(srv, "POST", "/start", {"prefixes": [[1, 2, 3, 4], [5]]})
        assert status == 200  # 2 rows x 4 positions = 8 tokens
        sid = headers["X-Fedtune-Session"]
        status, _, body = _call(srv, "POST", "/start", {"prefixes": [[1, 2, 3]]})
        assert status == 503 and "cap of 10" in json.loads(body)["error"]
        assert _call(srv, "POST", "/extend", {"session": sid, "tokens": [[1, 2], [3, 4]]}
                     )[0] == 503
        assert _call(srv, "POST", "/step", {"session": sid, "tokens": [1, 2]})[0] == 200
    with pytest.raises(ServiceBusy):
        LocalLogits(model, _Tok(), max_cache_tokens=3).start([[1, 2, 3, 4]])


# -- 3. replies -----------------------------------------------------------------------------------
def test_a_reply_over_the_cap_is_refused_before_anything_is_computed():
    with running(max_response_bytes=1000) as (srv, src):  # 6 rows of 160 bytes
        forwards = []
        src.model.register_forward_hook(lambda *_: forwards.append(1))
        client = RemoteLogits(srv.url, token=TOKEN)
        sid, _ = client.start([[1, 2, 3], [4, 5]])
        n = len(forwards)
        status, _, body = _call(srv, "POST", "/extend",
                                {"session": sid, "tokens": [[1, 2, 3, 4]] * 2})
        assert status == 413 and "limit of 1000" in json.loads(body)["error"]
        status, _, _ = _call(srv, "POST", "/start", {"prefixes": [[1]] * 7})
        assert status == 413 and len(forwards) == n
        # the client splits what the cap forbids in one reply: 3 tokens (960 bytes) at a time
        block = [[(7 * i + j) % V for j in range(8)] for i in range(2)]
        got = client.extend(sid, block)
        assert len(forwards) == n + 3
        ref = LocalLogits(src.model, _Tok())
        rid, _ = ref.start([[1, 2, 3], [4, 5]])
        torch.testing.assert_close(got, ref.extend(rid, block), rtol=1e-5, atol=1e-5)


# -- 4. connections -------------------------------------------------------------------------------
def test_a_half_sent_request_is_cut_off_and_the_service_keeps_serving():
    with running(request_timeout_s=0.5) as (srv, _):
        head = (f"POST /start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
        with socket.create_connection(srv.server_address[:2]) as s:
            s.sendall(head + b'{"prefixes')  # 10 of the 100 bytes, then nothing
            waited = _closed_within(s, 10)
        assert waited is not None and 0.3 < waited < 5
        with socket.create_connection(srv.server_address[:2]) as s:  # one byte per 0.1 s
            waited = _closed_within(s, 10, trickle=head + b"x" * 100)
        assert waited is not None and waited < 5
        assert _call(srv, "GET", "/info")[0] == 200


def test_connections_over_the_cap_are_refused_until_some_close():
    with running(max_connections=3, max_connections_per_client=2, request_timeout_s=30) \
            as (srv, _):
        addr = srv.server_address[:2]
        idle = [socket.create_connection(addr, source_address=("127.0.0.2", 0))
                for _ in range(2)]
        try:
            _wait_for(lambda: srv.open_connections() == 2)
            with socket.create_connection(addr, source_address=("127.0.0.2", 0)) as s:
                s.settimeout(5)
                assert s.recv(100).startswith(b"HTTP/1.1 503")
            assert _call(srv, "GET", "/info", source="127.0.0.3")[0] == 200
            _wait_for(lambda: srv.open_connections() == 2)
            idle.append(socket.create_connection(addr, source_address=("127.0.0.3", 0)))
            _wait_for(lambda: srv.open_connections() == 3)
            with socket.create_connection(addr, source_address=("127.0.0.4", 0)) as s:
                s.settimeout(5)
                assert s.recv(100).startswith(b"HTTP/1.1 503")  # 3 in all
        finally:
            for s in idle:
                s.close()
        _wait_for(lambda: srv.open_connections() == 0)  # the closed ones' slots are free
        assert _call(srv, "GET", "/info", source="127.0.0.4")[0] == 200


# -- 5. TLS ---------------------------------------------------------------------------------------
def test_tls_with_the_ca_file_and_nothing_in_clear(tmp_path):
    from fedtune.federation.flower.certs import make_certs

    certs = make_certs(tmp_path, nodes=0)
    ctx = tls_context(str(certs.server_cert), str(certs.server_key))
    with running(tls=ctx, request_timeout_s=0.5) as (srv, _):
        assert srv.url.startswith("https://")
        client = RemoteLogits(srv.url, token=TOKEN, ca_file=str(certs.ca_cert))
        with socket.create_connection(srv.server_address[:2]) as stalled:  # no ClientHello
            assert client.start([[1, 2]])[1].shape == (1, V)  # the accept loop is not held
            waited = _closed_within(stalled, 10)
        assert waited is not None and waited < 5
        with pytest.raises(LogitsServiceError, match="CERTIFICATE_VERIFY_FAILED"):
            RemoteLogits(srv.url, token=TOKEN).info()  # not signed by a CA it knows
        with pytest.raises(LogitsServiceError):
            RemoteLogits(srv.url.replace("https", "http"), token=TOKEN).info()
        assert client.info().vocab_size == V  # still serving
    with pytest.raises(ValueError, match="https"):
        RemoteLogits("http://127.0.0.1:1", ca_file=str(certs.ca_cert))
