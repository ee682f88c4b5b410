"""The serial writer (registryd.serial_writer): an upload body written and hashed off the
reactor, in order, with the connection paused while too much waits."""
from __future__ import annotations

import errno
import hashlib
import os
import threading
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred

from registryd.threads import BlockingPool
from registryd.serial_writer import SerialWriter
from registryd.web.request import UploadBody


class StepPool:
    """A pool whose jobs run when the test says (``step``): a batch under way, held still."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        done: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, done))
        return await done

    def step(self) -> None:
        fn, args, done = self.jobs.pop(0)
        try:
            result = fn(*args)
        except Exception as e:
            done.errback(e)
        else:
            done.callback(result)


class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1


@pytest_twisted.ensureDeferred
async def test_chunks_are_written_and_hashed_in_order_in_another_thread() -> None:
    pool = BlockingPool(reactor, 2, "test-body")
    pool.start()
    try:
        written = bytearray()
        hasher = hashlib.sha256()
        threads = set()

        def write(data: bytes) -> None:
            threads.add(threading.get_ident())
            written.extend(data)
            hasher.update(data)

        writer = SerialWriter(write, pool, Producer(), limit=256 * 1024, min_batch=16 * 1024)
        chunks = [os.urandom(size) for size in [1, 7000, 65536, 3, 40000] * 40]
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        body = b"".join(chunks)
        assert bytes(written) == body
        assert hasher.hexdigest() == hashlib.sha256(body).hexdigest()
        assert threading.get_ident() not in threads
        assert writer.pending == 0
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_the_connection_pauses_past_the_limit_and_resumes_once_the_queue_drains() -> None:
    pool, producer, written = StepPool(), Producer(), bytearray()
    writer = SerialWriter(written.extend, pool, producer, limit=100, min_batch=10)
    writer.write(b"a" * 10)                      # a batch starts, held still
    assert len(pool.jobs) == 1 and not producer.paused
    for _ in range(9):
        writer.write(b"b" * 10)
    assert not producer.paused and writer.pending == 100
    writer.write(b"c" * 10)                      # 110 bytes waiting: past the limit
    assert producer.paused and writer.paused
    pool.step()                                  # the first 10 written, 100 wait: still past half
    assert bytes(written) == b"a" * 10 and producer.paused and len(pool.jobs) == 1
    pool.step()                                  # all written
    assert producer.resumes == 1 and not producer.paused and not writer.paused
    assert bytes(written) == b"a" * 10 + b"b" * 90 + b"c" * 10
    writer.write(b"d" * 5)                       # less than a batch waits for more, or the end
    assert pool.jobs == []
    drained = Deferred.fromCoroutine(writer.drain())
    assert not drained.called
    pool.step()
    assert drained.called and bytes(written).endswith(b"d" * 5)
    await drained


@pytest_twisted.ensureDeferred
async def test_a_failed_write_refuses_the_body_once_and_writes_nothing_more() -> None:
    pool, producer, written, errors = StepPool(), Producer(), [], []

    def write(data: bytes) -> None:
        if b"full" in data:                       # a batch goes as one buffer
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data)

    writer = SerialWriter(write, pool, producer, limit=8, min_batch=1,
                          on_error=lambda e: errors.append(e) is None)
    writer.write(b"one")
    writer.write(b"full")
    writer.write(b"two")                          # queued behind the batch under way; paused
    assert producer.paused
    pool.step()
    pool.step()                                   # "full" fails: reported, "two" is never written
    assert [e.errno for e in errors] == [errno.ENOSPC]
    assert written == [b"one"] and pool.jobs == []
    with pytest.raises(OSError):
        writer.write(b"three")
    await writer.drain()                          # already reported: not twice


@pytest_twisted.ensureDeferred
async def test_a_write_failing_after_the_body_ended_is_raised_by_drain() -> None:
    pool, errors = StepPool(), []

    def write(data: bytes) -> None:
        raise OSError(errno.EIO, "Input/output error")

    writer = SerialWriter(write, pool, Producer(), on_error=lambda e: errors.append(e) is None)
    writer.write(b"last chunk")
    drained = Deferred.fromCoroutine(writer.drain())
    pool.step()
    with pytest.raises(OSError) as caught:
        await drained
    assert caught.value.errno == errno.EIO and errors == []


@pytest_twisted.ensureDeferred
async def test_an_abandoned_body_is_dropped_only_once_its_batch_under_way_is_written() -> None:
    pool, written, dropped = StepPool(), [], []
    writer = SerialWriter(written.append, pool, Producer(), limit=100, min_batch=1)
    writer.write(b"under way")
    writer.write(b"queued")
    writer.abandon(lambda: dropped.append(list(written)))
    assert dropped == []                          # a thread still writes into the body
    pool.step()
    assert dropped == [[b"under way"]]            # then dropped; what was queued never written
    assert pool.jobs == []
    writer.write(b"late")                         # after the end of the connection: ignored
    assert pool.jobs == [] and written == [b"under way"]
    idle = SerialWriter(written.append, pool, None)
    idle.abandon(lambda: dropped.append("at once"))
    assert dropped[-1] == "at once"


class SessionWriter:
    """Stands for the upload store's writer: it must never be written after it was dropped."""

    upload: Any = None
    start = end = 0

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.dropped = 0

    @property
    def written(self) -> int:
        return sum(map(len, self.chunks))

    def write(self, data: bytes) -> None:
        assert not self.dropped, "written after it was dropped"
        self.chunks.append(data)

    def abandon(self) -> None:
        self.dropped += 1


