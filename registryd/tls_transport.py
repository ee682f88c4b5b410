"""A TLS transport with few Python steps and few copies per byte.

Twisted's ``TLSMemoryBIOProtocol`` encrypts a write 16 KiB at a time (pyOpenSSL
turns on OpenSSL's partial writes, so each ``send`` stops after one record),
reads the memory BIO 32 KiB at a time into a fresh buffer copied into fresh
bytes, and appends every piece to the TCP transport's buffer, which the
reactor sends 128 KiB per turn: for a 256 MiB blob, tens of thousands of
Python-level steps and several copies of every byte. ``LeanTLSTransport``
keeps Twisted's protocol (handshake, shutdown, producers, the aggregation of
small writes) and changes only how bytes leave:

* partial writes are off for its connections, so one ``SSL_write`` encrypts a
  whole application write (OpenSSL still cuts it into records);
* one ``BIO_read`` drains what that produced into a buffer the process
  reuses, and it goes to the socket at once when nothing is queued ahead of it
  in the TCP transport; only what the kernel does not take is copied into that
  queue. It stays the only queue, so bytes keep their order and the
  transport's producer pausing (backpressure) works exactly as before.

``send_now`` lets a caller that owns a reusable buffer (a file body) skip the
aggregator and hand plaintext over without a copy.

The two shortcuts (clearing the mode, reading the BIO into our own buffer) use
pyOpenSSL's cffi handles, which it does not promise; without them the same
path runs through its public ``send``/``bio_read`` (``LOW_LEVEL`` says which).
"""
from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError
from twisted.internet import tcp
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure

try:
    from OpenSSL._util import ffi as _ffi, lib as _lib

    LOW_LEVEL = all(hasattr(_lib, name) for name in ("SSL_clear_mode", "SSL_MODE_ENABLE_PARTIAL_WRITE", "BIO_read"))
except ImportError:  # pragma: no cover - another pyOpenSSL layout
    LOW_LEVEL = False

#: Room for the record headers and tags OpenSSL adds to a write: about 22
#: bytes per 16 KiB record (TLS 1.3), 29 with TLS 1.2's explicit nonce.
_RECORD_OVERHEAD = 64
_RECORD_SIZE = 16 * 1024
#: What one BIO read may take at least (handshake flights, alerts, small writes)
#: and at most: a huge write is drained in pieces, so the reused buffer stays small.
_MIN_DRAIN = 32 * 1024
MAX_DRAIN = 1024 * 1024


def _ciphertext_bound(plaintext: int) -> int:
    """A read size that drains what encrypting ``plaintext`` bytes produced in one go."""
    return max(_MIN_DRAIN, plaintext + (plaintext // _RECORD_SIZE + 2) * _RECORD_OVERHEAD)


class _Drain:
    """The process's one ciphertext buffer: filled and emptied within one call on the reactor thread."""

    buffer: Any = None
    size = 0

    @classmethod
    def get(cls, size: int) -> Any:
        if size > cls.size:
            cls.buffer = _ffi.new("char[]", size)
            cls.size = size
        return cls.buffer


class LeanTLSTransport(BufferingTLSTransport):
    """Twisted's TLS protocol with a short path from application bytes to the socket."""

    _drain_hint = _MIN_DRAIN

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        # Before any application byte (the handshake has only begun).
        if self._tlsConnection is not None:
            _clear_partial_writes(self._tlsConnection)

    def _write(self, data: Any) -> None:
        """Encrypt all of ``data`` (records of 16 KiB, one call when it can) and send what that produced."""
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        total = len(view)
        done = 0
        while done < total:
            try:
                done += self._tlsConnection.send(view[done:] if done else view)
            except WantReadError:
                # Only mid-handshake (renegotiation is off): keep the rest for
                # dataReceived, as Twisted does. A copy: the caller may reuse data.
                self._bufferedWrite(bytes(view[done:]))
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                break
        self._drain_hint = _ciphertext_bound(done)
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """Move everything in the send BIO to the socket (or the transport's queue)."""
        size = min(self._drain_hint, MAX_DRAIN)
        self._drain_hint = _MIN_DRAIN
        if not LOW_LEVEL:
            while True:
                try:
                    data = self._tlsConnection.bio_read(size)
                except WantReadError:
                    return
                self._send_out(data)
                if len(data) < size:
                    return
        bio = self._tlsConnection._from_ssl
        buffer = _Drain.get(size)
        while True:
            n = _lib.BIO_read(bio, buffer, size)
            if n <= 0:
                return      # empty (a memory BIO has no other failure)
            self._send_out(_ffi.buffer(buffer, n))
            if n < size:
                return

    def _send_out(self, data: Any) -> None:
        """Write ``data`` (bytes or a view of the reused buffer) to the socket, queue the rest."""
        transport: Any = self.transport
        sent = 0
        if _queue_is_empty(transport):
            try:
                sent = transport.socket.send(data)
            except OSError:
                # EAGAIN, EINTR, or the peer is gone: the transport meets the
                # error again when it writes, and reports a loss its usual way.
                sent = 0
        if sent < len(data):
            # Slicing bytes or a cffi buffer gives bytes, as the transport needs.
            transport.write(data if sent == 0 and isinstance(data, bytes) else data[sent:])

    def send_now(self, data: Any) -> bool:
        """
        Encrypt ``data`` (any buffer; the caller may reuse it on return) and
        send it after everything written before. Returns False, having sent
        nothing, when the connection is ``closing``.
        """
        if self.closing:
            return False
        self._aggregator.flush()
        if self._appSendBuffer:
            self._bufferedWrite(bytes(data))
        else:
            self._write(data)
        return True

    @property
    def closing(self) -> bool:
        """TLS is over or the socket under it is closing: nothing more can be sent."""
        tcp_transport: Any = self.transport
        return bool(self._lostTLSConnection or (self.disconnecting and self._producer is None)
                    or not tcp_transport.connected or getattr(tcp_transport, "disconnecting", False))

    def flush(self) -> None:
        """Encrypt and send the small writes the aggregator holds for the next turn (headers)."""
        self._aggregator.flush()

    @property
    def tcp_transport(self) -> Any:
        """The transport under the TLS layer (a tcp.Connection when serving a socket)."""
        return self.transport

    def queue_is_empty(self) -> bool:
        """Nothing waits in the TCP transport: the next ``send_now`` goes to the kernel directly."""
        return _queue_is_empty(self.transport)


def _clear_partial_writes(connection: Any) -> bool:
    """Let one SSL_write cover a whole buffer instead of stopping after each record."""
    if not LOW_LEVEL:
        return False
    _lib.SSL_clear_mode(connection._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    return True


def _queue_is_empty(transport: Any) -> bool:
    """A connected TCP (or UNIX) transport with nothing queued: we may write to its socket."""
    return bool(
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )
