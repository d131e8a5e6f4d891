"""``fedtune serve-logits MODEL``: a model's next-token logits over HTTP, and nothing else.

The FedPT server reaches the large model only through this service (:class:`.remote.RemoteLogits`
is its client); weights and gradients never leave the process. Endpoints (JSON requests):

* ``GET /info``: :class:`fedtune.logits.source.SourceInfo` as JSON (logits width, vocabulary
  size, tokenizer hash, context, batch limit), so a client can check the tokenizer remotely;
* ``POST /start`` ``{"prefixes": [[id, ...], ...]}``: opens an incremental decoding session;
* ``POST /step`` ``{"session": ID, "tokens": [id, ...]}``: one token per row;
* ``POST /extend`` ``{"session": ID, "tokens": [[id, ...], ...]}``: k tokens per row at once
  (teacher forcing), answered with (B, k, V) logits;
* ``POST /close`` ``{"session": ID}``.

``/start``, ``/step`` and ``/extend`` answer with the raw little-endian float32 logits (exact,
and ~4x smaller than JSON floats), the session id in ``X-Fedtune-Session`` and the shape in
``X-Fedtune-Shape``. A bad request (malformed JSON, ids outside [0, vocab), an oversize batch or
body, an unknown or expired session) gets a 4xx status with ``{"error": MESSAGE}`` and the service
keeps serving. The model runs one request at a time; idle sessions expire.
"""

from __future__ import annotations

import json
import logging
import os
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

from fedtune.logits.local import LocalLogits, LogitsRequestError, UnknownSession

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 << 20


class _Handler(BaseHTTPRequestHandler):
    server: LogitsHTTPServer
    protocol_version = "HTTP/1.1"

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
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def _logits(self, sid: str, logits: torch.Tensor) -> None:
        shape = ",".join(str(d) for d in logits.shape)
        body = logits.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        self._send(200, body, "application/octet-stream",
                   {"X-Fedtune-Session": sid, "X-Fedtune-Shape": shape})

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        if self.path == "/info":
            info = self.server.source.info().to_dict()
            self._send(200, json.dumps(info).encode(), "application/json")
        else:
            self._error(404, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            self._error(411, "a Content-Length header is required")
            return
        if length > MAX_BODY_BYTES:
            self._error(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            self.close_connection = True  # the unread body must not be parsed as a request
            return
        raw = self.rfile.read(length)
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("the request must be a JSON object")
        except ValueError as e:
            self._error(400, f"malformed JSON request: {e}")
            return
        src = self.server.source
        try:
            if self.path == "/start":
                sid, logits = src.start(req.get("prefixes"))  # type: ignore[arg-type]
                self._logits(sid, logits)
            elif self.path in ("/step", "/extend", "/close"):
                session = req.get("session")
                if not isinstance(session, str):
                    raise LogitsRequestError("'session' must be a string")
                tokens = req.get("tokens")
                if self.path == "/step":
                    self._logits(session, src.step(session, tokens))  # type: ignore[arg-type]
                elif self.path == "/extend":
                    self._logits(session, src.extend(session, tokens))  # type: ignore[arg-type]
                else:
                    src.close(session)
                    self._send(200, json.dumps({"closed": session}).encode(),
                               "application/json")
            else:
                self._error(404, f"no such endpoint: POST {self.path}")
        except UnknownSession as e:
            self._error(404, str(e))
        except LogitsRequestError as e:
            self._error(400, str(e))
        except Exception as e:  # a bug must not take the service down for the other clients
            log.exception("request failed")
            self._error(500, f"internal error: {type(e).__name__}: {e}")


class LogitsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, source: LocalLogits, host: str, port: int) -> None:
        self.source = source
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


def serve(model_path: str, host: str = "127.0.0.1", port: int = 0, *, dtype: str = "float32",
          device: str = "auto", max_batch: int = 64, ttl_s: float = 600.0,
          threads: int = 0, ready_file: str | None = None, parent_pid: int = 0) -> None:
    """Load ``model_path`` and serve its logits until interrupted (``port`` 0: a free port).

    The bound address is printed, and written to ``ready_file`` once the service accepts
    requests (written to a temporary name, then renamed, so a reader never sees half of it).
    ``threads`` > 0 caps torch's CPU threads (a service sharing cores with its client).
    ``parent_pid`` > 0: stop serving once that process is gone (a run that started the service
    and was killed must not leave it behind).
    """
    from fedtune.models.loading import load_model_and_tokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    model, tok = load_model_and_tokenizer(model_path, dtype, device)
    server = LogitsHTTPServer(LocalLogits(model, tok, max_batch=max_batch, ttl_s=ttl_s,
                                          name=str(model_path)), host, port)
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
    """A ``fedtune serve-logits`` child process started by :func:`spawn_service`."""

    url: str
    process: subprocess.Popen[bytes]

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
    """Start ``fedtune serve-logits MODEL --port 0`` as a child process; wait until it serves."""
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "url"
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune.cli", "serve-logits", str(model_path),
                 "--host", host, "--port", "0", "--dtype", dtype, "--device", device,
                 "--max-batch", str(max_batch), "--threads", str(threads),
                 "--parent-pid", str(os.getpid()), "--ready-file", str(ready)],
                stdout=out, stderr=subprocess.STDOUT)
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
        return ServiceProcess(ready.read_text().strip(), proc)
