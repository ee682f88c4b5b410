"""One upstream fetch per blob, written to a partial file that clients tail.

The fetch writes each chunk to ``tmp/fill-<id>`` and into the hasher as it
arrives, in a thread (a SerialWriter: a disk that stalls never stalls the
reactor, and the upstream connection is paused while too much waits);
every client, the first included, reads that file at its own pace and is
woken when more bytes are on disk (never before: ``written`` counts only
bytes written), so a slow client never slows the fetch or the others.
Until the digest is verified a client is never given the blob's last byte
(``releasable``): whatever goes wrong, no client holds a body that looks
complete. On success the file is renamed into the blob store; on any
failure (a failed write, ENOSPC, included) the partial file is removed and
the clients are told, so they can abort their connections.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Awaitable, Callable

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from registryd.deferreds import Shared
from registryd.digest import Digest
from registryd.serial_writer import SerialWriter
from registryd.storage.driver import Pool
from registryd.storage.outage import outage_reason
from registryd.threads import InlinePool

log = Logger()


#: Bytes per read from the upstream socket while a fill receives a body (Twisted reads 64 KiB):
#: each read's chunk costs a trip through the HTTP client's parser and towards the writer thread,
#: which made up about a fifth of a fill's CPU (py-spy).
UPSTREAM_READ = 1024 * 1024

#: A fill's chunks go to the thread as they come (more wait meanwhile, and go as one batch):
#: clients are sent bytes as soon as they are on disk, however slowly upstream sends them.
MIN_BATCH = 1


class FillFailed(Exception):
    """The upstream transfer did not produce the blob (reason in the message)."""


class BlobFill:
    """The state of one blob's transfer from upstream, shared by its readers."""

    def __init__(self, digest: Digest, tmp_dir: str, reactor: Any, idle_timeout: float,
                 commit: Callable[[str, Digest], Awaitable[None]], claim: Any = None,
                 pool: Pool | None = None) -> None:
        """``claim``: a registryd.mirror.shared_fill.FillClaim when other worker processes follow this fill.
        ``pool``: where the partial file is written and hashed (the IO pool; inline without one)."""
        self.digest = digest
        self._commit = commit
        self._claim = claim
        self.path = claim.part_path if claim is not None else os.path.join(tmp_dir, f"fill-{uuid.uuid4().hex}")
        self.size: int | None = None
        self.written = 0        # bytes on disk (not merely received): all that clients may be given
        self.done = False
        # The digest matched: every written byte may go to clients (set before the commit).
        self.verified = False
        self.error: FillFailed | None = None
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._hasher = digest.hasher()
        self._fd: int | None = None
        self._pool: Pool = pool if pool is not None else InlinePool()
        self._writer: SerialWriter | None = None
        self._waiters: dict[Deferred[None], int] = {}
        self._watchdog: IDelayedCall | None = None
        self._transport: Any = None
        self._on_finished: list[Callable[[], Any]] = []
        self._end_waiters: list[Deferred[None]] = []
        # Ends (never fails) once the upstream answered; start_error says how.
        # The cache sets it to its request of the upstream.
        self.started: Shared[None] = Shared(Deferred())
        self.start_error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.error is not None

    @property
    def releasable(self) -> int:
        """How many bytes a client may be sent now: all once verified, else never the last one.

        With a known size the blob's final byte is held back; with an unknown
        one, the last byte written so far (it may be the final one).
        """
        if self.verified:
            return self.written
        limit = self.written - 1 if self.size is None else min(self.written, self.size - 1)
        return max(limit, 0)

    def progress(self, position: int) -> Deferred[None]:
        """Fires once more than ``position`` bytes are releasable, or the digest is
        verified, or the fill ends.

        Cancelling it removes only this reader's wait.
        """
        if self._ready(position):
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters[waiter] = position
        return waiter

    def ended(self) -> Deferred[None]:
        """Fires once the fill is stored or failed; cancelling it removes only this wait."""
        waiter: Deferred[None] = Deferred(self._forget_end)
        if self.finished:
            waiter.callback(None)
        else:
            self._end_waiters.append(waiter)
        return waiter

    def on_finished(self, callback: Callable[[], Any]) -> None:
        self._on_finished.append(callback)

    def _finish(self) -> None:
        callbacks, self._on_finished = self._on_finished, []
        for callback in callbacks:
            callback()
        waiters, self._end_waiters = self._end_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._wake()

    def _forget(self, waiter: Deferred[None]) -> None:
        self._waiters.pop(waiter, None)

    def _forget_end(self, waiter: Deferred[None]) -> None:
        if waiter in self._end_waiters:
            self._end_waiters.remove(waiter)

    def _ready(self, position: int) -> bool:
        return self.releasable > position or self.verified or self.finished

    def _wake(self) -> None:
        ready = [d for d, position in self._waiters.items() if self._ready(position)]
        for waiter in ready:
            del self._waiters[waiter]
            waiter.callback(None)

    # The transfer itself.

    def begin(self, response: IResponse) -> None:
        """Start writing ``response``'s body (status already checked)."""
        self.size = response.length if isinstance(response.length, int) else None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if self._claim is not None:
            self._claim.started(self.size)
        self._arm_watchdog()
        response.deliverBody(_FillProtocol(self))

    def _writer_for(self, producer: Any) -> SerialWriter:
        """The serial writer of the partial file, pausing ``producer`` (the upstream body) while too much waits."""
        fd, hasher = self._fd, self._hasher
        assert fd is not None
        return SerialWriter(lambda chunk: write_chunk(fd, hasher, chunk), self._pool, producer,
                            min_batch=MIN_BATCH, on_error=self._write_failed, on_written=self._on_disk,
                            join=False)   # the chunks are up to UPSTREAM_READ: few hand-overs of the GIL

    @property
    def unwritten(self) -> int:
        """Bytes received from upstream and not yet on disk (at most about the writer's limit)."""
        return 0 if self._writer is None else self._writer.pending

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self._idle_timeout)
        else:
            self._watchdog = self._reactor.callLater(self._idle_timeout, self._stalled)

    def _stalled(self) -> None:
        if self._writer is not None and self._writer.paused:
            self._arm_watchdog()    # the disk is slow, not upstream: it is paused meanwhile
            return
        self.fail(FillFailed(f"upstream sent nothing for {self._idle_timeout}s"))
        if self._transport is not None:
            self._transport.stopProducing()

    def data(self, chunk: bytes) -> None:
        if self.finished or self._fd is None:
            return
        if self._writer is None:
            self._writer = self._writer_for(self._transport)
        self._arm_watchdog()
        self._writer.write(chunk)

    def _on_disk(self, count: int) -> None:
        """A batch is written: its bytes may go to clients (and followers see them in the file)."""
        self.written += count
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self._idle_timeout)   # it may have been paused for the disk until now
        self._wake()

    def _write_failed(self, error: Exception) -> bool:
        """Writing the partial file failed (ENOSPC, EIO) while the body arrives: the fill fails."""
        self.fail(FillFailed(f"writing the partial file failed: {error}"))
        if self._transport is not None:
            self._transport.stopProducing()
        return True

    def on_body_end(self) -> None:
        Deferred.fromCoroutine(self._complete()).addErrback(
            lambda f: log.failure("finishing the fill of {digest} failed", f, digest=str(self.digest)))

    async def _complete(self) -> None:
        """The body ended: once it is all on disk, verify and commit, or fail."""
        self._stop_watchdog()
        if self._writer is not None and self.error is None:
            try:
                await self._writer.drain()
            except Exception as e:
                self.fail(FillFailed(f"writing the partial file failed: {e}"))
                return
        if self.error is not None:
            return
        self._close()
        if self.size is not None and self.written != self.size:
            self.fail(FillFailed(f"upstream sent {self.written} of {self.size} bytes"))
            return
        if self._hasher.hexdigest() != self.digest.hex:
            self.fail(FillFailed(f"upstream content does not match {self.digest}"))
            return
        # Clients may have the tail now: the bytes are right even if storing them fails.
        self.verified = True
        if self._claim is not None:
            self._claim.verified()
        self._wake()
        try:
            await self._commit(self.path, self.digest)
        except Exception as e:
            reason = outage_reason(e)
            if reason is None:
                log.failure("committing {digest} failed", digest=str(self.digest))
            else:
                log.warn("storing {digest} failed: {reason}", digest=str(self.digest), reason=reason)
            self.fail(FillFailed(f"storing the blob failed: {reason or e}"))
            return
        self.done = True
        if self._claim is not None:
            self._claim.finished(None)
        self._finish()

    def stored_elsewhere(self) -> None:
        """Another process stored the blob just before this one claimed the fill: nothing to fetch."""
        if self._claim is not None:
            self._claim.release()
        self.done = True
        self._finish()

    def fail(self, error: FillFailed) -> None:
        if self.finished:
            return
        self.error = error
        self._stop_watchdog()
        if self._writer is not None:
            self._writer.abandon(self._discard)   # once no thread writes into the file
        else:
            self._discard()
        if self._claim is not None:
            self._claim.finished(str(error))
        log.warn("fetching {digest} failed: {error}", digest=str(self.digest), error=str(error))
        self._finish()

    def _discard(self) -> None:
        self._close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()


