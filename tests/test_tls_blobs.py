"""Blob bodies over registryd's TLS listeners: the lean write path (registryd.tls_transport).

An in-process registryd with a ``tls:`` listener on a real loopback port, and
blocking clients (Python's ``ssl``) in threads so the reactor keeps serving.
Every test checks the bytes a client gets and that the body went through
``LeanTLSTransport.send_now`` (big chunks, one ``SSL_write`` each), with what
the old path also had to keep: Range, HEAD, keep-alive and pipelining,
backpressure on a slow reader, client aborts, certificate reload and drain.
"""
from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
from typing import Any, BinaryIO, Iterator

import attrs
import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from registryd.auth.tls import ServerTLSContext, TLSServerEndpoint, TLSSettings
from registryd import tls_transport
from registryd.tls_transport import LOW_LEVEL, LeanTLSTransport
from registryd.web import sendfile
from support.pki import issue, make_ca
from support.wait import sleep, wait_until
from syncclient import push_blob

MiB = 1024 * 1024
SIZE = 24 * MiB


@attrs.define
class TLSRegistry:
    service: Any
    tls_port: int
    plain_host: str
    ca: str
    cert: str
    key: str
    data_dir: str
    issuer: Any


@pytest.fixture
def tls_registry(make_registry: Any, tmp_path: Any) -> TLSRegistry:
    ca = make_ca("tls blobs CA")
    ca_file = str(tmp_path / "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.cert_pem())
    cert, key = issue(ca, "first", hosts=["localhost", "127.0.0.1"]).write(str(tmp_path), "server")
    running = make_registry(listen=(f"tls:0:interface=127.0.0.1:cert={cert}:key={key}",
                                    "tcp:0:interface=127.0.0.1"))
    service = running.service
    tls_port = service.ports[0].getHost().port
    plain_host = f"127.0.0.1:{service.ports[1].getHost().port}"
    return TLSRegistry(service, tls_port, plain_host, ca_file, cert, key, running.data_dir, ca)


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(SIZE)


async def seed(registry: TLSRegistry, data: bytes, repo: str = "tls/blob") -> str:
    return await deferToThread(push_blob, registry.plain_host, repo, data)


@attrs.define
class Lean:
    """What went through LeanTLSTransport.send_now, and how many SSL_write calls were made."""

    calls: int = 0
    bytes: int = 0
    ssl_writes: int = 0
    transports: list[Any] = attrs.Factory(list)


@pytest.fixture
def lean(monkeypatch: Any) -> Lean:
    seen = Lean()
    send_now = LeanTLSTransport.send_now
    ssl_send = SSL.Connection.send

    def spy_send_now(self: LeanTLSTransport, data: Any) -> bool:
        seen.calls += 1
        seen.bytes += len(data)
        if self not in seen.transports:
            seen.transports.append(self)
        return send_now(self, data)

    def spy_ssl_send(self: SSL.Connection, buf: Any, flags: int = 0) -> int:
        seen.ssl_writes += 1
        return ssl_send(self, buf, flags)

    monkeypatch.setattr(LeanTLSTransport, "send_now", spy_send_now)
    monkeypatch.setattr(SSL.Connection, "send", spy_ssl_send)
    return seen


# --- a blocking HTTP/1.1 client over TLS, run in threads ------------------------------


class Client:
    """One TLS connection; responses parsed by hand so pipelined ones stay apart."""

    def __init__(self, port: int, ca: str, rcvbuf: int | None = None) -> None:
        context = ssl.create_default_context(cafile=ca)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(30)
        raw.connect(("127.0.0.1", port))
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.file: BinaryIO = self.sock.makefile("rb")
        self.local = self.sock.getsockname()

    def send(self, *requests: tuple[str, str, dict[str, str]]) -> None:
        """Write one or more requests in one go (pipelining when several)."""
        out = b""
        for method, path, headers in requests:
            lines = [f"{method} {path} HTTP/1.1", "Host: localhost"] + [f"{k}: {v}" for k, v in headers.items()]
            out += ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.sock.sendall(out)

    def head(self) -> tuple[int, dict[str, str]]:
        status_line = self.file.readline()
        if not status_line:
            raise EOFError("connection closed before a response")
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers

    def body(self, length: int, digest: Any = None) -> str:
        digest = digest or hashlib.sha256()
        while length:
            chunk = self.file.read(min(length, MiB))
            if not chunk:
                raise EOFError(f"{length} bytes short")
            digest.update(chunk)
            length -= len(chunk)
        return "sha256:" + digest.hexdigest()

    def get(self, path: str, headers: dict[str, str] | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], str | None]:
        self.send((method, path, headers or {}))
        status, response_headers = self.head()
        if method == "HEAD":
            return status, response_headers, None
        return status, response_headers, self.body(int(response_headers["content-length"]))

    def start_blob(self, digest: str, first: int, hasher: Any = None) -> None:
        """GET the blob of the test repository and read its first ``first`` bytes (into ``hasher``)."""
        self.send(("GET", f"/v2/tls/blob/blobs/{digest}", {}))
        assert self.head()[0] == 200
        self.body(first, hasher)

    def abort(self) -> None:
        """Reset the connection (RST), as a killed client does."""
        self.file.close()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def open_files_of(digest: str) -> list[str]:
    """The files of this process whose path names the blob."""
    hexdigest = digest.split(":")[1]
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if hexdigest in target:
            found.append(target)
    return found


