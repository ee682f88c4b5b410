"""A Request that streams upload bodies to disk as they arrive.

twisted.web buffers a whole request body before it calls a resource. Blob
uploads instead go chunk by chunk into the upload session's file and its
hasher (``handleContentChunk``), so a 5 GiB layer never sits in memory or in
a second temporary file. Every other body is capped.

The decision is taken in ``gotLength``, after the headers and before the
body. The request line is then still on the channel (``_command`` and
``_path``, private but stable for years); tests/test_request.py pins this.
"""
from __future__ import annotations

import io
import re
import time
from typing import Any, Callable, Coroutine, Protocol
from urllib.parse import parse_qs, unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

from registryd.errors import RegistryError, too_large
from registryd.names import check_raw_path
from registryd.storage.uploads import UploadWriter

log = Logger()

_UPLOAD = re.compile(rb"^/v2/(?P<name>.+)/blobs/uploads/(?P<id>[^/]*)$")
_MANIFEST = re.compile(rb"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")
SMALL_BODY_LIMIT = 64 * 1024


class BodySink(Protocol):
    """Where a request's body goes while it arrives."""

    def write(self, data: bytes) -> None: ...

    def abandon(self) -> None: ...


class CappedBody:
    """Keeps up to ``limit`` bytes in memory; past it, remembers a 413."""

    def __init__(self, limit: int, what: str) -> None:
        self._buffer = io.BytesIO()
        self._limit = limit
        self._what = what
        self.error: RegistryError | None = None

    def write(self, data: bytes) -> None:
        if self.error is None:
            if self._buffer.tell() + len(data) > self._limit:
                self.error = too_large(self._what, self._limit)
                self._buffer = io.BytesIO()
            else:
                self._buffer.write(data)

    def abandon(self) -> None:
        self._buffer = io.BytesIO()

    def data(self) -> bytes:
        if self.error is not None:
            raise self.error
        return self._buffer.getvalue()


class RefusedBody:
    """The request was refused before its body: discard it, report ``error``."""

    def __init__(self, error: RegistryError) -> None:
        self.error = error

    def write(self, data: bytes) -> None:
        pass

    def abandon(self) -> None:
        pass


class UploadBody:
    """An upload chunk on its way to disk; the handler claims it once complete."""

    def __init__(self, writer: UploadWriter, on_abandon: Callable[[], None] | None = None) -> None:
        self._writer = writer
        self._claimed = False
        self._on_abandon = on_abandon

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def abandon(self) -> None:
        # After the claim the handler owns the writer (it may be fsyncing it).
        if not self._claimed:
            self._claimed = True
            self._writer.abandon()
            if self._on_abandon is not None:
                self._on_abandon()

    def claim(self) -> UploadWriter:
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
            except Exception:
                log.failure("writing a request body failed")
                sink.abandon()
                sink = RefusedBody(RegistryError(500, "UNKNOWN", "could not store the request body"))
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

    def settled(self) -> Deferred[BodySink]:
        d: Deferred[BodySink] = Deferred()
        if self._sink is not None:
            d.callback(self._sink)
        else:
            self._waiters.append(d)
        return d


class RegistryRequest(server.Request):
    """Routes request bodies to the right sink; sets headers every response needs."""

    # An empty 201/202/204 must not claim to be text/html.
    defaultContentType = None
    body: Any = None
    user: str | None = None
    cache: str | None = None  # mirrored reads: "hit" or "miss"
    upstream: str | None = None
    received = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started_at = time.monotonic()

    def gotLength(self, length: int | None) -> None:
        command = getattr(self.channel, "_command", b"").upper()
        path, _, query = getattr(self.channel, "_path", b"").partition(b"?")
        api = getattr(getattr(self.channel, "site", None), "api", None)
        self.content = io.BytesIO()  # type: ignore[assignment]
        try:
            self.body = self._choose_sink(api, command, path, query, length)
            if isinstance(self.body, PendingBody):
                self.body.start(getattr(self.channel, "transport", None))
        except RegistryError as e:
            self.body = RefusedBody(e)
        except Exception:
            log.failure("choosing where a request body goes failed")
            self.body = RefusedBody(RegistryError(500, "UNKNOWN", "internal error"))

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
            elif command == b"PUT" and _MANIFEST.match(path):
                limit = api.config.max_manifest_size
                if length is not None and length > limit:
                    raise too_large("manifest", limit)
                return CappedBody(limit, "manifest")
        if length is not None and length > SMALL_BODY_LIMIT:
            raise too_large("request body", SMALL_BODY_LIMIT)
        return CappedBody(SMALL_BODY_LIMIT, "request body")

    async def settled_body(self) -> Any:
        """The body's sink, once any credential check before it is done."""
        if isinstance(self.body, PendingBody):
            return await self.body.settled()
        return self.body

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.body.write(data)
        except Exception:
            # A full disk or a vanished session: refuse, keep draining.
            failure = Failure()
            log.failure("writing a request body failed", failure)
            self.body.abandon()
            self.body = RefusedBody(RegistryError(500, "UNKNOWN", "could not store the request body"))

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
