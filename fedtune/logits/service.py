"""``fedtune serve-logits MODEL``: a model's next-token logits over HTTP, and nothing else.

The FedPT server reaches the large model only through this service (:class:`.remote.RemoteLogits`
is its client); weights and gradients never leave the process. Endpoints (JSON requests):

* ``GET /info``: :class:`fedtune.logits.source.SourceInfo` as JSON (logits width, vocabulary
  size, tokenizer hash, context, batch limit) and ``max_response_bytes``, so a client can check
  the tokenizer remotely and size its requests;
* ``POST /start`` ``{"prefixes": [[id, ...], ...]}``: opens an incremental decoding session;
* ``POST /step`` ``{"session": ID, "tokens": [id, ...]}``: one token per row;
* ``POST /extend`` ``{"session": ID, "tokens": [[id, ...], ...]}``: k tokens per row at once
  (teacher forcing), answered with (B, k, V) logits;
* ``POST /close`` ``{"session": ID}``.

``/start``, ``/step`` and ``/extend`` take an optional ``"top_k": k`` (1 to 1024): the reply
then holds, per position, the k largest logits (float32), their token ids (int32) and the
log-sum-exp of the whole row (float32), with ``X-Fedtune-Top-K: k``
(:class:`fedtune.logits.source.TopLogits`): 381x fewer bytes for a 49,152-token vocabulary at
k = 64, which is what distillation from a remote teacher needs.

``/start``, ``/step`` and ``/extend`` answer with the raw little-endian float32 logits (exact,
and ~4x smaller than JSON floats), the session id in ``X-Fedtune-Session`` and the shape in
``X-Fedtune-Shape``. A bad request (malformed JSON, ids outside [0, vocab), an oversize batch or
body, an unknown or expired session) gets a 4xx status with ``{"error": MESSAGE}`` and the service
keeps serving. The model runs one request at a time.

What a client may cost is bounded (:class:`ServiceLimits`), because whoever reaches the port can
otherwise hold its memory and threads:

* authentication: with a token every request needs ``Authorization: Bearer TOKEN`` (compared in
  constant time) or gets 401; without one the service binds only a loopback address;
* sessions: idle ones expire after ``session_ttl_s`` (a sweeper reclaims them, not only the next
  ``/start``); one client address holds at most ``max_sessions_per_client`` (429), all together
  at most ``max_sessions`` and ``max_cache_mb`` of KV cache (503);
* replies: one reply holds at most ``max_response_bytes`` (B * k * V * 4), refused with 413 before
  anything is computed (:meth:`RemoteLogits.extend` splits its k to fit);
* connections: a request must arrive whole within ``request_timeout_s`` (a stalled or trickling
  sender is cut off) and a reply be read at >= 1 MB/s past it; at most ``max_connections`` are
  served at once, ``max_connections_per_client`` per address, more are refused with 503;
* transport: ``tls`` wraps the socket in TLS (the handshake too runs under the time-out).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from fedtune.logits.guard import BUSY, Deadlines, Slots, is_loopback_host
from fedtune.logits.local import (
    LocalLogits,
    LogitsRequestError,
    ServiceBusy,
    SessionLimit,
    UnknownSession,
    kv_bytes_per_token,
)
from fedtune.logits.remote import TOKEN_ENV, TOKEN_FILE_ENV, RemoteLogits
from fedtune.logits.source import TopLogits, top_logits

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 << 20
MIN_READ_RATE = 1 << 20  # bytes/s a client must read a reply at (past request_timeout_s)


@dataclass(frozen=True)
class ServiceLimits:
    """What the service spends on its clients (``fedtune serve-logits --help`` for each)."""

    max_batch: int = 64  # rows per session
    max_sessions: int = 64
    max_sessions_per_client: int = 8
    session_ttl_s: float = 600.0
    max_cache_mb: float = 4096.0  # KV cache of all sessions together (0: no cap)
    max_response_bytes: int = 64 << 20
    request_timeout_s: float = 30.0
    max_connections: int = 64
    max_connections_per_client: int = 16


def local_source(model: Any, tokenizer: Any, limits: ServiceLimits, name: str = "") -> LocalLogits:
    """The model's :class:`LocalLogits` with the session limits of ``limits``."""
    per_token = kv_bytes_per_token(model)
    cache_tokens = int(limits.max_cache_mb * 2**20 // per_token) if per_token else 0
    if limits.max_cache_mb and not per_token:
        log.warning("cannot tell the KV cache's bytes per token of %s: no cache cap", name)
    return LocalLogits(model, tokenizer, max_batch=limits.max_batch,
                       max_sessions=limits.max_sessions, ttl_s=limits.session_ttl_s,
                       max_sessions_per_owner=limits.max_sessions_per_client,
                       max_cache_tokens=cache_tokens, name=name)


def _reply_bytes(path: str, req: dict[str, Any], width: int) -> int:
    """Bytes of the logits a well-formed request would get (0 if malformed: the source says)."""
    key = "prefixes" if path == "/start" else "tokens"
    rows = req.get(key)
    if not isinstance(rows, list) or path not in ("/start", "/step", "/extend"):
        return 0
    cells = sum(len(r) if isinstance(r, list) else 0 for r in rows) if path == "/extend" \
        else len(rows)
    k = req.get("top_k")
    if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= width:
        return cells * (k * 8 + 4)  # values, ids, one log-sum-exp
    return cells * width * 4


class _Handler(BaseHTTPRequestHandler):
    server: LogitsHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.limit_s = self.server.limits.request_timeout_s
        self.server.deadlines.arm(self.request, self.limit_s)
        try:
            self.request.settimeout(self.limit_s)  # each socket read and write
            if isinstance(self.request, ssl.SSLSocket):  # here, not in accept(): under time-out
                self.request.do_handshake()
            super().setup()
        except BaseException:
            self.server.deadlines.disarm(self.request)
            raise

    def handle_one_request(self) -> None:
        self.server.deadlines.arm(self.request, self.limit_s)  # the whole request, not per read
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.disarm(self.request)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        # a client that stops reading must not hold the thread (and the reply) for good
        self.request.settimeout(self.limit_s + len(body) / MIN_READ_RATE)
        self.wfile.write(body)
        self.request.settimeout(self.limit_s)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        log.info("%s %s %s -> %d: %s", self.client_address[0], self.command, self.path, status,
                 message)
        self._send(status, json.dumps({"error": message}).encode(), "application/json", headers)

    def _logits(self, sid: str, logits: torch.Tensor | TopLogits) -> None:
        if isinstance(logits, TopLogits):
            shape = ",".join(str(d) for d in logits.values.shape)
            body = b"".join([logits.values.contiguous().numpy().astype("<f4").tobytes(),
                             logits.indices.contiguous().numpy().astype("<i4").tobytes(),
                             logits.lse.contiguous().numpy().astype("<f4").tobytes()])
            self._send(200, body, "application/octet-stream",
                       {"X-Fedtune-Session": sid, "X-Fedtune-Shape": shape,
                        "X-Fedtune-Top-K": str(logits.values.shape[-1])})
            return
        shape = ",".join(str(d) for d in logits.shape)
        body = logits.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        self._send(200, body, "application/octet-stream",
                   {"X-Fedtune-Session": sid, "X-Fedtune-Shape": shape})

    def _authorized(self) -> bool:
        """The bearer token, compared in constant time (as digests: the length stays hidden)."""
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            hashlib.sha256(given.strip().encode("latin-1", "replace")).digest(),
            hashlib.sha256(token.encode()).digest())
        if not ok:
            self.close_connection = True  # an unread body must not be parsed as a request
            self._error(401, "missing or wrong token (send 'Authorization: Bearer TOKEN')",
                        {"WWW-Authenticate": 'Bearer realm="fedtune-logits"'})
        return ok

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self.server.deadlines.disarm(self.request)
        if not self._authorized():
            return
        if self.path == "/info":
            info = self.server.source.info().to_dict()
            info["max_response_bytes"] = self.server.limits.max_response_bytes
            self._send(200, json.dumps(info).encode(), "application/json")
        else:
            self._error(404, f"no such endpoint: GET {self.path}")

    def _read_json(self) -> dict[str, Any] | None:
        """The request body as a JSON object, or None once an error is answered."""
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            self._error(411, "a Content-Length header is required")
            return None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as a request
            self._error(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            return None
        raw = self.rfile.read(length)
        self.server.deadlines.disarm(self.request)
        if len(raw) < length:  # cut off (time-out) or the client went away: no one to answer
            self.close_connection = True
            return None
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("the request must be a JSON object")
        except ValueError as e:
            self._error(400, f"malformed JSON request: {e}")
            return None
        return req

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        if not self._authorized():
            return
        req = self._read_json()
        if req is None:
            return
        src, owner = self.server.source, self.client_address[0]
        size, cap = _reply_bytes(self.path, req, src.info().logits_width), \
            self.server.limits.max_response_bytes
        try:
            if size > cap:
                self._error(413, f"the reply would hold {size} bytes of logits, over the "
                                 f"service's limit of {cap}: ask for fewer rows or tokens")
            elif self.path == "/start":
                prefixes = req.get("prefixes")
                if "top_k" in req:
                    self._logits(*src.start_top(prefixes, req["top_k"], owner))  # type: ignore[arg-type]
                else:
                    self._logits(*src.start(prefixes, owner))  # type: ignore[arg-type]
            elif self.path in ("/step", "/extend", "/close"):
                self._session_call(req, owner)
            else:
                self._error(404, f"no such endpoint: POST {self.path}")
        except UnknownSession as e:
            self._error(404, str(e))
        except SessionLimit as e:
            self._error(429, str(e))
        except ServiceBusy as e:
            self._error(503, str(e), {"Retry-After": "5"})
        except LogitsRequestError as e:
            self._error(400, str(e))
        except Exception as e:  # a bug must not take the service down for the other clients
            log.exception("request failed")
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    def _session_call(self, req: dict[str, Any], owner: str) -> None:
        src, session, tokens = self.server.source, req.get("session"), req.get("tokens")
        if not isinstance(session, str):
            raise LogitsRequestError("'session' must be a string")
        top = "top_k" in req
        k = src.check_top_k(req["top_k"]) if top else 0
        if self.path == "/step":
            logits = src.step(session, tokens, owner)  # type: ignore[arg-type]
            self._logits(session, top_logits(logits, k) if top else logits)
        elif self.path == "/extend":
            self._logits(session, src.extend_top(session, tokens, k, owner) if top  # type: ignore[arg-type]
                         else src.extend(session, tokens, owner))  # type: ignore[arg-type]
        else:
            src.close(session, owner)
            self._send(200, json.dumps({"closed": session}).encode(), "application/json")


class LogitsHTTPServer(ThreadingHTTPServer):
    """The service. ``token`` None serves anyone who reaches the port, so it is refused on a
    host other than loopback (where the machine's users are the ones it trusts)."""

    daemon_threads = True

    def __init__(self, source: LocalLogits, host: str, port: int, *, token: str | None = None,
                 limits: ServiceLimits | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        if token is None and not is_loopback_host(host):
            raise ValueError(f"refusing to serve on {host!r} (not a loopback address) without a "
                             f"token: give --token-file FILE or set {TOKEN_ENV}")
        if token is None:
            log.warning("serving without a token: every user of this machine can use it")
        self.source = source
        self.token = token
        self.limits = limits or ServiceLimits()
        self.deadlines = Deadlines()
        self._slots = Slots(self.limits.max_connections, self.limits.max_connections_per_client)
        self._closing = threading.Event()
        super().__init__((host, port), _Handler)
        if tls is not None:  # the handshake runs in the request's thread (_Handler.setup)
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
        threading.Thread(target=self._sweep, daemon=True, name="logits-sweeper").start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://{host!s}:{port}"

    def open_connections(self) -> int:
        """Connections being served now."""
        return self._slots.held()

    def _sweep(self) -> None:
        """Cut overdue requests; drop expired sessions (without waiting behind the model)."""
        tick = min(1.0, max(0.05, self.limits.request_timeout_s / 4))
        while not self._closing.wait(tick):
            if self.deadlines.cut_overdue():
                log.info("cut off requests not received within %g s",
                         self.limits.request_timeout_s)
            if dropped := self.source.expire(blocking=False):
                log.info("dropped %d sessions idle for over %g s", dropped,
                         self.limits.session_ttl_s)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.take(client_address[0]):
            log.warning("refused a connection from %s: too many open", client_address[0])
            if not isinstance(request, ssl.SSLSocket):  # TLS: no handshake yet, just close
                try:
                    request.setblocking(False)  # never wait in the accepting thread
                    request.send(BUSY)
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.free(client_address[0])
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.free(client_address[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A dropped or broken connection is one line, not a traceback."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            log.info("connection from %s dropped: %s", client_address[0], err)
        else:
            log.exception("connection from %s failed", client_address[0])

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()


def serve(model_path: str, host: str = "127.0.0.1", port: int = 0, *, dtype: str = "float32",
          device: str = "auto", limits: ServiceLimits | None = None, token: str | None = None,
          tls: ssl.SSLContext | None = None, threads: int = 0, ready_file: str | None = None,
          parent_pid: int = 0) -> None:
    """Load ``model_path`` and serve its logits until interrupted (``port`` 0: a free port).

    The bound address is printed, and written to ``ready_file`` once the service accepts
    requests (written to a temporary name, then renamed, so a reader never sees half of it).
    ``threads`` > 0 caps torch's CPU threads (a service sharing cores with its client).
    ``parent_pid`` > 0: stop serving once that process is gone (a run that started the service
    and was killed must not leave it behind).
    """
    from fedtune.models.loading import load_model_and_tokenizer

    if token is None and not is_loopback_host(host):  # before minutes of loading, too
        raise ValueError(f"refusing to serve on {host!r} (not a loopback address) without a "
                         f"token: give --token-file FILE or set {TOKEN_ENV}")
    limits = limits or ServiceLimits()
    if threads > 0:
        torch.set_num_threads(threads)
    model, tok = load_model_and_tokenizer(model_path, dtype, device)
    server = LogitsHTTPServer(local_source(model, tok, limits, str(model_path)), host, port,
                              token=token, limits=limits, tls=tls)
    print(f"fedtune: serving the logits of {model_path} on {server.url}", flush=True)
    if parent_pid > 0:
        threading.Thread(target=_watch_parent, args=(server, parent_pid), daemon=True).start()
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(server.url)
        os.replace(tmp, ready_file)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _watch_parent(server: LogitsHTTPServer, pid: int) -> None:
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            log.info("parent process %d is gone; stopping", pid)
            server.shutdown()
            return
        except PermissionError:  # exists, owned by someone else
            pass


@dataclass
class ServiceProcess:
    """A ``fedtune serve-logits`` child process started by :func:`spawn_service`, and the token
    it was given (left out of the repr: it must not reach a log)."""

    url: str
    process: subprocess.Popen[bytes]
    token: str = ""
    timeout: float = 120.0

    def __repr__(self) -> str:
        return f"ServiceProcess(url={self.url!r}, pid={self.process.pid})"

    def client(self) -> RemoteLogits:
        """A client that sends this service's token."""
        return RemoteLogits(self.url, self.timeout, token=self.token or None)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def spawn_service(model_path: str, *, host: str = "127.0.0.1", dtype: str = "float32",
                  device: str = "cpu", max_batch: int = 64, threads: int = 0,
                  timeout: float = 120.0, log_path: str | None = None) -> ServiceProcess:
    """Start ``fedtune serve-logits MODEL --port 0`` as a child process; wait until it serves.

    The child gets a fresh token in its environment (``FEDTUNE_LOGITS_TOKEN``), never on its
    command line, which every user of the machine can read with ``ps``.
    """
    token = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if k != TOKEN_FILE_ENV} | {TOKEN_ENV: token}
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "url"
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune.cli", "serve-logits", str(model_path),
                 "--host", host, "--port", "0", "--dtype", dtype, "--device", device,
                 "--max-batch", str(max_batch), "--threads", str(threads),
                 "--parent-pid", str(os.getpid()), "--ready-file", str(ready)],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        finally:
            if log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while not ready.is_file():
            if proc.poll() is not None:
                raise RuntimeError(f"serve-logits {model_path} exited with {proc.returncode} "
                                   f"before serving" + (f" (see {log_path})" if log_path else ""))
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"serve-logits {model_path} did not start in {timeout} s")
            time.sleep(0.05)
        return ServiceProcess(ready.read_text().strip(), proc, token)