def queued(transport: LeanTLSTransport) -> int:
    """Ciphertext waiting in the TCP transport under the TLS layer."""
    tcp = transport.tcp_transport
    return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen


# --- the tests -------------------------------------------------------------------------


def test_the_low_level_shortcuts_are_available() -> None:
    """Both shortcuts (whole-buffer SSL_write, reading the BIO into a reused buffer) rely on
    pyOpenSSL's cffi handles: a pyOpenSSL upgrade that drops them must be noticed here."""
    assert LOW_LEVEL


@pytest_twisted.ensureDeferred
async def test_blob_body_goes_through_the_lean_path_in_big_writes(
    tls_registry: TLSRegistry, blob: bytes, lean: Lean
) -> None:
    digest = await seed(tls_registry, blob)
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca)
    status, headers, got = await deferToThread(client.get, f"/v2/tls/blob/blobs/{digest}")
    await deferToThread(client.close)
    assert (status, headers["content-length"], got) == (200, str(SIZE), digest)
    assert lean.bytes == SIZE
    assert lean.calls == -(-SIZE // sendfile.TLS_CHUNK)
    # One SSL_write per chunk (plus the headers and the odd small write), not one per 16 KiB record.
    assert lean.ssl_writes <= lean.calls + 8


@pytest_twisted.ensureDeferred
async def test_range_head_and_keep_alive_on_one_connection(
    tls_registry: TLSRegistry, blob: bytes, lean: Lean
) -> None:
    digest = await seed(tls_registry, blob)
    path = f"/v2/tls/blob/blobs/{digest}"
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca)
    try:
        start, end = 1_000_001, 9 * MiB + 12_345
        status, headers, got = await deferToThread(client.get, path, {"Range": f"bytes={start}-{end}"})
        assert status == 206
        assert headers["content-range"] == f"bytes {start}-{end}/{SIZE}"
        assert got == sha256(blob[start:end + 1])

        status, headers, _ = await deferToThread(client.get, path, None, "HEAD")
        assert (status, headers["content-length"]) == (200, str(SIZE))

        status, headers, got = await deferToThread(client.get, path)
        assert (status, got) == (200, digest)
        status, _, _ = await deferToThread(client.get, "/v2/")
        assert status == 200
        # All on the connection we opened: the server never closed it.
        assert client.sock.getsockname() == client.local
    finally:
        await deferToThread(client.close)
    assert lean.bytes == (end + 1 - start) + SIZE
    assert len(lean.transports) == 1


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_keep_their_order(tls_registry: TLSRegistry, blob: bytes, lean: Lean) -> None:
    digest = await seed(tls_registry, blob)
    path = f"/v2/tls/blob/blobs/{digest}"
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca)

    def pipeline() -> list[tuple[int, str]]:
        client.send(("GET", path, {"Range": "bytes=0-5242879"}), ("GET", "/v2/", {}), ("GET", path, {}),
                    ("GET", path, {"Range": "bytes=7-70006"}))
        answers = []
        for _ in range(4):
            status, headers = client.head()
            answers.append((status, client.body(int(headers["content-length"]))))
        return answers

    try:
        answers = await deferToThread(pipeline)
    finally:
        await deferToThread(client.close)
    assert [status for status, _ in answers] == [206, 200, 200, 206]
    assert answers[0][1] == sha256(blob[:5 * MiB])
    assert answers[2][1] == digest
    assert answers[3][1] == sha256(blob[7:70007])
    assert lean.bytes == 5 * MiB + SIZE + 70000


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_holds_the_server_back_and_gets_every_byte(
    tls_registry: TLSRegistry, blob: bytes, lean: Lean
) -> None:
    """Backpressure: while the client reads nothing, the server reads no further into the
    file and holds at most about one chunk of ciphertext in user space."""
    digest = await seed(tls_registry, blob)
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca, 64 * 1024)
    hasher = hashlib.sha256()

    await deferToThread(client.start_blob, digest, MiB, hasher)
    await wait_until(lambda: bool(lean.transports), 5, "the body started")
    [transport] = lean.transports
    before = -1
    while before != lean.bytes:        # let the server fill the socket buffers, then stall
        before = lean.bytes
        await sleep(0.2)
    assert lean.bytes < SIZE // 2
    assert queued(transport) <= sendfile.TLS_CHUNK + 64 * 1024
    await sleep(0.3)
    assert lean.bytes == before        # nothing more read or encrypted while the client waits

    got = await deferToThread(client.body, SIZE - MiB, hasher)
    await deferToThread(client.close)
    assert got == digest
    assert lean.bytes == SIZE


