"""Request bodies out and response bodies in, streamed with backpressure.

Out: a body is a recipe that makes a fresh IBodyProducer for each attempt
(a retry after a dropped connection must start from the first byte again).
A file region is read 64 KiB at a time by a FileBodyProducer, which the
connection pauses while its buffer is full, so a 5 GiB part never sits in
memory. Each chunk read reports progress, which keeps the "no answer"
timer from firing while a large body is still going out.

In: ``pipe_body`` hands a response body to an IConsumer and registers
itself as that consumer's push producer, pausing the socket while the
consumer is full; ``read_body`` collects a bounded body. Both abort the
connection when the store goes quiet for ``idle_timeout`` seconds (not
counting time the consumer kept us paused).
"""
from __future__ import annotations

import io
import os
from typing import Any, BinaryIO, Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from registryd.storage.s3.errors import S3Unavailable

#: Bytes per read of a file being uploaded: one read per reactor turn.
READ_SIZE = 64 * 1024
#: Bodies up to this size are signed by their SHA-256.
SIGNED_BODY_LIMIT = 1024 * 1024

Progress = Callable[[], None]


@attrs.frozen
class FileRegion:
    """``length`` bytes of the file at ``path`` from ``offset`` (None: to the end)."""

    path: str
    offset: int = 0
    length: int | None = None


class RequestBody:
    """What a request sends: its length, what is signed, a producer per attempt."""

    length: int = 0

    @property
    def signed_payload(self) -> bytes | None:
        """The bytes whose SHA-256 is signed, or None for UNSIGNED-PAYLOAD."""
        return None

    def producer(self, cooperator: Cooperator, progress: Progress) -> IBodyProducer | None:
        raise NotImplementedError