@pytest_twisted.ensureDeferred
async def test_a_request_gone_while_its_body_drains_drops_it_once_its_batch_is_written() -> None:
    for gone in ("cancelled", "connection lost"):
        pool, session = StepPool(), SessionWriter()
        body = UploadBody(session, pool=pool, producer=Producer())
        body.write(b"x" * (512 * 1024))                # a batch under way
        claiming = Deferred.fromCoroutine(body.claim())
        if gone == "cancelled":
            claiming.cancel()
        else:
            body.abandon()
        assert session.dropped == 0
        pool.step()
        assert session.dropped == 1 and session.written == 512 * 1024
        with pytest.raises(CancelledError):
            await claiming
        body.abandon()
        assert session.dropped == 1


@pytest_twisted.ensureDeferred
async def test_a_claimed_body_is_the_writer_once_every_chunk_is_written() -> None:
    pool, session = StepPool(), SessionWriter()
    body = UploadBody(session, pool=pool, producer=Producer())
    body.write(b"a" * 300_000)
    body.write(b"b" * 10)
    claiming = Deferred.fromCoroutine(body.claim())
    pool.step()
    assert not claiming.called
    pool.step()
    assert await claiming is session and session.chunks == [b"a" * 300_000, b"b" * 10]
    body.abandon()                                   # the handler owns it now
    assert session.dropped == 0


def test_on_written_hears_of_each_batch_only_once_it_is_written() -> None:
    """A mirror fill announces bytes to its clients from on_written: never before they are on disk."""
    pool, disk, heard = StepPool(), bytearray(), []

    def write(data: bytes) -> None:
        if data == b"full":
            raise OSError(errno.ENOSPC, "No space left on device")
        disk.extend(data)

    writer = SerialWriter(write, pool, Producer(), limit=1024, min_batch=1,
                          on_written=lambda count: heard.append((count, len(disk))),
                          on_error=lambda error: True)
    writer.write(b"a" * 10)               # a batch under way
    writer.write(b"b" * 20)               # these wait for it, then go as one batch
    writer.write(b"c" * 30)
    assert heard == []
    pool.step()
    assert heard == [(10, 10)]
    pool.step()
    assert heard == [(10, 10), (50, 60)]
    writer.write(b"full")
    pool.step()
    assert heard == [(10, 10), (50, 60)]   # a failed batch is never announced


def test_the_chunks_of_a_batch_reach_the_write_as_one_buffer() -> None:
    """One ``write`` (one os.write, one hash update) per batch, not per 64 KiB chunk: each is a
    hand-over of the GIL between the writing thread and the reactor's."""
    pool, calls = StepPool(), []
    writer = SerialWriter(calls.append, pool, Producer(), limit=1024, min_batch=40)
    for chunk in (b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10, b"e" * 10):
        writer.write(chunk)               # the batch starts at 40 bytes; "e" waits for the next
    pool.step()
    assert calls == [b"a" * 10 + b"b" * 10 + b"c" * 10 + b"d" * 10]


def test_an_upload_body_reads_its_connection_in_bigger_pieces() -> None:
    """Twisted reads 64 KiB at a time; each read is a trip through the HTTP parser on the reactor."""
    from registryd.web.request import READ_SIZE

    class TCPTransport(Producer):
        bufferSize = 64 * 1024

    transport = TCPTransport()
    UploadBody(SessionWriter(), pool=StepPool(), producer=transport)
    assert transport.bufferSize == READ_SIZE >= 256 * 1024


def test_a_writer_that_does_not_join_hands_on_each_chunk_of_a_batch_as_it_came() -> None:
    """A mirror fill's chunks are up to 1 MiB: joined, a batch would be in memory twice."""
    pool, calls = StepPool(), []
    writer = SerialWriter(calls.append, pool, Producer(), limit=1024, min_batch=1, join=False)
    writer.write(b"a" * 10)               # a batch under way
    writer.write(b"b" * 20)               # these wait for it, then go as one batch
    writer.write(b"c" * 30)
    pool.step()
    pool.step()
    assert calls == [b"a" * 10, b"b" * 20, b"c" * 30]
