"""Client of ``fedtune serve-logits``: a :class:`fedtune.logits.source.LogitsSource` over HTTP.

Holds no weights: every call is one HTTP request (stdlib ``urllib``; one connection per request,
which on localhost costs well under a millisecond). Logits arrive as raw float32, so they are
bit for bit what the service's model computed.

Credentials: ``token`` is sent as ``Authorization: Bearer TOKEN``; an ``https://`` URL is checked
against ``ca_file`` (else the system's CAs). A run that reaches a service someone else started
(``large_access = 'url'``, ``fedtune eval --large-url``) takes them from the environment, never
from a config file or the command line, where they would be stored or visible in ``ps``:
``FEDTUNE_LOGITS_TOKEN`` (the token), or ``FEDTUNE_LOGITS_TOKEN_FILE`` (a file holding it), and
``FEDTUNE_LOGITS_CA_FILE`` (:func:`remote_from_env`). The service reads the same variables.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import math
import os
import ssl
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedtune.logits.source import SourceInfo, TopLogits, cat_top

log = logging.getLogger(__name__)
TOKEN_ENV = "FEDTUNE_LOGITS_TOKEN"
TOKEN_FILE_ENV = "FEDTUNE_LOGITS_TOKEN_FILE"
CA_FILE_ENV = "FEDTUNE_LOGITS_CA_FILE"


class LogitsServiceError(RuntimeError):
    """The service refused a request (``status`` 4xx) or failed (5xx), or could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"logits service: HTTP {status}: {message}" if status
                         else f"logits service: {message}")


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding white space dropped); warns if others may read it."""
    p = Path(path)
    token = p.read_text().strip()
    if not token:
        raise ValueError(f"token file {p} is empty")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users (chmod 600 it)", p)
    return token


def token_from_env() -> str | None:
    """``FEDTUNE_LOGITS_TOKEN``, else the contents of ``FEDTUNE_LOGITS_TOKEN_FILE``, else None."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_FILE_ENV):
        return read_token_file(os.environ[TOKEN_FILE_ENV])
    return None


def remote_from_env(url: str, timeout: float = 120.0) -> RemoteLogits:
    """A client of a service this process did not start, credentials from the environment."""
    return RemoteLogits(url, timeout, token=token_from_env(),
                        ca_file=os.environ.get(CA_FILE_ENV) or None)


