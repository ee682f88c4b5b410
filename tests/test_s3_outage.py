"""Object-store outages, against the session's real radosgw: frozen (SIGSTOP) or killed (SIGKILL).

A node (in-process, so that any traceback it logs fails the test) runs on a
fresh bucket with short deadlines: ``request_timeout`` 2 s, ``idle_timeout``
3 s, ``ready_timeout`` 2 s. ``ceph_s3.outage(kind)`` takes radosgw down and
always brings it back, answering, before the next test.

What must hold: a response whose body has begun is cut at once (only blob
bytes, then a closed connection); new requests get 503 with Retry-After
within the deadline and one log line each; an upload session survives and
commits afterwards; /readyz proves the bucket usable, quickly; a node whose
bucket does not exist refuses to start with one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from typing import Any, AsyncIterator, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher, LogLevel

from conftest import ROOT, VENV_BIN, RunningRegistry
from raw_http import RawGet, open_get
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Client, descriptor, digest_of, encode, with_query
from registryd.config import StorageSettings
from registryd.service import StartupError
from registryd.storage.s3 import S3Client, S3Error, S3Unavailable
from support.wait import sleep

MiB = 1024 * 1024
REPO = "outage/app"
#: Short deadlines (seconds) for every node here.
DEADLINES = {"request_timeout": 2, "idle_timeout": 3, "ready_timeout": 2, "connect_timeout": 2}
KINDS = ["freeze", "kill"]


def blob_bytes(size: int, seed: str) -> bytes:
    block = hashlib.sha512(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


@pytest_twisted.async_yield_fixture
async def bucket(ceph_s3: Any) -> AsyncIterator[S3Client]:
    client = await ceph_s3.new_bucket(prefix="site/", part_size=5 * MiB)  # creating one can take seconds
    # So can the first write of a fresh cluster (2 s here): not what the short deadlines are for.
    await client.put_object("warm-up", b"")
    await client.delete_object("warm-up")
    yield client
    await client.close()


@pytest.fixture
def node(make_registry: Any, bucket: S3Client) -> RunningRegistry:
    settings = attrs.evolve(bucket.settings, **DEADLINES)
    registry: RunningRegistry = make_registry(storage=StorageSettings("s3", s3=settings))
    return registry


@attrs.define
class Warnings:
    """Log events at warning level and above while it is attached."""

    events: list[dict[str, Any]] = attrs.field(factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            self.events.append(event)

    @property
    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    observer = Warnings()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


async def open_blob_get(host: str, path: str, pause_after: int, give_up: float = 30) -> RawGet:
    """A GET whose every byte is kept, on a keep-alive connection (so only a cut ends it early)."""
    return await open_get(host, path, pause_after=pause_after, timeout=give_up, keep_body=True, close=False)


# -- 1. a body under way is cut, never followed by an error document -------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_a_blob_stream_the_store_breaks_is_cut_at_once(ceph_s3: Any, node: RunningRegistry,
                                                             warnings: Warnings, kind: str) -> None:
    data = blob_bytes(64 * MiB, f"stream-{kind}")
    digest = await Client(node.url).push_blob(REPO, data)
    get = await open_blob_get(node.host, f"/v2/{REPO}/blobs/{digest}", pause_after=2 * MiB)
    await get.paused
    assert get.status == 200 and get.headers["content-length"] == str(len(data)), get.headers
    with ceph_s3.outage(kind):
        resumed = time.monotonic()
        get.resume()
        await get.done
    took = get.ended_at - resumed
    received = bytes(get.body)
    assert len(received) < len(data), "the whole blob came through: the outage came too late"
    assert received == data[:len(received)], "bytes other than the blob's followed its first ones"
    # Freeze: the store's silence mid-body is noticed after request_timeout (2 s); kill: at once.
    assert took < 7, f"the connection stayed open {took:.1f}s after the store broke"
    cut = [line for line in warnings.lines if "response cut after" in line]
    assert len(cut) == 1 and "\n" not in cut[0], warnings.lines


@pytest_twisted.ensureDeferred
async def test_any_error_after_the_body_began_cuts_the_connection(make_registry: Any, monkeypatch: Any,
                                                                  warnings: Warnings) -> None:
    """The same rule on the filesystem driver, for an error raised by a handler after
    writing part of a body: no error document after it, no connection left open."""
    import registryd.web.app as app
    from registryd.errors import RegistryError

    node = make_registry()
    data = blob_bytes(300_000, "fs")
    digest = await Client(node.url).push_blob(REPO, data)

    async def breaks_half_way(request: Any, fileobj: Any, offset: int, length: int, **kw: Any) -> int:
        fileobj.seek(offset)
        request.write(fileobj.read(1000))
        await sleep(0.05)
        raise RegistryError(503, "UNAVAILABLE", "the source went away")

    monkeypatch.setattr(app, "send_file_range", breaks_half_way)
    get = await open_blob_get(node.host, f"/v2/{REPO}/blobs/{digest}", pause_after=len(data) + 1, give_up=10)
    began = time.monotonic()
    await get.done
    assert get.status == 200 and get.headers["content-length"] == str(len(data))
    assert bytes(get.body) == data[:1000]
    assert get.ended_at - began < 2, "the connection stayed open after the failure"
    assert any("response cut after 1000 body bytes" in line for line in warnings.lines), warnings.lines


# -- 2. new requests during an outage: 503, Retry-After, one line, within the deadline -------

@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_requests_during_an_outage_get_503_with_retry_after(ceph_s3: Any, node: RunningRegistry,
                                                                  warnings: Warnings, kind: str) -> None:
    client = Client(node.url)
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = blob_bytes(100_000, f"small-{kind}")
    for blob in (config, layer):
        await client.push_blob(REPO, blob)
    manifest = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                       "layers": [descriptor(OCI_LAYER, layer)]})
    assert (await client.push_manifest(REPO, "v1", manifest, OCI_MANIFEST)).status == 201
    layer_path = f"/v2/{REPO}/blobs/{digest_of(layer)}"
    requests = [("GET", f"/v2/{REPO}/manifests/v1", None), ("HEAD", layer_path, None), ("GET", layer_path, None),
                ("POST", with_query(f"/v2/{REPO}/blobs/uploads/", digest=digest_of(b"x")), b"x")]
    with ceph_s3.outage(kind):
        before = len(warnings.events)
        for method, path, body in requests:
            began = time.monotonic()
            reply = await client.request(method, path, body)
            took = time.monotonic() - began
            assert reply.status == 503, f"{method} {path}\n{reply}"
            assert reply.header("Retry-After") == "5", str(reply)
            if method != "HEAD":
                assert reply.codes == ["UNAVAILABLE"], str(reply)
                assert "unavailable" in reply.json()["errors"][0]["message"]
            assert reply.header("Docker-Content-Digest") is None and reply.header("ETag") is None, str(reply)
            assert took < 5, f"{method} {path} waited {took:.1f}s for a store that is down"
        lines = warnings.lines[before:]
    # One line per request, saying why (no traceback: the autouse fixture fails on those).
    assert len(lines) == len(requests), "\n".join(lines)
    assert all("503, object store unavailable" in line and "\n" not in line for line in lines), lines
    reply = await client.get(f"/v2/{REPO}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.body == manifest, str(reply)


# -- 3. an upload session survives an outage during its PATCH --------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_an_upload_resumes_after_an_outage_during_its_patch(ceph_s3: Any, node: RunningRegistry,
                                                                  monkeypatch: Any, kind: str) -> None:
    """The store goes down in the middle of acknowledging the second chunk: after its part
    went up, just as the new state is written. That PATCH gets 503; once the store is back,
    the session's offset is what the bucket holds, and the client continues from there."""
    client = Client(node.url)
    data = blob_bytes(13 * MiB + 4321, f"upload-{kind}")
    cuts = [0, 3 * MiB, 9 * MiB, len(data)]
    location = client.path_of(await client.start_upload(REPO))
    reply = await client.patch(location, data[:cuts[1]], headers={"Content-Range": f"0-{cuts[1] - 1}"})
    assert reply.status == 202, str(reply)
    location = client.path_of(reply.location)

    store = node.service.store
    put_object = store.client.put_object
    went_down: list[str] = []

    async def down_before_the_state(key: str, body: Any, **kw: Any) -> str:
        if key.endswith("/state") and not went_down:
            went_down.append(key)
            ceph_s3.freeze() if kind == "freeze" else ceph_s3.kill()
        return await put_object(key, body, **kw)

    monkeypatch.setattr(store.client, "put_object", down_before_the_state)
    try:
        began = time.monotonic()
        reply = await client.patch(location, data[cuts[1]:cuts[2]],
                                   headers={"Content-Range": f"{cuts[1]}-{cuts[2] - 1}"})
        took = time.monotonic() - began
        assert went_down, "the PATCH never reached its state write"
        assert reply.status == 503 and reply.header("Retry-After"), str(reply)
        assert took < 7, f"the PATCH waited {took:.1f}s"
    finally:
        monkeypatch.setattr(store.client, "put_object", put_object)
        ceph_s3.restore()

    # As a client resumes: ask where the session is, send the rest from there.
    for _ in range(5):
        status = await client.get(location)
        assert status.status == 204, str(status)
        offset = int(status.header("Range").split("-")[1]) + 1
        assert offset in cuts[1:3], f"the session is at {offset}, not at a chunk boundary"
        if offset == cuts[2]:
            break
        reply = await client.patch(location, data[offset:cuts[2]], headers={"Content-Range": f"{offset}-{cuts[2] - 1}"})
        if reply.status == 202:
            break
        # The state write the outage interrupted may have landed since: the bucket says where.
        assert reply.status == 416, str(reply)
    reply = await client.put(with_query(location, digest=digest_of(data)), data[cuts[2]:],
                             headers={"Content-Range": f"{cuts[2]}-{len(data) - 1}"})
    assert reply.status == 201, str(reply)
    got = await client.get(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert got.status == 200 and got.body == data


@pytest_twisted.ensureDeferred
async def test_a_commit_the_store_broke_after_completing_its_upload_can_be_sent_again(
        ceph_s3: Any, node: RunningRegistry, monkeypatch: Any) -> None:
    """The final PUT completed the multipart upload, then the store froze before the copy
    to the blob key: 503. Sent again, the same PUT finds the completed object and commits it."""
    client = Client(node.url)
    data = blob_bytes(7 * MiB + 99, "commit-after-complete")
    location = client.path_of(await client.start_upload(REPO))
    reply = await client.patch(location, data[:6 * MiB], headers={"Content-Range": f"0-{6 * MiB - 1}"})
    assert reply.status == 202, str(reply)
    location = client.path_of(reply.location)

    store = node.service.store
    copy_large = store.client.copy_large

    async def frozen_copy(src: str, dst: str, size: int) -> str:
        ceph_s3.freeze()
        return await copy_large(src, dst, size)

    monkeypatch.setattr(store.client, "copy_large", frozen_copy)
    final = with_query(location, digest=digest_of(data))
    try:
        reply = await client.put(final, data[6 * MiB:], headers={"Content-Range": f"{6 * MiB}-{len(data) - 1}"})
        assert reply.status == 503, str(reply)
    finally:
        monkeypatch.setattr(store.client, "copy_large", copy_large)
        ceph_s3.restore()
    reply = await client.put(final, data[6 * MiB:], headers={"Content-Range": f"{6 * MiB}-{len(data) - 1}"})
    assert reply.status == 201, str(reply)
    got = await client.get(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert got.status == 200 and got.body == data
    assert (await client.get(location)).status == 404


# -- 4. readiness: the bucket is written and read, quickly ------------------------------------

@pytest_twisted.ensureDeferred
async def test_readyz_fails_quickly_when_the_bucket_disappears_or_the_store_freezes(
        ceph_s3: Any, node: RunningRegistry, bucket: S3Client) -> None:
    client = Client(node.url)
    ready = await client.get("/readyz")
    assert ready.status == 200, str(ready)

    with ceph_s3.outage("freeze"):
        began = time.monotonic()
        frozen = await client.get("/readyz")
        took = time.monotonic() - began
    assert frozen.status == 503 and "within 2s" in frozen.json()["reason"], str(frozen)
    assert took < 4, f"/readyz took {took:.1f}s"
    assert (await client.get("/readyz")).status == 200

    # Gone: every node's probe object first (the bucket must be empty to go).
    keys = [entry.key async for entry in bucket.list_objects()]
    await bucket.delete_objects(keys)
    await bucket.delete_bucket()
    began = time.monotonic()
    gone = await client.get("/readyz")
    took = time.monotonic() - began
    assert gone.status == 503, str(gone)
    reason = gone.json()["reason"]
    # the kind of trouble for anyone who asks; the bucket and endpoint only in the log
    assert "does not exist" in reason and bucket.settings.bucket not in reason, reason
    assert bucket.settings.endpoint not in reason, reason
    assert took < 3, f"/readyz took {took:.1f}s"


# -- 5. start-up ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_node_on_a_missing_bucket_refuses_to_start_with_one_line(ceph_s3: Any, make_registry: Any,
                                                                          tmp_path: Any) -> None:
    settings = ceph_s3.settings("no-such-bucket-here", **DEADLINES)
    with pytest.raises(StartupError) as caught:
        make_registry(storage=StorageSettings("s3", s3=settings))
    assert "no-such-bucket-here" in str(caught.value) and "does not exist" in str(caught.value)

    config = tmp_path / "registryd.toml"
    config.write_text("\n".join([
        "[storage]", 'driver = "s3"', "[storage.s3]", f'endpoint = "{ceph_s3.endpoint}"',
        'bucket = "no-such-bucket-here"', f'access_key_id = "{ceph_s3.access_key}"',
        f'secret_access_key = "{ceph_s3.secret_key}"', ""]))
    result = subprocess.run([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd", "--listen",
                             "tcp:0:interface=127.0.0.1", "--data-dir", str(tmp_path / "data"),
                             "--config", str(config)], capture_output=True, cwd=ROOT, timeout=60, text=True)
    assert result.returncode == 1, result
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("registryd: object store: bucket 'no-such-bucket-here'") \
        and "does not exist" in lines[0], lines


@pytest.mark.parametrize("error, outage", [
    (S3Unavailable("S3 GET k: connection refused"), True),
    (S3Error(503, "SlowDown", "later", "k", "GET"), True),
    (S3Error(500, "InternalError", "", "k", "PUT"), True),
    (S3Error(404, "NoSuchBucket", "", None, "PUT"), True),
    (S3Error(403, "SignatureDoesNotMatch", "", "k", "GET"), True),
    (S3Error(404, "NoSuchKey", "", "k", "GET"), False),
    (S3Error(412, "PreconditionFailed", "", "k", "PUT"), False),
    (ValueError("a bug"), False),
])
def test_which_failures_are_an_outage(error: Exception, outage: bool) -> None:
    from registryd.storage.outage import outage_reason

    reason = outage_reason(error)
    assert (reason is not None) == outage
    assert reason is None or (reason.startswith("object store unavailable: ") and "\n" not in reason)
