"""A Request that streams upload bodies to disk as they arrive.

twisted.web buffers a whole request body before it calls a resource. Blob
uploads instead go chunk by chunk into the upload session's file and its
hasher (``handleContentChunk``), so a 5 GiB layer never sits in memory or in
a second temporary file. Every other body is capped.

The decision is taken in ``gotLength``, after the headers and before the
body. The request line is then still on the channel (``_command`` and
``_path``, private but stable for years); tests/test_request.py pins this.
A body that is refused there (credentials, access rules, size, room on
disk, memory) is answered at once and its connection closed
(``RegistryChannel.refuse``): nothing of it is kept, and its client does
not have to send it all before it learns why.
"""
from __future__ import annotations

import errno
import io
import re
import time
from typing import Any, Callable, Coroutine, Protocol
from urllib.parse import parse_qs, unquote

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from registryd.errors import RegistryError, too_large
from registryd.names import check_raw_path
from registryd.storage.driver import Pool
from registryd.storage.interface import UploadWriter
from registryd.serial_writer import SerialWriter
from registryd.web.limits import BodyBudget, store_full
from registryd.web.upload_pace import NodeTraffic, UploadPace

log = Logger()

_UPLOAD = re.compile(rb"^/v2/(?P<name>.+)/blobs/uploads/(?P<id>[^/]*)$")
_MANIFEST = re.compile(rb"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")
SMALL_BODY_LIMIT = 64 * 1024
# How often (in bytes of an upload body) the free space of the disk is looked at again.
ROOM_CHECK_INTERVAL = 8 * 1024 * 1024
#: Bytes read from an upload's connection at a time: Twisted reads 64 KiB, and each read
#: costs the reactor a Python-level trip through the HTTP parser to the body (and the GIL).
READ_SIZE = 256 * 1024


class BodySink(Protocol):
    """Where a request's body goes while it arrives."""

    def write(self, data: bytes) -> None: ...

    def abandon(self) -> None: ...


class CappedBody:
    """Keeps up to ``limit`` bytes in memory; past it, remembers a 413.

    With a ``budget`` the bytes are reserved from it first: the declared
    ``length`` at once (which may refuse the body with 503), a chunked body
    as it grows; they are given back by ``abandon`` (when the request is done).
    """

    def __init__(self, limit: int, what: str, budget: BodyBudget | None = None,
                 length: int | None = None) -> None:
        self._buffer = io.BytesIO()
        self._limit = limit
        self._what = what
        self._budget = budget
        self._reserved = 0
        self.error: RegistryError | None = None
        if budget is not None and length:
            budget.reserve(length)
            self._reserved = length

    def write(self, data: bytes) -> None:
        if self.error is None:
            size = self._buffer.tell() + len(data)
            if size > self._limit:
                self._fail(too_large(self._what, self._limit))
                return
            if self._budget is not None and size > self._reserved:
                try:
                    self._budget.reserve(size - self._reserved)
                except RegistryError as e:
                    self._fail(e)
                    return
                self._reserved = size
            self._buffer.write(data)

    def _fail(self, error: RegistryError) -> None:
        self.error = error
        self.abandon()

    def abandon(self) -> None:
        self._buffer = io.BytesIO()
        if self._budget is not None:
            self._budget.release(self._reserved)
        self._reserved = 0

    def data(self) -> bytes:
        if self.error is not None:
            raise self.error
        return self._buffer.getvalue()


class IgnoredBody:
    """A body no handler reads (no other route takes one): counted against its cap, never kept."""

    def __init__(self, limit: int, what: str) -> None:
        self._size = 0
        self._limit = limit
        self._what = what
        self.error: RegistryError | None = None

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit and self.error is None:
            self.error = too_large(self._what, self._limit)

    def abandon(self) -> None:
        pass


class RefusedBody:
    """The request was refused before its body: discard it, report ``error``."""

    def __init__(self, error: RegistryError) -> None:
        self.error = error

    def write(self, data: bytes) -> None:
        pass

    def abandon(self) -> None:
        pass


