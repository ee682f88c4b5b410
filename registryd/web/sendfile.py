"""Stream a byte range of an open file into a twisted.web response, fast.

Blob GETs dominate a registry's traffic.  On plain TCP the bytes go from the
page cache to the socket with ``os.sendfile`` and never enter Python.  Over
registryd's own TLS transport (registryd.tls_transport) large chunks are read
into one reused buffer, encrypted in one call each and written to the socket
directly, several per reactor turn.  Any other transport gets an ordinary push
producer writing large chunks.

Either way one producer per transfer is registered with the request, so
Twisted's backpressure and aborts apply, and a stall watchdog aborts clients
that stop reading: Twisted's idle timeout is off while a response is sent, so
without it such a client would hold the file open forever.
"""
from __future__ import annotations

import errno
import io
import os
import stat
from typing import Any, BinaryIO

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import Request
from zope.interface import implementer

from registryd.tls_transport import LeanTLSTransport

log = Logger()

#: Bytes per read+write in the fallback path; larger than the transport's
#: 64 KiB buffer, so every write applies backpressure at once.
CHUNK_SIZE = 256 * 1024

#: Bytes handed to the kernel per ``os.sendfile`` call and per reactor turn,
#: so one fast client cannot starve the others (and a cold page cache blocks
#: the reactor for one bounded read at most).
SENDFILE_CALL = 1024 * 1024
SENDFILE_TURN = 4 * 1024 * 1024

#: Plaintext bytes per read+encrypt+send over TLS, and per reactor turn: big
#: enough that the Python steps per chunk cost little, small enough to stay in
#: the CPU caches between the read, the cipher and the send.
TLS_CHUNK = 256 * 1024
TLS_TURN = 4 * 1024 * 1024

#: Bodies up to this size are read and written in one piece: the headers
#: and body then leave in one send, without a producer or an extra turn.
SMALL_BODY = 64 * 1024

