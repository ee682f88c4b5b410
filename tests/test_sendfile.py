"""send_file_range: exact bytes, backpressure, keep-alive, aborts, TLS.

Real loopback sockets for the sendfile path (that is where the bugs live:
byte order against buffered headers, EAGAIN, pipelining); StringTransport and
Clock for the fallback producer and the stall watchdog.
"""
from __future__ import annotations

import errno
import hashlib
import os
from typing import Any, Callable, Iterator

import attrs
import pytest
import pytest_twisted
from klein import Klein
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionAborted
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from registryd.web import sendfile
from registryd.web.sendfile import TransferAborted, send_file_range
from support.pki import issue, make_ca

MiB = 1024 * 1024
BIG = 128 * MiB


def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


# --- the file -----------------------------------------------------------------


@attrs.frozen
class BigFile:
    path: str
    size: int

    def sha256(self, offset: int = 0, length: int | None = None) -> str:
        length = self.size - offset if length is None else length
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(offset)
            while length:
                block = f.read(min(length, 4 * MiB))
                digest.update(block)
                length -= len(block)
        return digest.hexdigest()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: Any) -> BigFile:
    """128 MiB of random bytes, written once for the whole module."""
    path = tmp_path_factory.mktemp("sendfile") / "blob"
    with open(path, "wb") as f:
        for _ in range(BIG // MiB):
            f.write(os.urandom(MiB))
    return BigFile(str(path), BIG)


# --- servers --------------------------------------------------------------------


@attrs.define
class Outcome:
    """What one handler saw: bytes sent or the exception, and our promises."""

    sent: int | None = None
    error: BaseException | None = None
    file_closed: bool = False
    producer: Any = None
    sent_length: int = 0


def _range_of(request: Request, size: int) -> tuple[int, int]:
    args: dict[bytes, list[bytes]] = request.args or {}
    offset = int(args.get(b"offset", [b"0"])[0])
    length = int(args.get(b"length", [str(size - offset).encode()])[0])
    return offset, length


class KleinFileServer:
    """The production shape: a Klein async handler that Klein cancels on disconnect."""

    app = Klein()

    def __init__(self, path: str, size: int, stall_timeout: float = 30.0) -> None:
        self.path = path
        self.size = size
        self.stall_timeout = stall_timeout
        self.outcomes: DeferredQueue[Outcome] = DeferredQueue()

    @app.route("/file", methods=["GET", "HEAD"])
    async def file(self, request: Request) -> None:
        offset, length = _range_of(request, self.size)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % (length,))
        with open(self.path, "rb") as f:
            try:
                sent = await send_file_range(
                    request, f, offset, length, reactor=reactor(), stall_timeout=self.stall_timeout
                )
            except BaseException as e:
                self.outcomes.put(Outcome(error=e, file_closed=f.closed, producer=request.producer))
                raise
            self.outcomes.put(
                Outcome(sent=sent, file_closed=f.closed, producer=request.producer, sent_length=request.sentLength)
            )


class PlainFileResource(Resource):
    """A non-Klein caller: drives the coroutine itself and may cancel it."""

    isLeaf = True

    def __init__(self, path: str, size: int, the_reactor: Any = None, stall_timeout: float = 30.0) -> None:
        super().__init__()
        self.path = path
        self.size = size
        self.reactor = the_reactor
        self.stall_timeout = stall_timeout
        self.outcomes: list[Outcome] = []
        self.running: list[Deferred[None]] = []
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.requests.append(request)
        self.running.append(Deferred.fromCoroutine(self._send(request)))
        return NOT_DONE_YET

    render_HEAD = render_GET

    async def _send(self, request: Request) -> None:
        offset, length = _range_of(request, self.size)
        request.setHeader(b"content-length", b"%d" % (length,))
        with open(self.path, "rb") as f:
            try:
                sent = await send_file_range(
                    request, f, offset, length,
                    reactor=self.reactor or reactor(), stall_timeout=self.stall_timeout,
                )
            except BaseException as e:
                self.outcomes.append(Outcome(error=e, file_closed=f.closed, producer=request.producer))
                return
            self.outcomes.append(Outcome(sent=sent, file_closed=f.closed, producer=request.producer))
        request.finish()


