"""Mirror fills are written and hashed off the reactor (a SerialWriter, registryd.mirror.fill),
through the HTTP API of a registryd on a loopback port that pulls through the fake upstream:
a /v2/ that answers while the fill's disk stalls (the upstream paused meanwhile), and a full
disk mid-fill that cuts the clients short, stores nothing and is fetched again next time;
and, with a pool the test steps, that a fill announces only bytes already written.

A stalled or full disk is a fault a real one will not produce on demand: the
fill's write (registryd.mirror.fill.write_chunk) sleeps once, or raises ENOSPC.
The probe that times /v2/ runs in a thread of its own with a plain socket,
so it measures the reactor from outside it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed

from fake_upstream import FakeUpstream, fake_upstream  # noqa: F401
from registryd.config import UpstreamConfig
from registryd.digest import Digest
from registryd.mirror import fill as fill_module
from registryd.mirror.fill import BlobFill
from registryd.serial_writer import QUEUE_LIMIT
from support.pki import issue, make_ca
from support.wait import sleep
from test_body_writer import StepPool
from test_mirror import download, leftovers, stored_blobs
from test_mirror_units import FakeResponse, _commit
from test_upload_writer import probe
from test_upstream_hosts import tls_options

NS = "upstream.test"
MiB = 1024 * 1024
STALL = 1.5          # seconds the disk stalls once
RESPONSIVE = 0.5     # /v2/ must answer within this during the stall


class SlowDisk:
    """Wraps the fill's write: records which threads write, stalls once past ``after`` bytes."""

    def __init__(self, monkeypatch: Any, after: int) -> None:
        self.threads: set[int] = set()
        self.stalling = threading.Event()
        self.stalled = threading.Event()     # the stall is over
        self._after = after
        self._seen = 0
        original = fill_module.write_chunk

        def write(fd: int, hasher: Any, chunk: bytes) -> None:
            self.threads.add(threading.get_ident())
            self._seen += len(chunk)
            if self._seen > self._after and not self.stalling.is_set():
                self.stalling.set()
                time.sleep(STALL)
                self.stalled.set()
            original(fd, hasher, chunk)

        monkeypatch.setattr(fill_module, "write_chunk", write)


@pytest_twisted.ensureDeferred
async def test_v2_answers_at_once_while_a_fills_disk_stalls(fake_upstream, make_registry, monkeypatch) -> None:
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[12 * MiB])
    layer = image["layers"][0]
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    disk = SlowDisk(monkeypatch, after=MiB)
    probing = threads.deferToThread(probe(registry.host, "/v2/", disk.stalling))
    path = f"/v2/{NS}/lib/app/blobs/{layer['digest']}"
    downloads = [defer.ensureDeferred(download(registry.host, path)) for _ in range(2)]

    # While the disk stalls, what waits for it stays bounded: the upstream body is paused.
    unwritten = 0
    while not disk.stalled.is_set():
        for fill in registry.service.api.mirror.fills.values():
            unwritten = max(unwritten, fill.unwritten)
        await sleep(0.01)
    elapsed, status, _ = await probing
    assert status == 200
    assert elapsed < RESPONSIVE, f"/v2/ took {elapsed:.2f} s while a fill's write stalled"
    assert MiB <= unwritten <= QUEUE_LIMIT + MiB, unwritten

    for d in await defer.gatherResults(downloads):
        assert (d.status, d.length, d.body, d.digest) == (200, 12 * MiB, 12 * MiB, layer["digest"])
    assert stored_blobs(registry.data_dir) == [layer["digest"].split(":")[1]]
    assert fake_upstream.count("GET", fake_upstream.blob_path("lib/app", layer["digest"])) == 1
    assert disk.threads and threading.get_ident() not in disk.threads   # never on the reactor's thread


