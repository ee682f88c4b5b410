"""The HTTP site: our channel and request class in front of the API resource."""
from __future__ import annotations

from typing import Any

import time

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from registryd.errors import RegistryError
from registryd.metrics import route_of
from registryd.web.app import RegistryAPI
from registryd.web.limits import ConnectionLimits, error_response, unavailable_busy
from registryd.web.request import PendingBody, RegistryRequest

access_log = Logger(namespace="registryd.access")
log = Logger()

_TLS_HANDSHAKE = 0x16
#: How often a stop looks whether closing connections have sent what they hold.
FLUSH_POLL = 0.05

_NOT_TLS = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" \
           b"This port speaks plain HTTP, not TLS.\n"
# How long a refused request's client may go on sending (the rest is read and dropped)
# before its connection is closed: long enough for it to read the answer.
DRAIN_SECONDS = 2.0


def _cancel(timer: Any) -> None:
    """Cancel a delayed call if it is still pending."""
    if timer is not None and timer.active():
        timer.cancel()


class RegistryChannel(HTTPChannel):
    """HTTP/1.1, answering a TLS handshake on a plain port at once.

    Clients told a registry is "insecure" (skopeo, podman, containerd) try
    TLS first and fall back to plain HTTP only when the handshake fails;
    a server that waits for a request line makes each of them sit out a
    10 s handshake timeout.
    """

    _first_bytes_seen = False
    _counted = False                    # in the site's count of all connections
    _client: str | None = None          # the key it is counted under per client
    _refusing = False
    _drain_left: int | None = None
    _drain_timer: Any = None
    _header_timer: Any = None
    _head_started = False
    _body_timer: Any = None
    _body_bytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        site = getattr(self, "site", None)
        if isinstance(site, RegistrySite):
            site.channels.add(self)
        limits = self._limits()
        if limits is None:
            return
        if not limits.open(self._peer_host()):
            # Past max_connections: no drain, the descriptor is what is short.
            self.refuse(unavailable_busy("the registry has too many connections open; retry shortly"), 0)
            return
        self._counted = True
        self._start_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._refusing:
            self._drain(data)
            return
        if not self._first_bytes_seen and data:
            self._first_bytes_seen = True
            if data[0] == _TLS_HANDSHAKE:
                assert self.transport is not None
                self.transport.write(_NOT_TLS)
                self.transport.loseConnection()
                return
            # Counted per client at its first bytes: behind the PROXY protocol
            # the client's address is known only from then on.
            limits = self._limits()
            if limits is not None and self._counted:
                self._client = limits.identify(self._peer_host())
                if self._client is None:
                    self.refuse(unavailable_busy("too many connections from your address; retry shortly"))
                    return
        if self._header_timer is not None:
            self._head_started = True
        super().dataReceived(data)

    def _limits(self) -> ConnectionLimits | None:
        return getattr(getattr(self, "site", None), "limits", None)

    def _clock(self) -> Any:
        clock = getattr(getattr(self, "site", None), "_clock", None)
        if clock is None:
            from twisted.internet import reactor as clock
        return clock

    def _peer_host(self) -> str:
        try:
            return str(getattr(self.transport.getPeer(), "host", "-"))  # type: ignore[union-attr]
        except Exception:
            return "-"

    # --- a deadline for each request's head -------------------------------------

    def _start_header_deadline(self) -> None:
        site = getattr(self, "site", None)
        timeout = getattr(site, "header_timeout", None)
        if timeout and not self._refusing:
            self._cancel_header_deadline()
            self._head_started = False
            self._header_timer = self._clock().callLater(timeout, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        _cancel(self._header_timer)
        self._header_timer = None

    def _header_deadline_passed(self) -> None:
        """No complete request head in time: 408 for one begun, silence for an idle connection."""
        self._header_timer = None
        site: Any = getattr(self, "site", None)
        if site is not None:
            site.warnings.warn("header_timeout", "a client sent no complete request head within [server] "
                               "header_timeout ({timeout}s): closing its connection (latest {client})",
                               timeout=site.header_timeout, client=self._peer_host())
        if self._head_started:
            self.refuse(RegistryError(408, "UNSUPPORTED", "the request head did not arrive in time"), 0)
        else:
            self.loseConnection()

    def allHeadersReceived(self) -> None:
        self._cancel_header_deadline()
        super().allHeadersReceived()
        self._start_body_watch()

    # --- a floor under the rate of each request's body ---------------------------------

    def _start_body_watch(self) -> None:
        """A body must keep up ``[server] min_body_rate`` over each ``header_timeout``
        window: a client trickling its body (a byte now and then, which would
        keep an idle timer alive forever) is answered 408 and dropped."""
        site = getattr(self, "site", None)
        rate, window = getattr(site, "min_body_rate", 0), getattr(site, "header_timeout", None)
        self._stop_body_watch()
        if rate and window and not self._refusing:
            self._body_bytes = 0
            self._body_timer = self._clock().callLater(window, self._check_body_rate, rate, window)

    def _stop_body_watch(self) -> None:
        _cancel(self._body_timer)
        self._body_timer = None

    def _check_body_rate(self, rate: int, window: float) -> None:
        self._body_timer = None
        request = self.requests[-1] if self.requests else None
        body = getattr(request, "body", None)
        sink = body.current if isinstance(body, PendingBody) else body
        # A credential check, or a disk slower than the client (its upload writer paused the connection).
        waiting_on_us = (isinstance(body, PendingBody) and sink is None) or getattr(sink, "paused", False)
        if not waiting_on_us and self._body_bytes < rate * window:
            site: Any = getattr(self, "site", None)
            if site is not None:
                site.warnings.warn("min_body_rate", "a request body arrived slower than [server] min_body_rate "
                                   "({rate} bytes/s): closing its connection (latest {client})",
                                   rate=rate, client=self._peer_host())
            self.refuse(RegistryError(408, "UNSUPPORTED", f"the request body arrived slower than {rate} bytes/s"),
                        0)
            return
        self._body_bytes = 0
        self._body_timer = self._clock().callLater(window, self._check_body_rate, rate, window)

    def allContentReceived(self) -> None:
        self._stop_body_watch()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # The next request's head is due from now (pipelined bytes may complete it at once).
        if self.persistent:
            self._start_header_deadline()
        super().requestDone(request)

    # --- heads past the limits: 414 and 431 instead of a bare close ------------------

    def _too_long(self) -> RegistryError:
        if getattr(self, "_command", None) is None:
            return RegistryError(414, "UNSUPPORTED", f"the request line is longer than {self.MAX_LENGTH} bytes")
        return RegistryError(431, "UNSUPPORTED",
                             f"the request headers are larger than {self.totalHeadersSize} bytes")

    def lineReceived(self, line: bytes) -> None:
        if self._refusing:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.refuse(self._too_long())
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(self._too_long())

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(RegistryError(431, "UNSUPPORTED", f"a request may have at most {self.maxHeaders} headers"))
            return False
        return bool(super().headerReceived(line))

    def rawDataReceived(self, data: bytes) -> None:
        if self._refusing:
            self._drain(data)
            return
        self._body_bytes += len(data)
        super().rawDataReceived(data)

    def _send100Continue(self) -> None:
        if not self._refusing:
            super()._send100Continue()

    # --- refusing a request before it is read ------------------------------------

    def refuse(self, error: RegistryError, body_left: int | None = None) -> int:
        """Answer ``error`` now and close the connection.

        Whatever the client still sends is read and dropped, never parsed or
        kept, until ``body_left`` bytes (what its request declared) have come
        or for DRAIN_SECONDS: a client that is still writing its body then
        reads the answer instead of a reset connection.
        """
        if self._refusing or self.transport is None:
            return 0
        self._refusing = True
        self._cancel_header_deadline()
        self._stop_body_watch()
        self.setTimeout(None)
        response = error_response(error)
        self.transport.write(response)
        self._drain_left = body_left
        if body_left == 0:
            self.loseConnection()
            return len(response)
        self._networkProducer.resumeProducing()
        # A half-close tells a client still sending that the answer is whole.
        # Not under TLS: Twisted's TLS layer can then fail on the peer's
        # close_notify (an unhandled AttributeError); the answer says
        # "Connection: close" anyway.
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None and not ISSLTransport.providedBy(self.transport):
            half_close()
        self._drain_timer = self._clock().callLater(DRAIN_SECONDS, self._stop_draining)
        return len(response)

    def _drain(self, data: bytes) -> None:
        if self._drain_left is not None:
            self._drain_left -= len(data)
            if self._drain_left <= 0:
                self._stop_draining()

    def _stop_draining(self) -> None:
        _cancel(self._drain_timer)
        self._drain_timer = None
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        site = getattr(self, "site", None)
        if isinstance(site, RegistrySite):
            site.channels.discard(self)
        self._cancel_header_deadline()
        self._stop_body_watch()
        _cancel(self._drain_timer)
        self._drain_timer = None
        limits = self._limits()
        if limits is not None:
            if self._client is not None:
                limits.forget(self._client)
                self._client = None
            if self._counted:
                limits.close()
                self._counted = False
        super().connectionLost(reason)


class RegistrySite(Site):
    """A Site whose requests stream upload bodies through ``api``."""

    displayTracebacks = False
    protocol = RegistryChannel  # type: ignore[assignment]

    def __init__(self, api: RegistryAPI, reactor: Any, resource: Any = None) -> None:
        super().__init__(resource or api.resource(), requestFactory=RegistryRequest, reactor=reactor)
        self.api = api
        self._clock = reactor
        config = api.config
        self.warnings = api.warnings    # one "at most once a minute" per kind of limit, node-wide
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_client, self.warnings)
        self.header_timeout = config.header_timeout
        self.min_body_rate = config.min_body_rate
        self.active: set[Any] = set()
        self.channels: set[RegistryChannel] = set()
        self._drained: list[Deferred[None]] = []

    def request_started(self, request: Any) -> None:
        self.active.add(request)

    def request_ended(self, request: Any) -> None:
        self.active.discard(request)
        if not self.active:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def drain(self, timeout: float) -> Deferred[None]:
        """Fires once no request runs and every response has left the process,
        or after ``timeout`` seconds.

        Graceful shutdown: listeners are already closed; transfers under
        way may finish. Whatever still runs then is cut off (and its
        partial files are cleaned at the next start).
        """
        deadline = self._clock.seconds() + timeout
        d = self._requests_ended(timeout)
        d.addCallback(lambda _: self._flush_connections(deadline - self._clock.seconds()))
        return d

    def _flush_connections(self, timeout: float) -> Deferred[None]:
        """Close every idle connection and wait until what it holds has left the process.

        A finished request may still have bytes in the transport's buffer or
        the TLS layer's (a slow client, a body written through Python): the
        reactor's stop would drop them, so the client gets a short body.
        Closing flushes each layer; a connection is done when it is gone or
        its socket-level buffer is empty (the kernel then delivers the rest).
        """
        for channel in list(self.channels):
            if not channel.requests:
                channel.loseConnection()
        if timeout <= 0 or all(_unsent(channel) == 0 for channel in self.channels):
            return succeed(None)
        log.info("waiting up to {timeout:.0f}s for {count} connections to send what they hold",
                 timeout=timeout, count=len(self.channels))
        deadline = self._clock.seconds() + timeout

        def check() -> None:
            if self._clock.seconds() >= deadline or all(_unsent(c) == 0 for c in self.channels):
                poll.stop()

        poll = LoopingCall(check)
        poll.clock = self._clock
        return poll.start(FLUSH_POLL, now=False).addCallback(lambda _: None)

    def _requests_ended(self, timeout: float) -> Deferred[None]:
        """Fires when no request is running, or after ``timeout`` seconds."""
        if not self.active:
            return succeed(None)
        log.info("waiting up to {timeout}s for {count} running requests", timeout=timeout,
                 count=len(self.active))
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        timer = self._clock.callLater(timeout, lambda: d.callback(None) if not d.called else None)
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d

    def log(self, request: Any) -> None:
        """One structured access event per request, and its metrics."""
        path = request.path.decode("latin-1") if request.path else ""
        route = route_of(path)
        method = request.method.decode("latin-1") if request.method else "-"
        status = request.code
        sent = getattr(request, "sentLength", 0) or 0
        received = getattr(request, "received", 0)
        metrics = self.api.metrics
        metrics.requests.labels(route, method, str(status)).inc()
        if received:
            metrics.bytes_in.labels(route).inc(received)
        if sent:
            metrics.bytes_out.labels(route).inc(sent)
        cache = getattr(request, "cache", None)
        if cache is not None:
            metrics.cache.labels(route, cache).inc()
        try:
            self.api.status.observe(method, path, status, cache, getattr(request, "error_message", None))
            self.api.ui.observe(method, path, status, cache, getattr(request, "upstream", None), sent)
        except Exception:
            log.failure("feeding the status page failed")
        client = request.getClientAddress()
        access_log.info(
            "{client} {user} \"{method} {uri}\" {status} {bytes_out} {duration_ms}ms{cache_note}",
            client=getattr(client, "host", "-"), user=getattr(request, "user", None) or "-",
            method=method, uri=request.uri.decode("latin-1") if request.uri else "", path=path, route=route,
            status=status, bytes_out=sent, bytes_in=received,
            duration_ms=round((time.monotonic() - getattr(request, "started_at", time.monotonic())) * 1000, 1),
            cache=cache, upstream=getattr(request, "upstream", None),
            cache_note=f" cache={cache} upstream={request.upstream}" if cache else "",
            access=True,
        )


def _unsent(channel: RegistryChannel) -> int:
    """Bytes a connection still holds in user space on their way to its socket.

    Walks through wrapping transports (TLS) to the socket's own; 0 once
    the connection is closed.
    """
    transport: Any = channel.transport
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    if transport is None or not transport.connected:
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