@pytest.fixture
def listen() -> Iterator[Callable[..., int]]:
    """Listen on loopback (TCP, or TLS with ``tls=``); returns the port number."""
    ports: list[Any] = []

    def start(resource: Any, tls: Any = None) -> int:
        site = Site(resource)
        if tls is None:
            port = reactor().listenTCP(0, site, interface="127.0.0.1")
        else:
            port = reactor().listenSSL(0, site, tls, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def sendfile_calls(monkeypatch: Any) -> dict[str, int]:
    """Count os.sendfile calls, bytes and EAGAINs, to see which path ran."""
    counts = {"calls": 0, "bytes": 0, "eagain": 0}
    real = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        counts["calls"] += 1
        try:
            n = real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            counts["eagain"] += 1
            raise
        counts["bytes"] += n
        return n

    monkeypatch.setattr(os, "sendfile", spy)
    return counts


async def next_outcome(outcomes: DeferredQueue[Outcome], timeout: float = 10.0) -> Outcome:
    d = outcomes.get()
    d.addTimeout(timeout, reactor())
    return await d


# --- a raw HTTP/1.1 client --------------------------------------------------------


@attrs.define
class RawResponse:
    status: int
    headers: dict[bytes, bytes]
    length: int
    digest: Any = attrs.Factory(hashlib.sha256)
    received: int = 0

    def sha256(self) -> str:
        return self.digest.hexdigest()


class RawClient(Protocol):
    """Parses Content-Length responses as they stream, hashing bodies, holding none.

    ``pause_after``: stop reading after that many bytes, for ``pause_for``
    seconds (None: until told). ``abort_after``: reset the connection then.
    """

    transport: Any

    def __init__(self, pause_after: int | None = None, pause_for: float | None = 0.0,
                 abort_after: int | None = None) -> None:
        self.responses: DeferredQueue[RawResponse] = DeferredQueue()
        self.lost_reason: Failure | None = None
        self._lost_waiters: list[Deferred[None]] = []
        self.total = 0
        self.paused = False
        self._pause_after = pause_after
        self._pause_for = pause_for
        self._abort_after = abort_after
        self._head = b""
        self._current: RawResponse | None = None

    def request(self, query: str, method: str = "GET") -> None:
        self.transport.write(
            "{} /file?{} HTTP/1.1\r\nHost: test\r\n\r\n".format(method, query).encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.total += len(data)
        self._parse(data)
        if self._abort_after is not None and self.total >= self._abort_after:
            self._abort_after = None
            self.transport.abortConnection()
        elif self._pause_after is not None and self.total >= self._pause_after:
            self._pause_after = None
            self.paused = True
            self.transport.pauseProducing()
            if self._pause_for is not None:
                reactor().callLater(self._pause_for, self.resume)

    def resume(self) -> None:
        self.paused = False
        self.transport.resumeProducing()

    def _parse(self, data: bytes) -> None:
        while data:
            if self._current is None:
                self._head += data
                end = self._head.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, data = self._head[:end], self._head[end + 4:]
                self._head = b""
                status_line, *lines = head.split(b"\r\n")
                headers = {}
                for line in lines:
                    key, _, value = line.partition(b":")
                    headers[key.strip().lower()] = value.strip()
                length = int(headers[b"content-length"])
                self._current = RawResponse(int(status_line.split()[1]), headers, length)
            else:
                take = data[: self._current.length - self._current.received]
                data = data[len(take):]
                self._current.digest.update(take)
                self._current.received += len(take)
            if self._current.received == self._current.length:
                self.responses.put(self._current)
                self._current = None

    def connectionLost(self, reason: Failure = Failure(ConnectionAborted())) -> None:
        self.lost_reason = reason
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    async def lost(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the connection to go."""
        if self.lost_reason is not None:
            return
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        d.addTimeout(timeout, reactor())
        await d

    async def next_response(self, timeout: float = 20.0) -> RawResponse:
        d = self.responses.get()
        d.addTimeout(timeout, reactor())
        return await d


async def connect(port: int, client: RawClient, tls: Any = None) -> RawClient:
    endpoint: Any = TCP4ClientEndpoint(reactor(), "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return await connectProtocol(endpoint, client)


async def close(client: RawClient) -> None:
    if client.lost_reason is None:
        client.transport.abortConnection()
    await client.lost()


# --- plain TCP: the sendfile path ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_large_file_exact_bytes(listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]) -> None:
    """128 MiB through treq: every byte, in order, and via sendfile."""
    server = KleinFileServer(big_file.path, big_file.size)
    port = listen(server.app.resource())
    pool = HTTPConnectionPool(reactor(), persistent=False)
    client = HTTPClient(Agent(reactor(), pool=pool))
    response = await client.get("http://127.0.0.1:{}/file".format(port), unbuffered=True)
    assert response.code == 200
    assert response.length == big_file.size
    digest = hashlib.sha256()
    await response.collect(digest.update)
    outcome = await next_outcome(server.outcomes)

    assert digest.hexdigest() == big_file.sha256()
    assert outcome.sent == big_file.size
    assert outcome.sent_length == big_file.size  # the access log sees the bytes
    assert outcome.producer is None  # unregistered before returning
    assert not outcome.file_closed  # the caller owns the file
    assert sendfile_calls["bytes"] == big_file.size
    await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_middle_range(listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]) -> None:
    offset, length = 12_345_677, 20 * MiB + 7
    server = KleinFileServer(big_file.path, big_file.size)
    client = await connect(listen(server.app.resource()), RawClient())
    client.request("offset={}&length={}".format(offset, length))
    response = await client.next_response()
    assert (response.status, response.length) == (200, length)
    assert response.sha256() == big_file.sha256(offset, length)
    assert (await next_outcome(server.outcomes)).sent == length
    assert sendfile_calls["bytes"] == length
    await close(client)


@pytest_twisted.ensureDeferred
async def test_zero_length_and_small_ranges(listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]) -> None:
    """Empty and small bodies go out whole with the headers; then the next response."""
    server = KleinFileServer(big_file.path, big_file.size)
    client = await connect(listen(server.app.resource()), RawClient())
    client.request("offset=1000&length=0")
    empty = await client.next_response()
    assert (empty.status, empty.length, empty.received) == (200, 0, 0)
    assert (await next_outcome(server.outcomes)).sent == 0

    client.request("offset=99&length=1000")
    small = await client.next_response()
    assert small.sha256() == big_file.sha256(99, 1000)
    assert (await next_outcome(server.outcomes)).sent == 1000
    assert sendfile_calls["calls"] == 0
    await close(client)


@pytest_twisted.ensureDeferred
async def test_keep_alive_pipelined_responses_stay_in_order(
    listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]
) -> None:
    """Three requests pipelined on one connection: each response follows the
    whole previous body, and the connection stays usable afterwards."""
    server = KleinFileServer(big_file.path, big_file.size)
    client = await connect(listen(server.app.resource()), RawClient())
    ranges = [(0, 16 * MiB), (5 * MiB + 1, 3 * MiB), (7, 40_000)]
    for offset, length in ranges:
        client.request("offset={}&length={}".format(offset, length))
    for offset, length in ranges:
        response = await client.next_response()
        assert response.length == length
        assert response.sha256() == big_file.sha256(offset, length)

    client.request("offset=0&length=2097152")
    again = await client.next_response()
    assert again.sha256() == big_file.sha256(0, 2 * MiB)
    assert client.lost_reason is None
    assert sendfile_calls["bytes"] == 16 * MiB + 3 * MiB + 2 * MiB
    await close(client)


@pytest_twisted.ensureDeferred
async def test_slow_reader_gets_every_byte(listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]) -> None:
    """A client that stops reading fills the socket (EAGAIN); the server waits
    for writability and resumes where it stopped."""
    length = 48 * MiB
    server = KleinFileServer(big_file.path, big_file.size)
    client = await connect(listen(server.app.resource()), RawClient(pause_after=MiB, pause_for=1.0))
    client.request("offset=3&length={}".format(length))
    response = await client.next_response()
    assert response.sha256() == big_file.sha256(3, length)
    assert (await next_outcome(server.outcomes)).sent == length
    assert sendfile_calls["eagain"] > 0
    await close(client)


@pytest_twisted.ensureDeferred
async def test_client_disconnect_klein_handler_is_cancelled_quietly(
    listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]
) -> None:
    """Klein cancels the handler; we stop, unregister, log nothing (the
    autouse fixture fails the test on any logged error)."""
    server = KleinFileServer(big_file.path, big_file.size)
    client = await connect(listen(server.app.resource()), RawClient(abort_after=2 * MiB))
    client.request("")
    await client.lost()
    outcome = await next_outcome(server.outcomes)
    assert isinstance(outcome.error, CancelledError)
    assert outcome.producer is None
    assert not outcome.file_closed
    assert sendfile_calls["bytes"] < big_file.size
    await deferLater(reactor(), 0.05, lambda: None)  # any late error would surface now


@pytest_twisted.ensureDeferred
async def test_client_disconnect_plain_caller_gets_transfer_aborted(listen: Any, big_file: BigFile) -> None:
    resource = PlainFileResource(big_file.path, big_file.size)
    client = await connect(listen(resource), RawClient(abort_after=MiB))
    client.request("")
    await client.lost()
    await resource.running[0]
    [outcome] = resource.outcomes
    assert isinstance(outcome.error, TransferAborted)
    assert 0 < outcome.error.sent < big_file.size
    assert outcome.error.length == big_file.size
    assert outcome.producer is None


@pytest_twisted.ensureDeferred
async def test_cancel_with_live_connection_aborts_it(listen: Any, big_file: BigFile) -> None:
    """A cancelled transfer cannot finish its Content-Length body, so the
    connection is aborted rather than left open mid-body."""
    resource = PlainFileResource(big_file.path, big_file.size)
    client = await connect(listen(resource), RawClient(pause_after=1, pause_for=None))
    client.request("")
    while not resource.running:
        await deferLater(reactor(), 0.01, lambda: None)
    resource.running[0].cancel()
    [outcome] = resource.outcomes
    assert isinstance(outcome.error, CancelledError)
    assert outcome.producer is None
    client.resume()
    await client.lost()


@pytest_twisted.ensureDeferred
async def test_stall_watchdog_aborts_a_client_that_stops_reading(listen: Any, big_file: BigFile) -> None:
    warnings: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == sendfile.__name__:
            warnings.append(event)

    server = KleinFileServer(big_file.path, big_file.size, stall_timeout=0.3)
    client = await connect(listen(server.app.resource()), RawClient(pause_after=1, pause_for=None))
    globalLogPublisher.addObserver(observe)
    try:
        client.request("")
        outcome = await next_outcome(server.outcomes, timeout=5)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert isinstance(outcome.error, CancelledError)  # Klein saw the abort as a disconnect
    assert outcome.producer is None
    assert [e["log_level"].name for e in warnings] == ["warn"]
    client.resume()
    await client.lost()


class TwoPartResource(PlainFileResource):
    """Sends one range in two calls, as a file that is still being written is
    sent: headers once, one producer per call."""

    async def _send(self, request: Request) -> None:
        offset, length = _range_of(request, self.size)
        first = length // 3
        request.setHeader(b"content-length", b"%d" % (length,))
        with open(self.path, "rb") as f:
            sent = await send_file_range(request, f, offset, first, reactor=reactor())
            assert request.producer is None
            sent += await send_file_range(request, f, offset + first, length - first, reactor=reactor())
        self.outcomes.append(Outcome(sent=sent))
        request.finish()


@pytest_twisted.ensureDeferred
async def test_a_range_sent_in_two_calls(listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]) -> None:
    resource = TwoPartResource(big_file.path, big_file.size)
    client = await connect(listen(resource), RawClient())
    offset, length = 10, 9 * MiB
    client.request("offset={}&length={}".format(offset, length))
    response = await client.next_response()
    assert response.sha256() == big_file.sha256(offset, length)
    assert resource.outcomes[0].sent == length
    assert sendfile_calls["bytes"] == length
    await close(client)


def failing_sendfile(monkeypatch: Any, error: int, after: int) -> None:
    """os.sendfile that fails with ``error`` once ``after`` bytes have gone."""
    real = os.sendfile
    sent = [0]

    def sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        if sent[0] >= after:
            raise OSError(error, os.strerror(error))
        n = real(out_fd, in_fd, offset, min(count, after - sent[0]))
        sent[0] += n
        return n

    monkeypatch.setattr(os, "sendfile", sendfile)


@pytest_twisted.ensureDeferred
async def test_peer_reset_seen_by_sendfile_ends_like_a_disconnect(
    listen: Any, big_file: BigFile, monkeypatch: Any
) -> None:
    """ECONNRESET from sendfile is the client's doing: abort, no error logged."""
    failing_sendfile(monkeypatch, errno.ECONNRESET, after=MiB)
    server = KleinFileServer(big_file.path, big_file.size)
    client = await connect(listen(server.app.resource()), RawClient())
    client.request("")
    outcome = await next_outcome(server.outcomes)
    assert isinstance(outcome.error, CancelledError)
    assert outcome.producer is None
    await client.lost()
    assert client.total < big_file.size


@pytest_twisted.ensureDeferred
async def test_read_error_reaches_the_caller_and_aborts(listen: Any, big_file: BigFile, monkeypatch: Any) -> None:
    failing_sendfile(monkeypatch, errno.EIO, after=MiB)
    resource = PlainFileResource(big_file.path, big_file.size)
    client = await connect(listen(resource), RawClient())
    client.request("")
    await client.lost()
    [outcome] = resource.outcomes
    assert isinstance(outcome.error, OSError) and outcome.error.errno == errno.EIO
    assert outcome.producer is None


@pytest_twisted.ensureDeferred
async def test_file_refusing_sendfile_goes_through_python(
    listen: Any, big_file: BigFile, monkeypatch: Any
) -> None:
    """EINVAL before any byte (a filesystem without sendfile): the chunked path takes over."""
    failing_sendfile(monkeypatch, errno.EINVAL, after=0)
    server = KleinFileServer(big_file.path, big_file.size)
    client = await connect(listen(server.app.resource()), RawClient())
    offset, length = 4096, 6 * MiB + 1
    client.request("offset={}&length={}".format(offset, length))
    response = await client.next_response()
    assert response.sha256() == big_file.sha256(offset, length)
    assert (await next_outcome(server.outcomes)).sent == length
    await close(client)


# --- unit tests: fallback producer and watchdog, on StringTransport and Clock ---------


@attrs.define
class Harness:
    """One request on an HTTPChannel over a StringTransport, all on a Clock."""

    clock: Clock
    transport: Any
    protocol: Any
    resource: PlainFileResource

    @property
    def channel(self) -> Any:
        return self.resource.requests[0].channel

    def body(self) -> bytes:
        return self.transport.value().partition(b"\r\n\r\n")[2]

    def lose_connection(self, stop_producer: bool = True) -> None:
        """What a TCP transport does on connection loss: stop its producer, then tell the protocol."""
        if stop_producer:
            self.transport.producer.stopProducing()
        self.protocol.connectionLost(Failure(ConnectionAborted()))


@pytest.fixture
def harness(big_file: BigFile) -> Callable[..., Harness]:
    def make(query: str, method: str = "GET", stall_timeout: float = 30.0) -> Harness:
        clock = Clock()
        resource = PlainFileResource(big_file.path, big_file.size, clock, stall_timeout)
        protocol = Site(resource, reactor=clock).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived("{} /file?{} HTTP/1.1\r\nHost: test\r\n\r\n".format(method, query).encode())
        return Harness(clock, transport, protocol, resource)

    return make


def producer_calls(clock: Clock) -> list[Any]:
    """Timers our producer still holds on the clock."""
    return [
        call for call in clock.getDelayedCalls()
        if isinstance(getattr(getattr(call, "func", None), "__self__", None), sendfile._RangeProducer)
    ]


def expected(big_file: BigFile, offset: int, length: int) -> bytes:
    with open(big_file.path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_fallback_producer_honours_pause_and_resume(harness: Any, big_file: BigFile) -> None:
    """Not a TCP socket: chunked reads and writes, one chunk per turn, none while paused."""
    offset, length = 1000, 3 * sendfile.CHUNK_SIZE + 10
    h = harness("offset={}&length={}".format(offset, length))
    request = h.resource.requests[0]
    assert isinstance(request.producer, sendfile._RangeProducer)
    assert h.transport.producer is h.channel  # the channel stays the transport's producer
    assert len(h.body()) == sendfile.CHUNK_SIZE  # the first chunk at once, no more this turn

    h.channel.pauseProducing()  # as a transport with a full buffer does
    for _ in range(5):
        h.clock.advance(1)
    assert len(h.body()) == sendfile.CHUNK_SIZE

    h.channel.resumeProducing()
    assert len(h.body()) == 2 * sendfile.CHUNK_SIZE
    while h.clock.getDelayedCalls() and not h.resource.outcomes:
        h.clock.advance(0)
    [outcome] = h.resource.outcomes
    assert outcome.sent == length
    assert request.producer is None
    assert h.body() == expected(big_file, offset, length)
    assert h.transport.producerState == "producing"  # the connection's reading was never touched
    assert not producer_calls(h.clock)  # watchdog and next step gone


@pytest.mark.parametrize("stop_producer", [True, False], ids=["tcp-like", "no-stopProducing"])
def test_stall_watchdog_with_clock(harness: Any, stop_producer: bool) -> None:
    length = 4 * sendfile.CHUNK_SIZE
    h = harness("length={}".format(length), stall_timeout=10.0)
    h.channel.pauseProducing()  # the client stopped reading
    h.clock.advance(9)
    h.channel.resumeProducing()  # ...and read a little: progress resets the watchdog
    h.channel.pauseProducing()
    h.clock.advance(9)
    assert not h.transport.disconnected
    h.clock.advance(1.5)
    assert h.transport.disconnected  # StringTransport.abortConnection
    assert not h.resource.outcomes  # the transfer ends when the loss is reported

    h.lose_connection(stop_producer)
    assert not h.resource.outcomes  # one turn later, after the request saw it
    h.clock.advance(0)
    [outcome] = h.resource.outcomes
    assert isinstance(outcome.error, TransferAborted)
    assert outcome.error.sent == 2 * sendfile.CHUNK_SIZE
    assert outcome.producer is None
    assert not producer_calls(h.clock)


def test_head_sends_headers_only(harness: Any) -> None:
    h = harness("length=1000000", method="HEAD")
    [outcome] = h.resource.outcomes
    assert outcome.sent == 0
    assert b"Content-Length: 1000000" in h.transport.value()
    assert h.body() == b""


def test_range_past_end_of_file_fails_before_writing(harness: Any, big_file: BigFile) -> None:
    h = harness("offset={}&length=200000".format(big_file.size - 100))
    [outcome] = h.resource.outcomes
    assert isinstance(outcome.error, EOFError)
    assert h.transport.value() == b""  # the caller can still send an error response
    assert outcome.producer is None


# --- TLS: the fallback path over a real socket ----------------------------------------


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # Twisted's own ssl glue
@pytest_twisted.ensureDeferred
async def test_tls_uses_the_chunked_producer_and_delivers_exact_bytes(
    listen: Any, big_file: BigFile, sendfile_calls: dict[str, int]
) -> None:
    ca = make_ca()
    server = issue(ca, "localhost", hosts=["localhost", "127.0.0.1"])
    server_tls = ssl.PrivateCertificate.loadPEM(server.key_pem() + server.cert_pem()).options()
    client_tls = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(ca.cert_pem()))
    server = KleinFileServer(big_file.path, big_file.size)
    port = listen(server.app.resource(), tls=server_tls)
    client = await connect(port, RawClient(pause_after=MiB, pause_for=0.2), tls=client_tls)
    offset, length = 777, 24 * MiB
    client.request("offset={}&length={}".format(offset, length))
    response = await client.next_response()
    assert response.sha256() == big_file.sha256(offset, length)
    client.request("offset=0&length=100000")  # keep-alive over TLS too
    assert (await client.next_response()).sha256() == big_file.sha256(0, 100_000)
    assert (await next_outcome(server.outcomes)).sent == length
    assert sendfile_calls["calls"] == 0
    await close(client)
