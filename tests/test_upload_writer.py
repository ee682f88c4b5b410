"""Upload bodies are written and hashed off the reactor (registryd.serial_writer), through the
HTTP API of a registryd on a loopback port: pushes verified by digest, a /v2/ that answers while
the disk stalls, a client gone mid-body.

A stalled disk is a fault a real one will not produce on demand: the session
file's write (registryd.storage.fs.appendable.FileSpool.write) sleeps once.
The probe that times /v2/ runs in a thread of its own with a plain socket,
so it measures the reactor from outside it.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import threading
import time
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from oci_client import Client, digest_of, with_query
from registryd.storage.fs import appendable

MiB = 1024 * 1024
STALL = 1.5          # seconds the disk stalls once
RESPONSIVE = 0.5     # /v2/ must answer within this during the stall


class Disk:
    """Wraps FileSpool.write: records which threads write, stalls the first write after ``arm``."""

    def __init__(self, monkeypatch: Any) -> None:
        self.threads: set[int] = set()
        self.stalling = threading.Event()
        self._armed = False
        self._lock = threading.Lock()
        original = appendable.FileSpool.write
        disk = self

        def write(spool: Any, data: bytes) -> None:
            disk.threads.add(threading.get_ident())
            with disk._lock:
                stall, disk._armed = disk._armed, False
            if stall:
                disk.stalling.set()
                time.sleep(STALL)
            original(spool, data)

        monkeypatch.setattr(appendable.FileSpool, "write", write)

    def arm(self) -> None:
        self._armed = True
        self.stalling.clear()


def probe(host: str, path: str, event: threading.Event) -> Callable[[], tuple[float, int, str | None]]:
    """In a thread: once the disk stalls, GET ``path``; its time, status and Range."""
    def run() -> tuple[float, int, str | None]:
        assert event.wait(30), "the disk never stalled"
        started = time.monotonic()
        name, port = host.rsplit(":", 1)
        connection = http.client.HTTPConnection(name, int(port), timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            return time.monotonic() - started, response.status, response.getheader("Range")
        finally:
            connection.close()
    return run


async def fetch_blob_digest(client: Client, repo: str, digest: str) -> str:
    reply = await client.get(f"/v2/{repo}/blobs/{digest}")
    assert reply.status == 200, str(reply)
    return digest_of(reply.body)


@pytest_twisted.ensureDeferred
async def test_a_chunked_and_a_monolithic_push_are_written_off_the_reactor(registry: Any, monkeypatch: Any) -> None:
    disk = Disk(monkeypatch)
    client = Client(registry.url)
    data = os.urandom(5 * MiB + 12345)
    digest = digest_of(data)
    location = await client.start_upload("team/chunked")
    for start in range(0, len(data), 2 * MiB):
        chunk = data[start:start + 2 * MiB]
        reply = await client.patch(location, chunk, headers={
            "Content-Type": "application/octet-stream", "Content-Range": f"{start}-{start + len(chunk) - 1}"})
        assert reply.status == 202, str(reply)
        assert reply.header("Range") == f"0-{start + len(chunk) - 1}"
        location = reply.location
    reply = await client.put(with_query(location, digest=digest))
    assert reply.status == 201, str(reply)
    assert await fetch_blob_digest(client, "team/chunked", digest) == digest

    other = os.urandom(3 * MiB + 7)
    reply = await client.post(with_query("/v2/team/mono/blobs/uploads/", digest=digest_of(other)), other,
                              headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 201, str(reply)
    assert await fetch_blob_digest(client, "team/mono", digest_of(other)) == digest_of(other)
    assert disk.threads and threading.get_ident() not in disk.threads   # never on the reactor's thread


@pytest_twisted.ensureDeferred
async def test_v2_answers_at_once_while_the_disk_stalls_under_a_big_body(registry: Any, monkeypatch: Any) -> None:
    disk = Disk(monkeypatch)
    client = Client(registry.url)
    data = os.urandom(8 * MiB)
    location = await client.start_upload("team/slow")
    disk.arm()
    probing = threads.deferToThread(probe(registry.host, "/v2/", disk.stalling))
    reply = await client.patch(location, data, headers={"Content-Type": "application/octet-stream"})
    elapsed, status, _ = await probing
    assert status == 200
    assert elapsed < RESPONSIVE, f"/v2/ took {elapsed:.2f} s while an upload's write stalled"
    assert reply.status == 202 and reply.header("Range") == f"0-{len(data) - 1}", str(reply)
    reply = await client.put(with_query(reply.location, digest=digest_of(data)))
    assert reply.status == 201, str(reply)
    assert await fetch_blob_digest(client, "team/slow", digest_of(data)) == digest_of(data)


@pytest_twisted.ensureDeferred
async def test_a_client_gone_mid_body_leaves_the_session_as_acknowledged(registry: Any, monkeypatch: Any) -> None:
    disk = Disk(monkeypatch)
    client = Client(registry.url)
    data = os.urandom(6 * MiB)
    acknowledged = 1 * MiB
    location = await client.start_upload("team/gone")
    reply = await client.patch(location, data[:acknowledged], headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 202, str(reply)
    location = reply.location
    upload_id = location.rstrip("/").rsplit("/", 1)[-1]
    session_file = os.path.join(registry.data_dir, "uploads", upload_id, "data")

    disk.arm()
    status_path = client.path_of(location)
    probing = threads.deferToThread(probe(registry.host, status_path, disk.stalling))
    # 4 of the 5 MiB it announces, then the client is gone, while a batch of it is being written.
    await client.send_truncated("PATCH", location, data[acknowledged:acknowledged + 4 * MiB], 5 * MiB,
                                headers={"Content-Type": "application/octet-stream"})
    elapsed, status, range_ = await probing
    assert (status, range_) == (204, f"0-{acknowledged - 1}")
    assert elapsed < RESPONSIVE, f"the session's status took {elapsed:.2f} s while its write stalled"

    # Once the stalled batch is written, the body is dropped: the file is the acknowledged bytes.
    deadline = time.monotonic() + STALL + 10
    while True:
        reply = await client.patch(location, data[acknowledged:], headers={
            "Content-Type": "application/octet-stream", "Content-Range": f"{acknowledged}-{len(data) - 1}"})
        if reply.status != 416 or time.monotonic() > deadline:
            break
        assert reply.header("Range") == f"0-{acknowledged - 1}"   # busy until then, never moved on
        await deferLater(reactor, 0.05, lambda: None)
    assert reply.status == 202, str(reply)
    assert os.path.getsize(session_file) == len(data)
    with open(session_file, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(data).hexdigest()
    reply = await client.put(with_query(reply.location, digest=digest_of(data)))
    assert reply.status == 201, str(reply)
    assert await fetch_blob_digest(client, "team/gone", digest_of(data)) == digest_of(data)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_mid_body_is_a_507_and_the_session_stays_as_acknowledged(
        registry: Any, monkeypatch: Any) -> None:
    client = Client(registry.url)
    data = os.urandom(2 * MiB)
    location = await client.start_upload("team/full")
    reply = await client.patch(location, data[:MiB], headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 202, str(reply)
    location = reply.location
    upload_id = location.rstrip("/").rsplit("/", 1)[-1]
    session_file = os.path.join(registry.data_dir, "uploads", upload_id, "data")
    original, failing = appendable.FileSpool.write, threading.get_ident()

    def full(spool: Any, data: bytes) -> None:
        nonlocal failing
        failing = threading.get_ident()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(appendable.FileSpool, "write", full)
    # A big body meets the full disk while it still arrives, a small one once it has: both 507.
    for body in (os.urandom(8 * MiB), b"tail"):
        reply = await client.patch(location, body, headers={"Content-Type": "application/octet-stream"})
        assert reply.status == 507, str(reply)
        assert reply.codes == ["UNKNOWN"] and "storage is full" in reply.json()["errors"][0]["message"]
        assert failing != threading.get_ident()        # it failed in a thread, not on the reactor
        status = await client.get(location)
        assert (status.status, status.header("Range")) == (204, f"0-{MiB - 1}")
        assert os.path.getsize(session_file) == MiB
    monkeypatch.setattr(appendable.FileSpool, "write", original)
    reply = await client.patch(location, data[MiB:], headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 202, str(reply)
    reply = await client.put(with_query(reply.location, digest=digest_of(data)))
    assert reply.status == 201, str(reply)
