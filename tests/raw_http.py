"""One HTTP/1.1 request on a connection of its own, read byte by byte: to see
exactly what a server sent, stop reading part-way (a slow client), and tell a
cut connection from a complete body."""
from __future__ import annotations

import hashlib
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure


class RawGet(Protocol):
    """The body is hashed as it arrives (kept too with ``keep_body``).
    ``pause_after``: stop reading once that many body bytes came in, until
    ``resume``. ``close``: ask for ``Connection: close``."""

    transport: Any      # a TCP transport: pauseProducing, abortConnection

    def __init__(self, method: str, path: str, headers: dict[str, str] | None, hasher: Any,
                 pause_after: int | None, keep_body: bool = False, close: bool = True) -> None:
        self.method = method
        self.path = path
        self.request_headers = headers or {}
        self.hasher = hasher
        self.pause_after = pause_after
        self.keep_body = keep_body
        self.close = close
        self.status = 0
        self.headers: dict[str, str] = {}
        self.received = 0
        self.body = bytearray()
        self.ended_at = 0.0
        self._head = b""
        self.paused: Deferred[RawGet] = Deferred()
        self.done: Deferred[RawGet] = Deferred()

    def connectionMade(self) -> None:
        lines = [f"{self.method} {self.path} HTTP/1.1", "Host: registry"]
        if self.close:
            lines.append("Connection: close")
        lines += [f"{k}: {v}" for k, v in self.request_headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def dataReceived(self, data: bytes) -> None:
        if not self.status:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            head, data = self._head.split(b"\r\n\r\n", 1)
            status_line, *fields = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split()[1])
            for field in fields:
                key, _, value = field.partition(":")
                self.headers[key.strip().lower()] = value.strip()
        if data:
            self.received += len(data)
            self.hasher.update(data)
            if self.keep_body:
                self.body += data
        if self.pause_after is not None and self.received >= self.pause_after and not self.paused.called:
            self.transport.pauseProducing()
            self.paused.callback(self)

    def resume(self) -> None:
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended_at = time.monotonic()
        if not self.paused.called:      # ended before it was paused: whoever waits looks at why
            self.paused.callback(self)
        self.done.callback(self)

    @property
    def length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    @property
    def complete(self) -> bool:
        return self.length is not None and self.received == self.length

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status} {self.headers} ({self.received} body bytes)"


async def open_get(host: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
                   hasher: Any = None, pause_after: int | None = None, timeout: float = 240,
                   keep_body: bool = False, close: bool = True) -> RawGet:
    """Connect and send; returns once connected (await ``.done`` for the end).
    The connection is aborted after ``timeout`` seconds."""
    hostname, port = host.split(":")
    protocol = RawGet(method, path, headers, hasher or hashlib.sha256(), pause_after, keep_body, close)
    await connectProtocol(TCP4ClientEndpoint(reactor, hostname, int(port), timeout=10), protocol)
    timer = reactor.callLater(timeout, protocol.transport.abortConnection)

    def stop_timer(result: RawGet) -> RawGet:
        if timer.active():
            timer.cancel()
        return result

    protocol.done.addCallback(stop_timer)
    return protocol