@pytest_twisted.ensureDeferred
async def test_a_client_abort_mid_body_closes_the_file_and_logs_nothing(
    tls_registry: TLSRegistry, blob: bytes, lean: Lean
) -> None:
    """The autouse fixture fails the test on any logged error or traceback."""
    digest = await seed(tls_registry, blob)
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca)

    def start_then_reset() -> None:
        client.start_blob(digest, 2 * MiB)
        client.abort()

    await deferToThread(start_then_reset)
    await wait_until(lambda: not open_files_of(digest), 10, "the blob file closed")
    assert 2 * MiB <= lean.bytes < SIZE
    [transport] = lean.transports
    await wait_until(lambda: not transport.connected, 5, "the connection gone")
    # The listener serves the next client as usual.
    again = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca)
    status, _, got = await deferToThread(again.get, f"/v2/tls/blob/blobs/{digest}")
    await deferToThread(again.close)
    assert (status, got) == (200, digest)


@pytest_twisted.ensureDeferred
async def test_a_broken_record_from_the_client_mid_body_ends_the_connection(
    tls_registry: TLSRegistry, blob: bytes, lean: Lean
) -> None:
    """A record that fails to decrypt ends TLS under a live socket: the transfer stops,
    the connection and the file close, nothing is logged as an error."""
    digest = await seed(tls_registry, blob)
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca, 64 * 1024)

    def corrupt_then_read_on() -> int:
        client.start_blob(digest, MiB)
        # An application-data record (TLS 1.2/1.3 framing) whose tag cannot verify.
        os.write(client.sock.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
        received = MiB
        try:
            while chunk := client.file.read(MiB):
                received += len(chunk)
        except OSError:
            pass
        return received

    received = await deferToThread(corrupt_then_read_on)
    await deferToThread(client.close)
    assert received < SIZE
    [transport] = lean.transports
    await wait_until(lambda: not transport.connected, 10, "the connection closed")
    await wait_until(lambda: not open_files_of(digest), 5, "the blob file closed")
    assert lean.bytes < SIZE


def server_cn(port: int, ca: str) -> str:
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
            return str(subject["commonName"])


@pytest_twisted.ensureDeferred
async def test_reload_mid_download_new_certificate_for_new_connections_only(
    tls_registry: TLSRegistry, blob: bytes, lean: Lean
) -> None:
    digest = await seed(tls_registry, blob)
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca)
    hasher = hashlib.sha256()

    await deferToThread(client.start_blob, digest, 3 * MiB, hasher)
    issue(tls_registry.issuer, "second", hosts=["localhost"]).write(os.path.dirname(tls_registry.cert), "server")
    tls_registry.service.reload()      # what SIGHUP does
    assert await deferToThread(server_cn, tls_registry.tls_port, tls_registry.ca) == "second"
    got = await deferToThread(client.body, SIZE - 3 * MiB, hasher)
    await deferToThread(client.close)
    assert got == digest
    assert lean.bytes == SIZE