@pytest_twisted.ensureDeferred
async def test_a_full_disk_mid_fill_cuts_the_clients_short_and_stores_nothing(
        fake_upstream, make_registry, monkeypatch) -> None:
    size = 6 * MiB
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[size])
    layer = image["layers"][0]
    upstream_path = fake_upstream.blob_path("lib/app", layer["digest"])
    fake_upstream.slow(upstream_path, 256 * 1024, tick=0.01)   # so that clients are sent some of it first
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    original, written, failing = fill_module.write_chunk, 0, threading.get_ident()

    def full_after_two_mib(fd: int, hasher: Any, chunk: bytes) -> None:
        nonlocal written, failing
        if written + len(chunk) > 2 * MiB:
            failing = threading.get_ident()
            raise OSError(errno.ENOSPC, "No space left on device")
        original(fd, hasher, chunk)
        written += len(chunk)

    monkeypatch.setattr(fill_module, "write_chunk", full_after_two_mib)
    path = f"/v2/{NS}/lib/app/blobs/{layer['digest']}"
    broken = await defer.gatherResults([defer.ensureDeferred(download(registry.host, path)) for _ in range(3)])
    for d in broken:
        # Never a body that looks complete: an error document, or a body cut short of its length.
        assert d.status == 503 or (d.status == 200 and d.length == size and d.body < size), vars(d)
    assert any(d.status == 200 and d.body > 0 for d in broken), "no client was streamed to before the failure"
    assert failing != threading.get_ident()        # it failed in a thread, not on the reactor
    await sleep(0.1)
    assert stored_blobs(registry.data_dir) == [] and leftovers(registry.data_dir) == []
    assert not registry.service.api.mirror.fills

    monkeypatch.setattr(fill_module, "write_chunk", original)
    fake_upstream.recover()
    fixed = await download(registry.host, path)
    assert (fixed.status, fixed.body, fixed.digest) == (200, size, layer["digest"])
    assert stored_blobs(registry.data_dir) == [layer["digest"].split(":")[1]]
    assert fake_upstream.count("GET", upstream_path) == 2
    assert leftovers(registry.data_dir) == []


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_a_fill_reads_the_upstream_socket_in_large_pieces_and_gives_the_connection_back_as_it_was(
        make_registry, monkeypatch, tmp_path, scheme: str) -> None:
    ca = make_ca()
    ca_file, _ = ca.write(str(tmp_path), "ca")
    tls = tls_options(issue(ca, "upstream", hosts=["127.0.0.1"]), ca) if scheme == "https" else None
    upstream = FakeUpstream(reactor).start(tls=tls)
    try:
        layer = upstream.add_image("lib/app", "v1", layer_sizes=[16 * MiB])["layers"][0]
        registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=upstream.url, ca_file=ca_file),))
        chunks: list[int] = []
        read_sizes: set[int] = set()
        sockets: list[Any] = []
        data, make_connection = fill_module.BlobFill.data, fill_module._FillProtocol.makeConnection

        def record_chunk(fill: BlobFill, chunk: bytes) -> None:
            chunks.append(len(chunk))
            read_sizes.add(sockets[0].bufferSize)
            data(fill, chunk)

        def record_socket(protocol: Any, transport: Any) -> None:
            make_connection(protocol, transport)
            sockets.append(fill_module._socket_under(transport))

        monkeypatch.setattr(fill_module.BlobFill, "data", record_chunk)
        monkeypatch.setattr(fill_module._FillProtocol, "makeConnection", record_socket)
        got = await download(registry.host, f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
        assert (got.status, got.body, got.digest) == (200, 16 * MiB, layer["digest"])
        [connection] = sockets
        assert connection is not None, "the upstream body's TCP connection was not found"
        # The socket read 1 MiB at a time during the body (plain HTTP: more than Twisted's
        # 64 KiB came at once; TLS hands on 32 KiB of plaintext at most), and the pooled
        # connection reads as before.
        assert read_sizes == {fill_module.UPSTREAM_READ} and sum(chunks) == 16 * MiB
        if scheme == "http":
            assert max(chunks) > 64 * 1024, chunks
        assert connection.bufferSize == 64 * 1024
    finally:
        await upstream.close()


def stepped_fill(tmp_path: Any, data: bytes) -> tuple[BlobFill, FakeResponse, StepPool]:
    """A fill whose writes run when the test steps its pool: a batch held under way."""
    pool = StepPool()
    fill = BlobFill(Digest("sha256", hashlib.sha256(data).hexdigest()), str(tmp_path), Clock(), 30, _commit,
                    pool=pool)
    response = FakeResponse(len(data))
    fill.begin(response)
    return fill, response, pool


def test_a_fill_announces_only_bytes_on_disk_and_verifies_once_all_are(tmp_path) -> None:
    data = os.urandom(1000)
    fill, response, pool = stepped_fill(tmp_path, data)
    first = fill.progress(0)
    response.protocol.dataReceived(data[:400])
    assert (fill.written, fill.releasable, first.called, os.path.getsize(fill.path)) == (0, 0, False, 0)
    pool.step()
    assert (fill.written, fill.releasable, first.called) == (400, 400, True)
    response.protocol.dataReceived(data[400:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert (fill.verified, fill.releasable) == (False, 400)     # the rest is not on disk yet
    pool.step()
    assert fill.verified and fill.done and fill.written == 1000


def test_a_fill_that_fails_mid_batch_removes_its_file_once_the_batch_is_done(tmp_path) -> None:
    data = os.urandom(1000)
    fill, response, pool = stepped_fill(tmp_path, data)
    waiter = fill.progress(999)
    response.protocol.dataReceived(data[:400])
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("reset"))])))
    assert fill.error is not None and waiter.called
    assert os.path.exists(fill.path)      # a thread still writes into it: not closed under it
    pool.step()
    assert not os.path.exists(fill.path) and fill.written == 0


def test_a_failed_write_fails_the_fill_and_stops_the_upstream(tmp_path, monkeypatch) -> None:
    data = os.urandom(1000)
    fill, response, pool = stepped_fill(tmp_path, data)
    stopped = []
    response.stopProducing = lambda: stopped.append(True)   # type: ignore[method-assign]

    def full(fd: int, hasher: Any, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fill_module, "write_chunk", full)
    waiter = fill.progress(0)
    response.protocol.dataReceived(data[:400])
    pool.step()
    assert fill.error is not None and "No space left" in str(fill.error) and waiter.called
    assert stopped and fill.written == 0 and not os.path.exists(fill.path)