# sendfile(2) errors that mean the peer is gone: the client's doing, not ours.
_PEER_GONE = frozenset(
    {
        errno.EPIPE,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)
# sendfile(2) errors that mean this file cannot be sent that way (some FUSE
# and network filesystems): fall back to reads and writes.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class TransferAborted(Exception):
    """
    The connection went away before the whole range was sent: the client
    disconnected, or the stall watchdog aborted it.  The response is dead;
    the caller must not finish the request.
    """

    def __init__(self, sent: int, length: int) -> None:
        super().__init__(sent, length)
        self.sent = sent
        self.length = length

    def __str__(self) -> str:
        return "connection lost after {} of {} bytes".format(self.sent, self.length)


async def send_file_range(
    request: Request,
    fileobj: BinaryIO,
    offset: int,
    length: int,
    *,
    reactor: IReactorTime,
    stall_timeout: float = 300.0,
) -> int:
    """
    Send exactly C{length} bytes of C{fileobj} from C{offset} as the body.

    The caller has set the response code and every header (Content-Length
    included); this writes the headers if they are not out yet, never calls
    C{request.finish()} and never closes C{fileobj}.  It may be called again
    on the same request to send a further range (a file that is still being
    written), as long as the earlier call has returned.

    Returns the number of bytes sent: C{length}, or 0 for HEAD and 204/304.

    Raises L{TransferAborted} when the client disconnects or the stall
    watchdog aborts the connection; it is raised one reactor turn after the
    request has seen the connection go, so a handler that Klein cancels on
    disconnect sees C{CancelledError} instead and nothing is logged.  Either
    way the caller must not finish the request.  If the awaiting Deferred is
    cancelled, everything stops and the producer is unregistered; when the
    connection is still up it is aborted too, since the promised body can no
    longer follow.  Raises C{EOFError} if the file holds fewer bytes than
    promised (before anything is written when that is known up front, else
    after aborting the connection) and C{OSError} for read errors.
    """
    if offset < 0 or length < 0:
        raise ValueError("bad range: offset={} length={}".format(offset, length))
    if request.channel is None:
        raise TransferAborted(0, length)
    if length == 0 or request.method == b"HEAD" or request.code in NO_BODY_CODES:
        request.write(b"")
        return 0
    _check_file_size(fileobj, offset + length)
    if length <= SMALL_BODY:
        data = _read_at(fileobj, offset, length)
        if len(data) != length:
            raise EOFError("file ended at {}, before {}".format(offset + len(data), offset + length))
        request.write(data)
        return length
    request.write(b"")
    producer = _RangeProducer(
        request,
        fileobj,
        offset,
        length,
        reactor=reactor,
        stall_timeout=stall_timeout,
        sendfile_transport=_sendfile_transport(request, fileobj),
        tls_transport=_tls_transport(request, fileobj),
    )
    return await producer.start()


def _has_descriptor(fileobj: BinaryIO) -> bool:
    """Whether the file's bytes can be read by descriptor (not a BytesIO, say)."""
    try:
        fileobj.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
    return True


def _sendfile_transport(request: Request, fileobj: BinaryIO) -> tcp.Connection | None:
    """
    The TCP transport to sendfile into, or None when bytes must go through
    Python: TLS, HTTP/2, wrapped transports, chunked bodies, files without a
    descriptor.
    """
    if request.chunked or not hasattr(os, "sendfile"):
        return None
    channel = request.channel
    transport = getattr(channel, "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    # The step-aside trick below relies on the channel being the transport's
    # streaming producer, as HTTPChannel.connectionMade arranges.
    if transport.producer is not channel or not transport.streamingProducer:
        return None
    return transport if _has_descriptor(fileobj) else None


def _tls_transport(request: Request, fileobj: BinaryIO) -> LeanTLSTransport | None:
    """
    registryd's TLS transport over a TCP connection, to encrypt file chunks
    straight from a reused buffer; None for anything else.
    """
    if request.chunked:
        return None
    transport = getattr(request.channel, "transport", None)
    if not isinstance(transport, LeanTLSTransport):
        return None
    tcp_transport = transport.tcp_transport
    if not isinstance(tcp_transport, tcp.Connection) or not tcp_transport.streamingProducer:
        return None
    # Waiting for the socket relies on the channel (behind Twisted's TLS
    # producer membrane) being the TCP transport's producer.
    membrane = tcp_transport.producer
    if getattr(membrane, "_producer", None) is not request.channel:
        return None
    return transport if _has_descriptor(fileobj) else None


_scratch: memoryview | None = None


def _tls_scratch() -> memoryview:
    """The one plaintext buffer of the process: each chunk is encrypted before the
    reactor does anything else, so transfers never need it at the same time."""
    global _scratch
    if _scratch is None:
        _scratch = memoryview(bytearray(TLS_CHUNK))
    return _scratch


def _check_file_size(fileobj: BinaryIO, end: int) -> None:
    """Refuse a range past the end of a regular file before any byte is written."""
    try:
        st = os.fstat(fileobj.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return
    if stat.S_ISREG(st.st_mode) and st.st_size < end:
        raise EOFError("file holds {} bytes, range ends at {}".format(st.st_size, end))


def _read_at(fileobj: BinaryIO, position: int, size: int) -> bytes:
    """One positioned read; seeking each time leaves nothing to the caller's file position."""
    fileobj.seek(position)
    return fileobj.read(size)


@implementer(IPushProducer)
class _RangeProducer:
    """
    One transfer: a push producer registered with the request for its whole
    life, sending with sendfile or with reads and writes.

    The sendfile path never puts bytes in the transport's buffer.  Whenever
    it must wait -- for the headers (or anything else buffered) to leave, for
    socket space after EAGAIN, or after its per-turn budget -- it marks the
    channel, the transport's producer, as paused and asks the reactor for
    writability.  FileDescriptor.doWrite resumes a paused producer only once
    its buffer is empty, so the channel's resumeProducing reaches us exactly
    when sendfile cannot overtake buffered bytes, and the next response on a
    keep-alive connection is only written after our last byte has left.
    """

    def __init__(
        self,
        request: Request,
        fileobj: BinaryIO,
        offset: int,
        length: int,
        *,
        reactor: IReactorTime,
        stall_timeout: float,
        sendfile_transport: tcp.Connection | None,
        tls_transport: LeanTLSTransport | None = None,
    ) -> None:
        self._request = request
        self._transport: Any = request.channel.transport
        self._file = fileobj
        self._position = offset
        self._remaining = length
        self._length = length
        self._sent = 0
        self._reactor = reactor
        self._stall_timeout = stall_timeout
        self._sendfile_to = sendfile_transport
        self._tls_to = tls_transport
        self._socket_fd = -1
        self._file_fd = -1
        if sendfile_transport is not None:
            self._socket_fd = sendfile_transport.fileno()
            self._file_fd = fileobj.fileno()
        elif tls_transport is not None:
            self._file_fd = fileobj.fileno()
        self._done: Deferred[int] = Deferred(self._cancel)
        self._finished = False
        self._halted = False
        self._paused = False
        self._stepping = False
        self._next_step: IDelayedCall | None = None
        self._watchdog: IDelayedCall | None = None
        self._report: IDelayedCall | None = None
        self._last_progress = 0.0

    def start(self) -> Deferred[int]:
        """Register with the request and begin; the Deferred fires with the byte count."""
        self._request.registerProducer(self, True)
        self._last_progress = self._reactor.seconds()
        self._watchdog = self._reactor.callLater(self._stall_timeout, self._check_stall)
        # Belt and braces with stopProducing: some transports may not stop
        # their producer on connection loss, but every request hears of it.
        self._request.notifyFinish().addErrback(self._request_lost)
        if self._sendfile_to is not None:
            self._wait_for_transport()
        else:
            self._step()
        return self._done

    # IPushProducer, called by the channel on behalf of the transport.

    def pauseProducing(self) -> None:
        self._paused = True
        if self._next_step is not None:
            self._next_step.cancel()
            self._next_step = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._step()

    def stopProducing(self) -> None:
        self._connection_lost()

    # Sending.

    def _step(self) -> None:
        if self._halted or self._paused or self._stepping:
            return
        self._stepping = True
        try:
            if self._sendfile_to is not None:
                self._send_some()
            elif self._tls_to is not None:
                self._send_tls()
            else:
                self._write_chunk()
        finally:
            self._stepping = False

    def _wait_for_transport(self) -> None:
        """Be resumed once the transport's buffer is empty and the socket is writable."""
        transport = self._sendfile_to
        assert transport is not None
        transport.producerPaused = True
        transport.startWriting()

    def _send_some(self) -> None:
        budget = SENDFILE_TURN
        sent_before = self._sent
        try:
            while self._remaining and budget:
                count = min(self._remaining, budget, SENDFILE_CALL)
                try:
                    n = os.sendfile(self._socket_fd, self._file_fd, self._position, count)
                except InterruptedError:
                    continue
                except BlockingIOError:
                    break
                if n == 0:
                    raise EOFError(
                        "file ended at {}, {} bytes short".format(self._position, self._remaining)
                    )
                self._position += n
                self._remaining -= n
                self._sent += n
                budget -= n
        except OSError as e:
            self._count_sendfile_progress(sent_before)
            if e.errno in _PEER_GONE:
                # The reactor will report the loss; stopProducing ends us then.
                self._halt()
                self._transport.abortConnection()
            elif e.errno in _NO_SENDFILE and self._sent == 0:
                log.info(
                    "sendfile refused ({errno}); sending through Python instead",
                    errno=errno.errorcode.get(e.errno or 0, e.errno),
                )
                self._sendfile_to = None
                self._write_chunk()
            else:
                self._fail(Failure())
            return
        except EOFError:
            self._count_sendfile_progress(sent_before)
            self._fail(Failure())
            return
        self._count_sendfile_progress(sent_before)
        if self._remaining:
            self._wait_for_transport()
        else:
            self._complete()

    def _send_tls(self) -> None:
        """Read, encrypt and send chunks until the socket is full or the turn's budget is spent."""
        tls = self._tls_to
        assert tls is not None
        tls.flush()
        budget = TLS_TURN
        sent_before = self._sent
        scratch = _tls_scratch()
        while self._remaining and budget > 0:
            if tls.closing:
                # TLS ended under the socket (say, a record from the peer that did not
                # decrypt): the body cannot follow, and waiting for the socket would
                # never end. The abort reaches us through stopProducing.
                self._count_sendfile_progress(sent_before)
                self._halt()
                self._transport.abortConnection()
                return
            if not tls.queue_is_empty():
                break
            size = min(self._remaining, TLS_CHUNK)
            try:
                n = os.preadv(self._file_fd, [scratch[:size]], self._position)
                if n == 0:
                    raise EOFError(
                        "file ended at {}, {} bytes short".format(self._position, self._remaining)
                    )
            except InterruptedError:
                continue
            except (OSError, EOFError):
                self._count_sendfile_progress(sent_before)
                self._fail(Failure())
                return
            if not tls.send_now(scratch[:n]):
                continue  # closing after all: handled at the top of the loop
            self._position += n
            self._remaining -= n
            self._sent += n
            budget -= n
            if self._halted or self._paused:
                break
        self._count_sendfile_progress(sent_before)
        if self._halted or self._paused:
            return  # the transport resumes or stops us
        if self._remaining:
            self._wait_for_socket()
        else:
            self._complete()

    def _wait_for_socket(self) -> None:
        """
        Be resumed once everything queued in the TCP transport under the TLS
        layer has left: pause its producer (the channel, behind Twisted's TLS
        membrane, which pauses us) as a full buffer would, and ask for
        writability; FileDescriptor.doWrite resumes the chain once the queue
        is empty.
        """
        assert self._tls_to is not None
        transport = self._tls_to.tcp_transport
        transport.producerPaused = True
        transport.producer.pauseProducing()
        transport.startWriting()

    def _count_sendfile_progress(self, sent_before: int) -> None:
        if self._sent != sent_before:
            # request.write keeps sentLength for the access log; we bypass it.
            self._request.sentLength += self._sent - sent_before
            self._last_progress = self._reactor.seconds()

    def _write_chunk(self) -> None:
        """Write one chunk, then continue next turn unless the consumer paused us."""
        if self._next_step is not None and self._next_step.active():
            self._next_step.cancel()  # resumed early: keep a single chain of steps
        self._next_step = None
        if self._halted or self._paused:
            return
        size = min(CHUNK_SIZE, self._remaining)
        try:
            data = _read_at(self._file, self._position, size)
            if not data:
                raise EOFError(
                    "file ended at {}, {} bytes short".format(self._position, self._remaining)
                )
        except (OSError, EOFError):
            self._fail(Failure())
            return
        n = len(data)
        self._position += n
        self._remaining -= n
        self._sent += n
        self._last_progress = self._reactor.seconds()
        # May pause us (buffer full) or, on some transports, even lose the
        # connection before it returns.
        self._request.write(data)
        if self._halted:
            return
        if not self._remaining:
            self._complete()
        elif not self._paused:
            # One chunk per turn: a consumer that never pauses us (HTTP/2,
            # test transports) must not make us read the whole file at once.
            self._next_step = self._reactor.callLater(0, self._write_chunk)

    # Ending.

    def _halt(self) -> None:
        """Stop all I/O and timers; idempotent."""
        self._halted = True
        for call in (self._next_step, self._watchdog):
            if call is not None and call.active():
                call.cancel()
        self._next_step = None
        self._watchdog = None

    def _unregister(self) -> None:
        request = self._request
        if request.producer is self:
            if request.channel is not None:
                request.unregisterProducer()
            else:
                # The channel is gone (connectionLost); nothing to unregister from.
                request.producer = None

    def _complete(self) -> None:
        self._halt()
        self._unregister()
        self._finished = True
        self._done.callback(self._sent)

    def _fail(self, reason: Failure) -> None:
        """Our side broke (short file, read error): the promised body cannot follow."""
        self._halt()
        self._unregister()
        self._transport.abortConnection()
        self._finished = True
        self._done.errback(reason)

    def _connection_lost(self) -> None:
        if self._finished or self._report is not None:
            return
        self._halt()
        self._unregister()
        # Report a turn later: by then the request has seen the loss, and
        # Klein has cancelled its handler (CancelledError, logged by nobody)
        # instead of treating TransferAborted as an error to render.
        self._report = self._reactor.callLater(0, self._report_lost)

    def _request_lost(self, reason: Failure) -> None:
        self._connection_lost()

    def _report_lost(self) -> None:
        self._report = None
        self._finished = True
        self._done.errback(Failure(TransferAborted(self._sent, self._length)))

    def _cancel(self, _: Deferred[int]) -> None:
        """The awaiting handler was cancelled (Klein does so when the client goes away)."""
        if self._report is not None:
            self._report.cancel()
            self._report = None
        self._finished = True
        self._halt()
        self._unregister()
        if self._remaining and self._request.channel is not None:
            # Content-Length promised bytes that will never come: a truncated
            # close is honest, a live keep-alive connection would be corrupt.
            self._transport.abortConnection()

    def _check_stall(self) -> None:
        self._watchdog = None
        idle = self._reactor.seconds() - self._last_progress
        if idle < self._stall_timeout:
            self._watchdog = self._reactor.callLater(self._stall_timeout - idle, self._check_stall)
            return
        log.warn(
            "Aborting a stalled response to {peer}: no progress for {idle:.1f}s,"
            " {sent} of {length} bytes sent",
            peer=str(self._transport.getPeer()),
            idle=idle,
            sent=self._sent,
            length=self._length,
        )
        self._halt()
        # The transport reports the loss (stopProducing, then the request's
        # notifyFinish); the transfer ends then, like any disconnect.
        self._transport.abortConnection()