def _is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteLogits:
    """``token``: the service's bearer token; ``ca_file``: the CA that signed an https
    service's certificate (a self-signed one, typically)."""

    def __init__(self, url: str, timeout: float = 120.0, *, token: str | None = None,
                 ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._info: SourceInfo | None = None
        self._max_reply = 0  # the service's cap on one reply's bytes (0: none announced)
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        https = self.url.startswith("https://")
        if ca_file and not https:
            raise ValueError(f"ca_file {ca_file} needs an https:// URL, not {self.url}")
        self._ssl = ssl.create_default_context(cafile=ca_file) if https else None
        if token and not https and not _is_loopback_url(self.url):
            log.warning("sending the logits token in clear text to %s (use https)", self.url)

    def _request(self, path: str, payload: dict[str, Any] | None) -> tuple[bytes, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                return resp.read(), resp.headers
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = body.decode(errors="replace")[:500]
            raise LogitsServiceError(e.code, message) from None
        except urllib.error.URLError as e:
            raise LogitsServiceError(0, f"cannot reach {self.url}: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # reset, refused at the cap, time-out
            raise LogitsServiceError(0, f"{self.url}{path} failed: {e!r}") from None

    def info(self) -> SourceInfo:
        if self._info is None:
            body, _ = self._request("/info", None)
            doc = json.loads(body)
            self._info = SourceInfo.from_dict(doc)
            self._max_reply = int(doc.get("max_response_bytes") or 0)
        return self._info

    def _logits(self, body: bytes, headers: Any, want: tuple[int, ...]
                ) -> tuple[str, torch.Tensor]:
        shape = tuple(int(x) for x in headers.get("X-Fedtune-Shape", "0").split(","))
        want = want + (self.info().logits_width,)
        if shape != want or len(body) != math.prod(want) * 4:
            raise LogitsServiceError(0, f"reply of {len(body)} bytes, shape {shape}, does not "
                                        f"hold {want} float32 logits")
        logits = torch.frombuffer(bytearray(body), dtype=torch.float32).view(want)
        return headers.get("X-Fedtune-Session", ""), logits

    def _top(self, body: bytes, headers: Any, want: tuple[int, ...], k: int
             ) -> tuple[str, TopLogits]:
        shape = tuple(int(x) for x in headers.get("X-Fedtune-Shape", "0").split(","))
        cells = math.prod(want)
        if (headers.get("X-Fedtune-Top-K") != str(k) or shape != want + (k,)
                or len(body) != cells * (8 * k + 4)):
            raise LogitsServiceError(0, f"reply of {len(body)} bytes, shape {shape}, does not "
                                        f"hold the top {k} logits of {want} positions")
        n = cells * k * 4
        values = torch.frombuffer(bytearray(body[:n]), dtype=torch.float32).view(want + (k,))
        ids = torch.frombuffer(bytearray(body[n:2 * n]), dtype=torch.int32).view(want + (k,))
        lse = torch.frombuffer(bytearray(body[2 * n:]), dtype=torch.float32).view(want)
        return headers.get("X-Fedtune-Session", ""), TopLogits(values, ids.long(), lse)

    def start_top(self, prefixes: Sequence[Sequence[int]], k: int) -> tuple[str, TopLogits]:
        rows = [[int(t) for t in p] for p in prefixes]
        body, headers = self._request("/start", {"prefixes": rows, "top_k": int(k)})
        return self._top(body, headers, (len(rows),), int(k))

    def extend_top(self, session: str, tokens: Sequence[Sequence[int]], k: int) -> TopLogits:
        """:meth:`extend` as :class:`TopLogits` (B, k_tokens, k), split to fit the reply cap."""
        rows, k = [[int(t) for t in r] for r in tokens], int(k)
        parts = []
        for piece in self._pieces(rows, 8 * k + 4):
            body, headers = self._request("/extend", {"session": session, "tokens": piece,
                                                      "top_k": k})
            parts.append(self._top(body, headers, (len(piece), len(piece[0]) if piece else 0),
                                   k)[1])
        return parts[0] if len(parts) == 1 else cat_top(parts, dim=1)

    def start(self, prefixes: Sequence[Sequence[int]]) -> tuple[str, torch.Tensor]:
        rows = [[int(t) for t in p] for p in prefixes]
        body, headers = self._request("/start", {"prefixes": rows})
        return self._logits(body, headers, (len(rows),))

    def step(self, session: str, tokens: Sequence[int]) -> torch.Tensor:
        body, headers = self._request("/step", {"session": session,
                                                "tokens": [int(t) for t in tokens]})
        return self._logits(body, headers, (len(tokens),))[1]

    def extend(self, session: str, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, k, V) logits, asked for in as few requests as the service's reply cap allows
        (the KV cache makes k tokens in pieces the same as k at once, up to float rounding)."""
        rows = [[int(t) for t in r] for r in tokens]
        parts = [self._extend(session, piece)
                 for piece in self._pieces(rows, self.info().logits_width * 4)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _pieces(self, rows: list[list[int]], cell_bytes: int) -> list[list[list[int]]]:
        """``rows`` cut into column blocks whose replies (``cell_bytes`` per row and column)
        fit the service's announced cap (one block when there is none)."""
        k = len(rows[0]) if rows else 0
        per_column = len(rows) * cell_bytes
        self.info()  # learns the cap
        chunk = max(1, self._max_reply // per_column) if self._max_reply and per_column else k
        return [[r[j:j + chunk] for r in rows] for j in range(0, max(k, 1), max(chunk, 1))]

    def _extend(self, session: str, rows: list[list[int]]) -> torch.Tensor:
        body, headers = self._request("/extend", {"session": session, "tokens": rows})
        return self._logits(body, headers, (len(rows), len(rows[0]) if rows else 0))[1]

    def close(self, session: str) -> None:
        self._request("/close", {"session": session})