class UploadBody:
    """An upload chunk on its way to disk; the handler claims it once complete.

    With a ``pool`` the chunks are written and hashed there by a SerialWriter
    (registryd.serial_writer), off the reactor, pausing ``producer`` (the
    connection) while too much waits; without, at once, as they arrive.
    """

    def __init__(self, writer: UploadWriter, on_abandon: Callable[[], None] | None = None,
                 pool: Pool | None = None, producer: Any = None,
                 on_error: Callable[[Exception], bool] | None = None,
                 rate_while_pulling: int = 0, clock: Any = None, traffic: NodeTraffic | None = None) -> None:
        self._writer = writer
        self._claimed = False
        self._on_abandon = on_abandon
        self._serial = None if pool is None else SerialWriter(writer.write, pool, producer, on_error=on_error)
        if producer is not None and getattr(producer, "bufferSize", READ_SIZE) < READ_SIZE:
            producer.bufferSize = READ_SIZE
        # While the node sends blob bodies, this one is read at its share of the node's rate.
        self._pace = (UploadPace(producer, rate_while_pulling, clock, traffic)
                      if producer is not None and rate_while_pulling > 0 and clock is not None
                      and traffic is not None else None)

    @property
    def paused(self) -> bool:
        """The connection waits on us (the disk, or pulls going first), not on its client."""
        return (self._serial is not None and self._serial.paused) or (self._pace is not None and self._pace.holding)

    def write(self, data: bytes) -> None:
        if self._serial is not None:
            self._serial.write(data)
        else:
            self._writer.write(data)
        if self._pace is not None:
            self._pace.received(len(data))

    def abandon(self) -> None:
        if self._pace is not None:
            self._pace.stop()
        # After the claim the handler owns the writer (it may be fsyncing it).
        if not self._claimed:
            self._claimed = True
            if self._serial is not None:
                self._serial.abandon(self._drop)   # once no thread writes into the session
            else:
                self._drop()

    def _drop(self) -> None:
        self._writer.abandon()
        if self._on_abandon is not None:
            self._on_abandon()

    async def claim(self) -> UploadWriter:
        """The writer, once every chunk is written; the error a chunk met, with the body dropped.

        A request that goes away meanwhile (its connection lost, its handler
        cancelled) abandons the body, dropped once no thread writes into it.
        """
        if self._pace is not None:
            self._pace.stop()
        if self._serial is not None and not self._claimed:
            try:
                await self._serial.drain()
            except CancelledError:
                self.abandon()
                raise
            except Exception as e:
                if not self._claimed:
                    self._claimed = True
                    self._drop()
                raise body_write_error(e) from None
        if self._claimed:
            raise CancelledError("the request's body was abandoned")
        self._claimed = True
        return self._writer