class BytesBody(RequestBody):
    """A body already in memory (documents, small objects)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    @property
    def signed_payload(self) -> bytes | None:
        return self.data if self.length <= SIGNED_BODY_LIMIT else None

    def producer(self, cooperator: Cooperator, progress: Progress) -> IBodyProducer | None:
        # None: Agent sends "Content-Length: 0" for PUT and POST, and nothing otherwise.
        return _BytesProducer(self.data) if self.data else None


class FileBody(RequestBody):
    """A region of a file, read as it is sent. The size is checked up front:
    a file shorter than promised would otherwise fail mid-request."""

    def __init__(self, region: FileRegion) -> None:
        size = os.stat(region.path).st_size
        length = size - region.offset if region.length is None else region.length
        if region.offset < 0 or length < 0 or region.offset + length > size:
            raise ValueError(f"{region.path} has {size} bytes: no {length} bytes at offset {region.offset}")
        self.region = region
        self.length = length

    def producer(self, cooperator: Cooperator, progress: Progress) -> IBodyProducer | None:
        if self.length == 0:
            return None
        return FileBodyProducer(_Region(self.region, self.length, progress), cooperator, READ_SIZE)


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Region(io.RawIOBase):
    """A window of a file that reports each read (FileBodyProducer's input).

    ``seek``/``tell`` are relative to the window: FileBodyProducer measures
    the length by seeking to the end. The file is opened on the first read,
    so an attempt that never got to send its body holds no descriptor.
    """

    def __init__(self, region: FileRegion, length: int, progress: Progress) -> None:
        self._path = region.path
        self._start = region.offset
        self._length = length
        self._position = 0
        self._progress = progress
        self._file: BinaryIO | None = None

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._position
        if size < 0 or size > remaining:
            size = remaining
        if not size:
            return b""
        if self._file is None:
            self._file = open(self._path, "rb")
            self._file.seek(self._start + self._position)
        data = self._file.read(size)
        self._position += len(data)
        self._progress()
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            offset += self._length
        elif whence == os.SEEK_CUR:
            offset += self._position
        self._position = max(0, min(offset, self._length))
        if self._file is not None:
            self._file.seek(self._start + self._position)
        return self._position

    def tell(self) -> int:
        return self._position

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


class _Watchdog:
    """Calls ``expired`` after ``timeout`` seconds without a ``kick``."""

    def __init__(self, reactor: IReactorTime, timeout: float, expired: Callable[[], None]) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._expired = expired
        self._call: IDelayedCall | None = None

    def kick(self) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(self._timeout)
        else:
            self._call = self._reactor.callLater(self._timeout, self._expired)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _BodyReader(Protocol):
    """Common end-of-body handling: length check, watchdog, one outcome."""

    def __init__(self, response: IResponse, reactor: IReactorTime, idle_timeout: float, what: str) -> None:
        self.done: Deferred[Any] = Deferred(lambda _: self._abort(None))
        self._expected = response.length if response.length is not UNKNOWN_LENGTH else None
        self._received = 0
        self._what = what
        self._idle_timeout = idle_timeout
        self._watchdog = _Watchdog(reactor, idle_timeout, self._stalled)
        self._error: Exception | None = None
        self._transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self._transport = transport
        self._watchdog.kick()
        super().makeConnection(transport)

    def _stalled(self) -> None:
        self._abort(S3Unavailable(f"{self._what}: no data for {self._idle_timeout:g}s "
                                  f"after {self._received} bytes"))

    def _abort(self, error: Exception | None) -> None:
        """Drop the connection; ``done`` fails with ``error`` (None: cancelled)."""
        if self._error is None:
            self._error = error or CancelledError()
        if self._transport is not None:
            self._transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._received += len(data)
        self._watchdog.kick()
        self.deliver(data)

    def deliver(self, data: bytes) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._watchdog.stop()
        self.finished()
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(self._error)
        elif not reason.check(ResponseDone):
            self.done.errback(S3Unavailable(f"{self._what}: body broke off after {self._received} bytes: "
                                            f"{_reason(reason)}"))
        elif self._expected is not None and self._received != self._expected:
            self.done.errback(S3Unavailable(f"{self._what}: got {self._received} of {self._expected} bytes"))
        else:
            self.done.callback(self.result())

    def finished(self) -> None:
        """The body ended, one way or another (before ``done`` fires)."""


def _reason(reason: Failure) -> str:
    reasons = getattr(reason.value, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return reason.getErrorMessage()


class _Collector(_BodyReader):
    def __init__(self, response: IResponse, reactor: IReactorTime, idle_timeout: float, what: str,
                 limit: int, too_large: Callable[[], Exception]) -> None:
        super().__init__(response, reactor, idle_timeout, what)
        self._limit = limit
        self._too_large = too_large
        self._parts: list[bytes] = []

    def deliver(self, data: bytes) -> None:
        if self._received > self._limit:
            self._parts.clear()
            self._abort(self._too_large())
            return
        self._parts.append(data)

    def result(self) -> bytes:
        return b"".join(self._parts)


@implementer(IPushProducer)
class _Pipe(_BodyReader):
    """Writes the body into a consumer, as that consumer's push producer."""

    def __init__(self, response: IResponse, reactor: IReactorTime, idle_timeout: float, what: str,
                 consumer: IConsumer) -> None:
        super().__init__(response, reactor, idle_timeout, what)
        self._consumer = consumer
        self._registered = False
        self._paused = False

    def makeConnection(self, transport: Any) -> None:
        self._consumer.registerProducer(self, True)
        self._registered = True
        super().makeConnection(transport)

    def deliver(self, data: bytes) -> None:
        self._consumer.write(data)

    def result(self) -> int:
        return self._received

    def finished(self) -> None:
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()

    # IPushProducer, called by the consumer.
    def pauseProducing(self) -> None:
        # A consumer that keeps us waiting is not a stalled store.
        self._paused = True
        self._watchdog.stop()
        if self._transport is not None:
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._transport is not None and self._error is None:
            self._watchdog.kick()
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self._abort(None)


def read_body(response: IResponse, reactor: IReactorTime, idle_timeout: float, what: str, limit: int,
              too_large: Callable[[], Exception]) -> Deferred[bytes]:
    """The whole body, at most ``limit`` bytes (else ``too_large()`` is raised)."""
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        drop_body(response)
        return _failed(too_large())
    collector = _Collector(response, reactor, idle_timeout, what, limit, too_large)
    response.deliverBody(collector)
    return collector.done


def pipe_body(response: IResponse, consumer: IConsumer, reactor: IReactorTime, idle_timeout: float,
              what: str) -> Deferred[int]:
    """Stream the body into ``consumer``; fires with the byte count once it all arrived.

    Cancelling the Deferred drops the connection.
    """
    pipe = _Pipe(response, reactor, idle_timeout, what, consumer)
    response.deliverBody(pipe)
    return pipe.done


def drop_body(response: IResponse) -> None:
    """Do not read the body: close the connection instead."""
    response.deliverBody(_Discard())


class _Discard(Protocol):
    def makeConnection(self, transport: Any) -> None:
        # Not worth reading: drop the connection rather than the bytes.
        if transport is not None:
            transport.stopProducing()


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
