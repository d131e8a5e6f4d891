"""Connection guards of ``fedtune serve-logits``: request deadlines, connection slots, the
canned busy reply, the loopback test and the TLS context. Kept apart from the HTTP handler so
each is small and testable on its own."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time


class Deadlines:
    """Sockets still receiving a request, and when each must have all of it.

    The socket time-out bounds one stalled read; a client sending a byte every few seconds
    would renew it for ever, so the sweeper shuts down whatever is overdue.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}

    def arm(self, sock: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + seconds

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def cut_overdue(self) -> int:
        now = time.monotonic()
        with self._lock:
            late = [s for s, due in self._due.items() if due <= now]
            for s in late:
                del self._due[s]
        for s in late:
            try:  # the plain socket's shutdown: the blocked reader sees end of file
                socket.socket.shutdown(s, socket.SHUT_RDWR)
            except OSError:
                pass
        return len(late)


class Slots:
    """Connections being served, in all and per client address."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def take(self, client: str) -> bool:
        with self._lock:
            if (sum(self._held.values()) >= self.total
                    or self._held.get(client, 0) >= self.per_client):
                return False
            self._held[client] = self._held.get(client, 0) + 1
            return True

    def held(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def free(self, client: str) -> None:
        with self._lock:
            self._held[client] -= 1
            if not self._held[client]:
                del self._held[client]


BUSY_BODY = b'{"error": "too many connections; retry later"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: "
         b"close\r\nRetry-After: 5\r\nContent-Length: %d\r\n\r\n%s"
         % (len(BUSY_BODY), BUSY_BODY))


def is_loopback_host(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one ('' and 0.0.0.0: all interfaces)."""
    if not host:
        return False
    try:
        addrs = {str(a[4][0]) for a in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def tls_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 at least) with this certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    return ctx