class PendingBody:
    """A body waiting for its request's credentials to be checked.

    The connection is paused meanwhile, so at most what was already read
    (one socket read) waits in memory; then the body goes to the sink the
    check yields, or is discarded if the request is refused.
    """

    def __init__(self, decide: Coroutine[Any, Any, BodySink]) -> None:
        self._decide = decide
        self._buffer: list[bytes] = []
        self._sink: BodySink | None = None
        self._abandoned = False
        self._waiters: list[Deferred[BodySink]] = []

    def start(self, transport: Any) -> None:
        self._transport = transport
        if transport is not None:
            transport.pauseProducing()
        Deferred.fromCoroutine(self._decide).addBoth(self._settle)

    def _settle(self, outcome: Any) -> None:
        if isinstance(outcome, Failure):
            error = outcome.value
            if not isinstance(error, RegistryError):
                log.failure("checking an upload's credentials failed", outcome)
                error = RegistryError(500, "UNKNOWN", "internal error")
            sink: BodySink = RefusedBody(error)
        else:
            sink = outcome
        if self._abandoned:
            sink.abandon()
        else:
            try:
                for chunk in self._buffer:
                    sink.write(chunk)
            except Exception as e:
                sink.abandon()
                sink = RefusedBody(body_write_error(e))
        self._buffer = []
        self._sink = sink
        if self._transport is not None and not self._abandoned:
            self._transport.resumeProducing()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(sink)

    def write(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.write(data)
        else:
            self._buffer.append(data)

    def abandon(self) -> None:
        self._abandoned = True
        self._buffer = []
        if self._sink is not None:
            self._sink.abandon()

    @property
    def current(self) -> BodySink | None:
        """The sink once the check is done, else None."""
        return self._sink

    def settled(self) -> Deferred[BodySink]:
        d: Deferred[BodySink] = Deferred()
        if self._sink is not None:
            d.callback(self._sink)
        else:
            self._waiters.append(d)
        return d


def body_write_error(e: Exception) -> RegistryError:
    """What to tell a client whose body could not be written: a full disk is said so (507)."""
    if isinstance(e, RegistryError):
        return e
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        log.warn("a request body did not fit on the disk: {error}", error=str(e))
        return store_full()
    log.failure("writing a request body failed", Failure(e))
    return RegistryError(500, "UNKNOWN", "could not store the request body")


class RegistryRequest(server.Request):
    """Routes request bodies to the right sink; sets headers every response needs."""

    # An empty 201/202/204 must not claim to be text/html.
    defaultContentType = None
    body: Any = None
    user: str | None = None
    cache: str | None = None  # mirrored reads: "hit" or "miss"
    upstream: str | None = None
    received = 0
    complete = False        # the whole request is in: its handler answers
    refused = False         # answered before its body (refuse_now)
    _declared: int | None = None
    _early: tuple[bytes, bytes] = (b"", b"")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_at = time.monotonic()

    def gotLength(self, length: int | None) -> None:
        command = getattr(self.channel, "_command", b"").upper()
        path, _, query = getattr(self.channel, "_path", b"").partition(b"?")
        api = getattr(getattr(self.channel, "site", None), "api", None)
        self.content = io.BytesIO()  # type: ignore[assignment]
        self._declared = length
        self._early = (command, getattr(self.channel, "_path", b""))
        try:
            self.body = self._choose_sink(api, command, path, query, length)
            if isinstance(self.body, PendingBody):
                self.body.start(getattr(self.channel, "transport", None))
                self.body.settled().addCallback(self._settled)
        except RegistryError as e:
            self.body = RefusedBody(e)
        except Exception:
            log.failure("choosing where a request body goes failed")
            self.body = RefusedBody(RegistryError(500, "UNKNOWN", "internal error"))
        if isinstance(self.body, RefusedBody):
            self.refuse_now(self.body.error)

    def _choose_sink(self, api: Any, command: bytes, path: bytes, query: bytes,
                     length: int | None) -> BodySink:
        if api is not None and command in (b"PATCH", b"PUT", b"POST"):
            upload = _UPLOAD.match(path)
            if upload is not None:
                check_raw_path(path)
                args = parse_qs(query.decode("latin-1"))
                sink = api.upload_body(
                    self, command.decode(), unquote(upload["name"].decode("latin-1")),
                    unquote(upload["id"].decode("latin-1")), args, length,
                )
                if sink is not None:
                    return sink
            else:
                manifest = _MANIFEST.match(path) if command == b"PUT" else None
                if manifest is not None:
                    check_raw_path(path)
                    return api.manifest_body(self, unquote(manifest["name"].decode("latin-1")),
                                             parse_qs(query.decode("latin-1")), length)
        if length is not None and length > SMALL_BODY_LIMIT:
            raise too_large("request body", SMALL_BODY_LIMIT)
        return IgnoredBody(SMALL_BODY_LIMIT, "request body")

    def _settled(self, sink: BodySink) -> BodySink:
        if isinstance(sink, RefusedBody):
            self.refuse_now(sink.error)
        return sink

    def refuse_now(self, error: RegistryError) -> bool:
        """Answer ``error`` before the body is read, and close; False once the whole
        request is in (its handler answers then)."""
        refuse = getattr(self.channel, "refuse", None)
        if refuse is None or self.complete or self.refused or self._declared == 0:
            return False
        self.refused = True
        command, uri = self._early
        self.method, self.uri, self.path = command, uri, uri.partition(b"?")[0]
        self.code = error.status
        self.error_message = error.message
        site = getattr(self.channel, "site", None)
        remaining = None if self._declared is None else max(0, self._declared - self.received)
        self.sentLength = refuse(error, remaining)
        if site is not None and hasattr(site, "api"):
            site.log(self)
        return True

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.complete = True
        super().requestReceived(command, path, version)

    async def settled_body(self) -> Any:
        """The body's sink, once any credential check before it is done."""
        if isinstance(self.body, PendingBody):
            return await self.body.settled()
        return self.body

    def body_failed(self, e: Exception) -> bool:
        """A chunk written off the reactor failed while the body still arrives: refuse now, drop
        the rest. False once the whole request is in (its handler hears of it by claiming the body)."""
        if self.complete or self.refused:
            return False
        error = body_write_error(e)
        body, self.body = self.body, RefusedBody(error)
        body.abandon()
        self.refuse_now(error)
        return True

    def handleContentChunk(self, data: bytes) -> None:
        before = self.received
        self.received += len(data)
        sink = self.body.current if isinstance(self.body, PendingBody) else self.body
        try:
            if isinstance(sink, UploadBody) and before // ROOM_CHECK_INTERVAL != self.received // ROOM_CHECK_INTERVAL:
                # A body without Content-Length was not measured against the reserve up front.
                api = getattr(getattr(self.channel, "site", None), "api", None)
                if api is not None:
                    api.check_room(0)
            self.body.write(data)
        except Exception as e:
            # A full disk or a vanished session: refuse, drop the rest.
            error = body_write_error(e)
            self.body.abandon()
            self.body = RefusedBody(error)
            self.refuse_now(error)
            return
        refusal = getattr(sink, "error", None)
        if refusal is not None:
            self.refuse_now(refusal)

    def process(self) -> None:
        self.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        # Graceful shutdown waits for the requests its site knows are running.
        # (The channel is gone once the request is done: keep the site.)
        site = getattr(self.channel, "site", None)
        if site is not None and hasattr(site, "request_started"):
            site.request_started(self)
            self.notifyFinish().addBoth(lambda _: site.request_ended(self))
        super().process()

    def finish(self) -> None:
        # A body no handler claimed (its request was refused) must not keep
        # its upload session busy.
        if self.body is not None:
            self.body.abandon()
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        if self.body is not None:
            self.body.abandon()
        super().connectionLost(reason)
