"""A body written and hashed off the reactor: one batch of chunks at a time, in order.

Writing each chunk of an upload (``os.write``) and hashing it on the reactor
made every request wait whenever the kernel throttled dirty pages and
``write(2)`` blocked. A SerialWriter queues the chunks instead and hands them
to a thread, one batch at a time and in order (``os.write`` and ``hashlib``
release the GIL, so the reactor keeps serving meanwhile). Past ``limit``
bytes not yet written it pauses the connection, and resumes it once the
queue is down to half of that: memory stays flat, whatever the disk's speed.

A failed write (ENOSPC, EIO) is kept and reported once: to ``on_error`` while
the body still arrives (it returns True once it refused the request), else by
the next ``write`` or by ``drain``, which the handler awaits before it
acknowledges or commits the body. ``on_written`` hears, on the reactor,
of each batch once it is written (a mirror fill announces only bytes on
disk to its clients). ``abandon`` waits for a batch under way
before it lets its caller drop the body, so no thread ever writes into a
session that moved on.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from registryd.storage.driver import Pool

#: Bytes accepted but not yet written past which the connection is paused.
QUEUE_LIMIT = 2 * 1024 * 1024
#: A batch starts once this much is queued (or the body ends): few thread hops per body.
MIN_BATCH = 256 * 1024


class SerialWriter:
    """Feeds ``write`` (blocking: a spool's write and a hasher's update) in ``pool``, in order.

    ``producer`` is the connection the body arrives on (pauseProducing,
    resumeProducing), or None. Upload bodies (registryd.web.request) and
    mirror fills (registryd.mirror.fill) use it.
    """

    def __init__(self, write: Callable[[bytes], None], pool: Pool, producer: Any = None, *,
                 limit: int = QUEUE_LIMIT, min_batch: int = MIN_BATCH,
                 on_error: Callable[[Exception], bool] | None = None,
                 on_written: Callable[[int], None] | None = None, join: bool = True) -> None:
        """``join``: hand ``write`` each batch as one buffer (see _write_all); False for
        large chunks, which go one by one (joined, a batch would be in memory twice)."""
        self._write = write
        self._write_batch = _write_all if join else _write_each
        self._pool = pool
        self._producer = producer
        self._limit = limit
        self._min_batch = min(min_batch, limit)
        self.on_error = on_error
        self.on_written = on_written
        self._queue: deque[bytes] = deque()
        self._queued = 0        # bytes in the queue
        self._in_flight = 0     # bytes of the batch a thread writes now
        self._busy = False
        self._paused = False
        self._flushing = False  # the body is complete: write whatever is queued
        self._abandoned = False
        self._error: Exception | None = None
        self._reported = False
        self._idle: list[Deferred[None]] = []
        self._after_abandon: Callable[[], None] | None = None

    @property
    def pending(self) -> int:
        """Bytes accepted and not yet written."""
        return self._queued + self._in_flight

    @property
    def paused(self) -> bool:
        return self._paused

    def write(self, data: bytes) -> None:
        """Queue ``data``; raises the error a batch met, so the caller refuses the rest."""
        if self._error is not None:
            self._reported = True
            raise self._error
        if self._abandoned or not data:
            return
        self._queue.append(data)
        self._queued += len(data)
        if self.pending > self._limit and self._producer is not None:   # again: another may have resumed it
            self._paused = True
            self._producer.pauseProducing()
        if self._queued >= self._min_batch:
            self._next()

    async def drain(self) -> None:
        """Once every queued byte is written; raises the error a batch met (if not reported yet)."""
        self._flushing = True
        self._next()
        if self._busy:
            waiter: Deferred[None] = Deferred()
            self._idle.append(waiter)
            await waiter
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def abandon(self, then: Callable[[], None]) -> None:
        """Drop what is queued; call ``then`` (which may drop the body) once no batch is under way."""
        if self._abandoned:
            return
        self._abandoned = True
        self._queue.clear()
        self._queued = 0
        if self._busy:
            self._after_abandon = then
        else:
            then()

    def _next(self) -> None:
        if self._busy or self._abandoned or self._error is not None or not self._queue:
            return
        if self._queued < self._min_batch and not self._flushing:
            return
        batch = list(self._queue)
        self._queue.clear()
        self._in_flight, self._queued = self._queued, 0
        self._busy = True
        Deferred.fromCoroutine(self._pool.run(self._write_batch, self._write, batch)).addBoth(self._done)

    def _done(self, outcome: Any) -> None:
        self._busy = False
        written, self._in_flight = self._in_flight, 0
        if isinstance(outcome, Failure):
            error = outcome.value
            self._error = error if isinstance(error, Exception) else RuntimeError(str(error))
            self._queue.clear()
            self._queued = 0
        if self._abandoned:
            then, self._after_abandon = self._after_abandon, None
            if then is not None:
                then()
        elif self._error is not None:
            if not self._flushing and self.on_error is not None and self.on_error(self._error):
                self._reported = True
            elif self._paused:
                self._paused = False    # so that the next chunk meets the error
                self._producer.resumeProducing()
        else:
            if self.on_written is not None:
                self.on_written(written)
            if self._paused and self.pending <= self._limit // 2:
                self._paused = False
                if not self._flushing:   # a complete request's connection is the channel's to resume
                    self._producer.resumeProducing()
            self._next()
        if not self._busy:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.called:    # a cancelled request no longer waits
                    waiter.callback(None)


def _write_all(write: Callable[[bytes], None], batch: list[bytes]) -> None:
    """In the thread: the batch's chunks, in order, as one buffer.

    One ``write`` per batch instead of one per chunk (the transport reads 64 KiB
    at a time): each ``os.write`` and hash update gives up the GIL and has to win
    it back from the reactor's thread, and per chunk those hand-overs were most of
    a push's time (py-spy). Joining costs one memory copy, a fraction of the hash.
    """
    write(batch[0] if len(batch) == 1 else b"".join(batch))


def _write_each(write: Callable[[bytes], None], batch: list[bytes]) -> None:
    """In the thread: the batch's chunks, in order, one ``write`` each."""
    for chunk in batch:
        write(chunk)