@pytest_twisted.ensureDeferred
async def test_stopping_lets_a_tls_download_finish(tls_registry: TLSRegistry, blob: bytes, lean: Lean) -> None:
    """What SIGTERM does: listeners close, the transfer under way runs to its last byte."""
    digest = await seed(tls_registry, blob)
    client = await deferToThread(Client, tls_registry.tls_port, tls_registry.ca, 64 * 1024)
    hasher = hashlib.sha256()

    await deferToThread(client.start_blob, digest, MiB, hasher)
    stopped: list[bool] = []
    stopping = tls_registry.service.stopService().addBoth(lambda _: stopped.append(True))
    await sleep(0.2)
    assert not stopped
    got = await deferToThread(client.body, SIZE - MiB, hasher)
    await stopping
    assert stopped
    await deferToThread(client.close)
    assert got == digest
    assert lean.bytes == SIZE


# --- the transport alone: any large write, not only file bodies ----------------------------


@implementer(IHandshakeListener)
class Blast(Protocol):
    """Writes the factory's payload in one call once the handshake is done, then closes."""

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        self.factory.transports.append(transport)  # type: ignore[attr-defined]
        transport.write(self.factory.payload)  # type: ignore[attr-defined]
        transport.loseConnection()


@pytest.fixture
def blast_server(tmp_path: Any) -> Iterator[Any]:
    ports: list[Any] = []

    async def start(payload: bytes) -> tuple[int, str, list[Any]]:
        ca = make_ca("blast CA")
        ca_file = str(tmp_path / "blast-ca.pem")
        with open(ca_file, "wb") as f:
            f.write(ca.cert_pem())
        cert, key = issue(ca, "blast", hosts=["localhost"]).write(str(tmp_path), "blast")
        factory = Factory.forProtocol(Blast)
        factory.payload = payload  # type: ignore[attr-defined]
        factory.transports = []  # type: ignore[attr-defined]
        endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                                     ServerTLSContext(TLSSettings(cert, key)), clock=reactor)
        port = await endpoint.listen(factory)
        ports.append(port)
        return port.getHost().port, ca_file, factory.transports  # type: ignore[attr-defined]

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def read_all(port: int, ca: str, pause: float = 0.0) -> bytes:
    import time

    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            time.sleep(pause)
            chunks = []
            while chunk := tls.recv(MiB):
                chunks.append(chunk)
            return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_one_large_write_is_encrypted_at_once_and_queued_in_order(
    blast_server: Any, lean: Lean
) -> None:
    """A 6 MiB write to a client that waits before reading: one SSL_write, what the socket
    does not take waits in the transport's queue, and the client gets it all, then the close."""
    payload = os.urandom(6 * MiB + 5)
    port, ca, transports = await blast_server(payload)
    got = await deferToThread(read_all, port, ca, 0.3)
    assert got == payload
    assert isinstance(transports[0], LeanTLSTransport)
    assert lean.ssl_writes == 1
    assert tls_transport._Drain.size <= tls_transport.MAX_DRAIN   # drained in pieces: the buffer stays small