def write_chunk(fd: int, hasher: Any, chunk: bytes) -> None:
    """In a thread: ``chunk`` appended to the partial file and hashed (both release the GIL)."""
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]
    hasher.update(chunk)


def _socket_under(transport: Any) -> tcp.Connection | None:
    """The TCP connection under a response body's ``transport``: Twisted's proxy (its
    ``_producer``) of the client protocol's transport, the connection itself or TLS on it."""
    layer = getattr(transport, "_producer", transport)
    for _ in range(2):
        if isinstance(layer, tcp.Connection):
            return layer
        layer = getattr(layer, "transport", None)
    return None


class _FillProtocol(Protocol):
    """Receives the upstream body into a BlobFill."""

    def __init__(self, fill: BlobFill) -> None:
        self._fill = fill
        self._socket: tcp.Connection | None = None
        self._read_size = 0

    def makeConnection(self, transport: Any) -> None:
        self._fill._transport = transport
        # Larger reads while the body arrives; a kept-alive connection goes back to the pool as it was.
        self._socket = _socket_under(transport)
        if self._socket is not None:
            self._read_size = self._socket.bufferSize
            self._socket.bufferSize = max(self._read_size, UPSTREAM_READ)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self._fill.data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._fill._transport = None
        if self._socket is not None:
            self._socket.bufferSize = self._read_size
            self._socket = None
        if reason.check(ResponseDone):
            self._fill.on_body_end()
        else:
            self._fill.fail(FillFailed(f"upstream transfer broke off: {reason.getErrorMessage()}"))
