"""Client of ``fedtune serve-logits``: a :class:`fedtune.logits.source.LogitsSource` over HTTP.

Holds no weights: every call is one HTTP request (stdlib ``urllib``; one connection per request,
which on localhost costs well under a millisecond). Logits arrive as raw float32, so they are
bit for bit what the service's model computed.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import torch

from fedtune.logits.source import SourceInfo


class LogitsServiceError(RuntimeError):
    """The service refused a request (``status`` 4xx) or failed (5xx), or could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"logits service: HTTP {status}: {message}" if status
                         else f"logits service: {message}")


class RemoteLogits:
    def __init__(self, url: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._info: SourceInfo | None = None

    def _request(self, path: str, payload: dict[str, Any] | None) -> tuple[bytes, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
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

    def info(self) -> SourceInfo:
        if self._info is None:
            body, _ = self._request("/info", None)
            self._info = SourceInfo.from_dict(json.loads(body))
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

    def start(self, prefixes: Sequence[Sequence[int]]) -> tuple[str, torch.Tensor]:
        rows = [[int(t) for t in p] for p in prefixes]
        body, headers = self._request("/start", {"prefixes": rows})
        return self._logits(body, headers, (len(rows),))

    def step(self, session: str, tokens: Sequence[int]) -> torch.Tensor:
        body, headers = self._request("/step", {"session": session,
                                                "tokens": [int(t) for t in tokens]})
        return self._logits(body, headers, (len(tokens),))[1]

    def extend(self, session: str, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = [[int(t) for t in r] for r in tokens]
        body, headers = self._request("/extend", {"session": session, "tokens": rows})
        return self._logits(body, headers, (len(rows), len(rows[0]) if rows else 0))[1]

    def close(self, session: str) -> None:
        self._request("/close", {"session": session})
