"""Upload sessions in a shared bucket (UploadStore over S3Appendable) against a real radosgw.

Writers are fed directly, as RegistryRequest.handleContentChunk would: no
HTTP in front. Two stores with their own S3Client and spool directory play
two registryd nodes on one bucket.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults

from s3_helpers import PeakRss, node_b, read, s3  # noqa: F401  (fixtures)
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.storage.blobs import Blobs
from registryd.storage.guard import BlobGuard
from registryd.storage import layout
from registryd.storage.s3 import Part, S3Client, S3Error, S3Unavailable
from registryd.storage.s3.appendable import Record, S3Appendable, data_key
from registryd.storage.s3.driver import S3Driver
from registryd.storage.uploads import SessionState, Upload, UploadStore, state_key
from registryd.threads import BlockingPool, InlinePool

MiB = 1024 * 1024
#: The smallest part S3 (and radosgw, see the first test) accepts but for the last.
PART = 5 * MiB
PIECE = 64 * 1024


@pytest.fixture
def two_clients(s3: S3Client, node_b: S3Client) -> tuple[S3Client, S3Client]:
    """A second client on the same bucket: another node's connection pool."""
    return s3, node_b


def node(client: S3Client, tmp_path: Any, name: str = "a", **overrides: Any) -> UploadStore:
    data = S3Appendable(client, str(tmp_path / f"spool-{name}"), PART, overrides.pop("pool", InlinePool()))
    driver = S3Driver(client)
    return UploadStore(driver, data, Blobs(driver, overrides.pop("guard", BlobGuard())), **overrides)


def record(state: SessionState) -> Record:
    """What the state says of the session's data in the bucket (its parts and tail)."""
    return Record.of(state.record)


def content(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def feed(writer: Any, data: bytes) -> None:
    """Hand ``data`` over as a connection would: 64 KiB at a time."""
    for i in range(0, len(data), PIECE):
        writer.write(data[i:i + PIECE])


async def patch(store: UploadStore, upload: Upload, data: bytes, start: int | None = None) -> None:
    writer = store.open_writer(upload, upload.size if start is None else start, None)
    feed(writer, data)
    await store.acknowledge(writer)


async def finish(store: UploadStore, upload: Upload, data: bytes, digest: Digest) -> None:
    writer = store.open_writer(upload, None, digest.algorithm)
    feed(writer, data)
    await store.commit(writer, digest)


async def keys(client: S3Client, prefix: str = "") -> list[str]:
    return [entry.key async for entry in client.list_objects(prefix)]


async def multiparts(client: S3Client) -> list[str]:
    return [upload.key async for upload in client.list_multipart_uploads()]


async def state(client: S3Client, upload_id: str) -> SessionState:
    data = await client.get_small(state_key(upload_id), MiB)
    assert data is not None
    return SessionState.from_json(data)


def is_data(key: str, upload_id: str) -> bool:
    """``key`` is one of the session's multipart objects (``data-<rev>``)."""
    return key.startswith(layout.upload_prefix(upload_id) + "data-")


def downloads(client: S3Client) -> list[str]:
    """Record the keys ``client`` GETs into a consumer from now on (tails, streamed verifications)."""
    seen: list[str] = []
    original = client.get_object

    async def get_object(key: str, consumer: Any, byte_range: Any = None) -> Any:
        seen.append(key)
        return await original(key, consumer, byte_range)

    client.get_object = get_object  # type: ignore[method-assign]
    return seen


async def assert_session_gone(client: S3Client, store: UploadStore, upload: Upload) -> None:
    assert await keys(client, layout.UPLOADS) == []
    assert await multiparts(client) == []
    with pytest.raises(RegistryError) as caught:
        await store.get(upload.repo, upload.id)
    assert caught.value.code == "BLOB_UPLOAD_UNKNOWN"
    assert store.known(upload.repo, upload.id) is None


def spool_files(tmp_path: Any) -> list[str]:
    return [name for spool in tmp_path.glob("spool-*") for name in os.listdir(spool)]


# -- the store's assumptions about S3 ---------------------------------------------

@pytest_twisted.ensureDeferred
async def test_radosgw_enforces_the_minimum_part_size(s3: S3Client, tmp_path: Any) -> None:
    path = tmp_path / "parts"
    path.write_bytes(content(2 * MiB))
    upload_id = await s3.create_multipart("small-parts")
    parts = [Part(n, await s3.upload_part("small-parts", upload_id, n, str(path), (n - 1) * MiB, MiB))
             for n in (1, 2)]
    with pytest.raises(S3Error) as caught:
        await s3.complete_multipart("small-parts", upload_id, parts)
    assert (caught.value.status, caught.value.code) == (400, "EntityTooSmall")
    await s3.abort_multipart("small-parts", upload_id)
    with pytest.raises(ValueError, match="part_size"):
        S3Appendable(s3, str(tmp_path / "spool"), PART - 1, InlinePool())


# -- one node ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_monolithic_upload_is_one_put_at_the_blob_key(s3: S3Client, tmp_path: Any) -> None:
    guard = BlobGuard()
    store = node(s3, tmp_path, guard=guard)
    data = content(300 * 1024, 1)
    digest = sha256(data)
    upload = await store.create("lib/app")
    assert store.known("lib/app", upload.id) is upload and store.known("other", upload.id) is None
    seen = downloads(s3)
    before = time.time()
    await finish(store, upload, data, digest)
    assert seen == []  # verified by the hasher that saw the body
    assert await read(s3, layout.blob_key(digest)) == data
    assert (guard.last_claim(digest) or 0) >= before
    await assert_session_gone(s3, store, upload)
    assert spool_files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_empty_blob(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    upload = await store.create("lib/app")
    await finish(store, upload, b"", sha256(b""))
    assert await read(s3, layout.blob_key(sha256(b""))) == b""
    await assert_session_gone(s3, store, upload)


@pytest_twisted.ensureDeferred
async def test_chunks_become_full_parts_and_one_tail(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    sizes = [MiB, 7 * MiB, 2 * MiB + 3, 12 * MiB, 100, 3 * MiB - 103]
    chunks = [content(size, seed) for seed, size in enumerate(sizes)]
    data = b"".join(chunks)
    upload = await store.create("lib/app")
    total = 0
    for chunk in chunks:
        await patch(store, upload, chunk)
        total += len(chunk)
        saved = await state(s3, upload.id)
        assert saved == upload.state and saved.size == total
        parts, tail = record(saved).parts, record(saved).tail
        assert [p.size for p in parts] == [PART] * (total // PART)
        assert [p.number for p in parts] == list(range(1, total // PART + 1))
        assert (tail.size if tail else 0) == total % PART
        # The state, at most one tail, nothing else (the parts are in the multipart upload).
        expected = [state_key(upload.id)] + ([tail.key] if tail else [])
        assert sorted(await keys(s3, layout.upload_prefix(upload.id))) == sorted(expected)
    assert (total, total % PART) == (25 * MiB, 0)  # the last chunk ended exactly on a part
    final = content(MiB, 99)
    digest = sha256(data + final)
    seen = downloads(s3)
    await finish(store, upload, final, digest)
    assert not any(is_data(key, upload.id) for key in seen)
    assert await read(s3, layout.blob_key(digest)) == data + final
    await assert_session_gone(s3, store, upload)
    assert spool_files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_a_large_monolithic_body_goes_up_in_parts(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    data = content(11 * MiB + 5, 7)
    digest = sha256(data)
    upload = await store.create("lib/app")
    await finish(store, upload, data, digest)
    assert await read(s3, layout.blob_key(digest)) == data
    await assert_session_gone(s3, store, upload)


@pytest_twisted.ensureDeferred
async def test_another_algorithm_is_verified_without_the_session_hasher(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    small, large = content(MiB, 1), content(6 * MiB, 2)
    for data in (small, large):
        upload = await store.create("lib/app")
        await patch(store, upload, data[:1000])  # hashed as sha256
        digest = Digest("sha512", hashlib.sha512(data).hexdigest())
        seen = downloads(s3)
        await finish(store, upload, data[1000:], digest)
        # Small: hashed from the spool; large: streamed from the completed object.
        assert any(is_data(key, upload.id) for key in seen) == (data is large)
        assert await read(s3, layout.blob_key(digest)) == data
        await assert_session_gone(s3, store, upload)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("size", [100 * 1024, 12 * MiB])
async def test_wrong_digest_leaves_nothing(s3: S3Client, tmp_path: Any, size: int) -> None:
    store = node(s3, tmp_path)
    data = content(size, 3)
    upload = await store.create("lib/app")
    await patch(store, upload, data[:6 * MiB])
    wrong = sha256(data + b"x")
    with pytest.raises(RegistryError) as caught:
        await finish(store, upload, data[6 * MiB:], wrong)
    assert caught.value.code == "DIGEST_INVALID"
    assert await s3.head_object(layout.blob_key(wrong)) is None
    assert await s3.head_object(layout.blob_key(sha256(data))) is None
    await assert_session_gone(s3, store, upload)
    assert await keys(s3) == []
    assert spool_files(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_a_cut_off_body_leaves_the_session_as_acknowledged(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    first, second = content(3 * MiB, 4), content(4 * MiB, 5)
    upload = await store.create("lib/app")
    await patch(store, upload, first)
    acknowledged = await state(s3, upload.id)
    writer = store.open_writer(upload, len(first), None)
    feed(writer, second[:MiB + 17])
    writer.abandon()
    assert spool_files(tmp_path) == []
    assert await state(s3, upload.id) == acknowledged
    assert (await store.get("lib/app", upload.id)).size == len(first)
    # The client sends the chunk again, whole this time; the hasher is still good.
    await patch(store, upload, second, start=len(first))
    digest = sha256(first + second)
    seen = downloads(s3)
    await finish(store, upload, b"", digest)
    assert not any(is_data(key, upload.id) for key in seen) and await read(s3, layout.blob_key(digest)) == first + second


@pytest_twisted.ensureDeferred
async def test_a_failed_acknowledge_can_be_retried(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    first, second = content(3 * MiB, 6), content(4 * MiB, 7)
    upload = await store.create("lib/app")
    await patch(store, upload, first)
    acknowledged = upload.state
    original = s3.put_object

    async def put_object(key: str, body: Any, **kwargs: Any) -> str:
        if key == state_key(upload.id):
            raise S3Unavailable("S3 PUT: connection lost")
        return await original(key, body, **kwargs)

    s3.put_object = put_object  # type: ignore[method-assign]
    with pytest.raises(S3Unavailable):
        await patch(store, upload, second)  # a part and a new tail went up, the state did not
    s3.put_object = original  # type: ignore[method-assign]
    assert await state(s3, upload.id) == acknowledged == upload.state and not upload.busy
    assert len(await keys(s3, layout.upload_prefix(upload.id))) == 3  # state, its tail, the stray tail
    stray = await multiparts(s3)  # unreferenced: the retry starts another
    assert len(stray) == 1 and is_data(stray[0], upload.id)
    await patch(store, upload, second, start=len(first))
    digest = sha256(first + second)
    await finish(store, upload, b"", digest)
    assert await read(s3, layout.blob_key(digest)) == first + second
    await assert_session_gone(s3, store, upload)


@pytest_twisted.ensureDeferred
async def test_a_wrong_start_is_416(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    upload = await store.create("lib/app")
    await patch(store, upload, content(1000))
    for start in (0, 999):
        with pytest.raises(RegistryError) as caught:
            store.open_writer(upload, start, None)
        assert caught.value.status == 416 and caught.value.headers["Range"] == "0-999"
    writer = store.open_writer(upload, 1000, None)
    with pytest.raises(RegistryError) as caught:
        store.open_writer(upload, 1000, None)  # busy with a body already
    assert caught.value.status == 416
    writer.abandon()
    # Beyond the end: another node may have acknowledged that far, so the bucket decides.
    writer = store.open_writer(upload, 5000, None)
    feed(writer, b"y" * 10)
    with pytest.raises(RegistryError) as caught:
        await store.acknowledge(writer)
    assert caught.value.status == 416 and caught.value.headers["Range"] == "0-999"
    assert caught.value.headers["Location"] == upload.location()
    assert (await state(s3, upload.id)).size == 1000 and not upload.busy
    assert spool_files(tmp_path) == []
    await patch(store, upload, b"z", start=1000)
    assert upload.size == 1001


@pytest_twisted.ensureDeferred
async def test_cancel(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    upload = await store.create("lib/app")
    await patch(store, upload, content(7 * MiB))
    data = record(upload.state)
    assert data.multipart is not None and data.tail is not None
    assert await multiparts(s3) == [data.data_key(layout.upload_prefix(upload.id))]
    assert is_data(data.data_key(layout.upload_prefix(upload.id)), upload.id)
    await store.cancel(upload)
    await assert_session_gone(s3, store, upload)
    await store.cancel(upload)  # again: nothing left to remove is fine


@pytest_twisted.ensureDeferred
async def test_unknown_sessions(s3: S3Client, tmp_path: Any) -> None:
    store = node(s3, tmp_path)
    upload = await store.create("lib/app")
    for repo, upload_id in (("lib/other", upload.id), ("lib/app", "0" * 32), ("lib/app", "../state")):
        with pytest.raises(RegistryError) as caught:
            await store.get(repo, upload_id)
        assert caught.value.code == "BLOB_UPLOAD_UNKNOWN"
    # Cancelled elsewhere while this node still had it in memory.
    await s3.delete_object(state_key(upload.id))
    writer = store.open_writer(upload, 0, None)
    feed(writer, b"late")
    with pytest.raises(RegistryError) as caught:
        await store.acknowledge(writer)
    assert caught.value.code == "BLOB_UPLOAD_UNKNOWN" and store.known("lib/app", upload.id) is None


# -- two nodes ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_chunks_alternate_between_two_nodes(two_clients: Any, tmp_path: Any) -> None:
    client_a, client_b = two_clients
    a, b = node(client_a, tmp_path, "a"), node(client_b, tmp_path, "b")
    sizes = [2 * MiB, 6 * MiB, MiB + 1, 4 * MiB, 9 * MiB, 10]
    chunks = [content(size, 10 + seed) for seed, size in enumerate(sizes)]
    upload = await a.create("lib/app")
    offset = 0
    for number, chunk in enumerate(chunks):
        here = (a, b)[number % 2]
        if number == 2:
            # A's memory is one chunk behind; the client's Content-Range is right.
            session = a.known("lib/app", upload.id)
            assert session is not None and session.size == len(chunks[0]) < offset
        else:
            session = await here.get("lib/app", upload.id)
        await patch(here, session, chunk, start=offset)
        offset += len(chunk)
        assert (await state(client_a, upload.id)).size == offset == session.size
    data = b"".join(chunks)
    digest = sha256(data)
    # B did not see the first chunk: it verifies by streaming the completed object.
    session = await b.get("lib/app", upload.id)
    assert session.hasher is None
    seen = downloads(client_b)
    await finish(b, session, b"", digest)
    assert any(is_data(key, upload.id) for key in seen)
    assert await read(client_a, layout.blob_key(digest)) == data
    await assert_session_gone(client_a, a, upload)


@pytest_twisted.ensureDeferred
async def test_a_body_without_range_appends_where_the_bucket_says(two_clients: Any, tmp_path: Any) -> None:
    client_a, client_b = two_clients
    a, b = node(client_a, tmp_path, "a"), node(client_b, tmp_path, "b")
    first, second, third = content(MiB, 20), content(2 * MiB, 21), content(3 * MiB, 22)
    upload = await a.create("lib/app")
    await patch(a, upload, first)
    await patch(b, await b.get("lib/app", upload.id), second)
    stale = a.known("lib/app", upload.id)
    assert stale is not None and stale.size == len(first) and stale.hasher is not None
    digest = sha256(first + second + third)
    await finish(a, stale, third, digest)  # a final PUT with the last bytes, no Content-Range
    assert await read(client_a, layout.blob_key(digest)) == first + second + third


@pytest_twisted.ensureDeferred
async def test_a_racing_node_is_refused_with_416(two_clients: Any, tmp_path: Any) -> None:
    client_a, client_b = two_clients
    a, b = node(client_a, tmp_path, "a"), node(client_b, tmp_path, "b")
    upload = await a.create("lib/app")
    await patch(a, upload, content(MiB, 30))
    on_b = await b.get("lib/app", upload.id)
    # Both nodes take a body for the same offset; B acknowledges first.
    writer_a = a.open_writer(upload, MiB, None)
    feed(writer_a, content(MiB, 31))
    await patch(b, on_b, content(2 * MiB, 32), start=MiB)
    with pytest.raises(RegistryError) as caught:
        await a.acknowledge(writer_a)
    assert caught.value.status == 416 and caught.value.headers["Range"] == f"0-{3 * MiB - 1}"
    assert (await state(client_a, upload.id)).size == 3 * MiB == upload.size


@pytest_twisted.ensureDeferred
async def test_two_final_puts_racing_on_two_nodes_never_mix_content(two_clients: Any, tmp_path: Any) -> None:
    """Both start a multipart upload at commit; each copies only what it completed and verified.

    The order forced here is the one that stored B's bytes under A's digest
    when both targeted one ``data`` key: A completes, B completes, A copies.
    """
    client_a, client_b = two_clients
    a, b = node(client_a, tmp_path, "a"), node(client_b, tmp_path, "b")
    first = content(MiB, 50)
    upload = await a.create("lib/app")
    await patch(a, upload, first)
    on_b = await b.get("lib/app", upload.id)
    final_a, final_b = content(6 * MiB, 51), content(6 * MiB, 52)
    digest_a, digest_b = sha256(first + final_a), sha256(first + final_b)
    a_completed: Deferred[None] = Deferred()
    b_completed: Deferred[None] = Deferred()
    a_copied: Deferred[None] = Deferred()
    complete_a, complete_b = client_a.complete_multipart, client_b.complete_multipart
    copy_a, copy_b = client_a.copy_large, client_b.copy_large

    async def completed_on_a(*args: Any) -> str:
        etag = await complete_a(*args)
        a_completed.callback(None)
        return etag

    async def completed_on_b(*args: Any) -> str:
        await a_completed
        etag = await complete_b(*args)
        b_completed.callback(None)
        return etag

    async def copy_on_a(*args: Any) -> str:
        await b_completed  # B completed after A: a shared key would now hold B's bytes
        try:
            return await copy_a(*args)
        finally:
            a_copied.callback(None)

    async def copy_on_b(*args: Any) -> str:
        await a_copied
        return await copy_b(*args)

    client_a.complete_multipart = completed_on_a  # type: ignore[method-assign]
    client_b.complete_multipart = completed_on_b  # type: ignore[method-assign]
    client_a.copy_large, client_b.copy_large = copy_on_a, copy_on_b  # type: ignore[method-assign]
    outcomes = await DeferredList([Deferred.fromCoroutine(finish(a, upload, final_a, digest_a)),
                                   Deferred.fromCoroutine(finish(b, on_b, final_b, digest_b))], consumeErrors=True)
    assert outcomes[0][0], outcomes[0][1]  # A's commit ran first throughout: it stands
    assert await read(client_a, layout.blob_key(digest_a)) == first + final_a
    # B may lose its object to A's clean-up of the session; if B stored a blob, it is B's.
    if await client_a.head_object(layout.blob_key(digest_b)) is not None:
        assert await read(client_a, layout.blob_key(digest_b)) == first + final_b
    assert await keys(client_a, layout.upload_prefix(upload.id)) == []


# -- upkeep -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reap_old_sessions_and_orphan_multipart_uploads(two_clients: Any, tmp_path: Any) -> None:
    client_a, client_b = two_clients
    now = [time.time()]
    a = node(client_a, tmp_path, "a", clock=lambda: now[0])
    b = node(client_b, tmp_path, "b", clock=lambda: now[0])
    old = await a.create("lib/app")
    await patch(a, old, content(6 * MiB, 40))
    busy = await a.create("lib/app")
    writer = a.open_writer(busy, 0, None)
    orphan = await client_a.create_multipart(data_key(layout.upload_prefix("f" * 32)))  # its node died before writing a state
    assert await a.reap(3600) == 0
    assert len(await multiparts(client_a)) == 2
    now[0] += 7200
    assert await a.reap(3600) == 2  # the old session and the orphan; the busy one stays
    assert await keys(client_a) == [state_key(busy.id)]
    assert await multiparts(client_a) == []
    with pytest.raises(S3Error):
        await client_a.list_parts(data_key(layout.upload_prefix("f" * 32)), orphan)
    assert a.known("lib/app", old.id) is None and a.known("lib/app", busy.id) is busy
    writer.abandon()
    # Both nodes reap at once: each step tolerates the other having done it.
    for seed in (41, 42):
        await patch(b, await b.create("lib/app"), content(6 * MiB, seed))
    await client_b.create_multipart(data_key(layout.upload_prefix("e" * 32)))
    now[0] += 7200
    counts = await gatherResults([Deferred.fromCoroutine(a.reap(3600)), Deferred.fromCoroutine(b.reap(3600))])
    assert sum(counts) >= 4
    assert await keys(client_a) == [] and await multiparts(client_a) == []
    assert a.known("lib/app", busy.id) is None


# -- memory -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_40_mib_in_flat_memory(s3: S3Client, tmp_path: Any) -> None:
    pool = BlockingPool(reactor, 2)
    pool.start()
    store = node(s3, tmp_path, pool=pool)
    block = content(PIECE, 50)
    hasher = hashlib.sha256()
    upload = await store.create("lib/app")
    rss = PeakRss()
    rss.start()
    try:
        began = time.monotonic()
        for body in range(4):  # 3 chunks of 13 MiB and 1 MiB + 64 KiB at commit
            writer = store.open_writer(upload, upload.size, None)
            for i in range(208 if body < 3 else 17):
                piece = i.to_bytes(4, "big") + body.to_bytes(4, "big") + block[8:]
                hasher.update(piece)
                writer.write(piece)
            if body < 3:
                await store.acknowledge(writer)
            else:
                digest = Digest("sha256", hasher.hexdigest())
                await store.commit(writer, digest)
        seconds = time.monotonic() - began
    finally:
        rss.stop()
        pool.stop()
    info = await s3.head_object(layout.blob_key(digest))
    assert info is not None and info.size == 3 * 13 * MiB + 17 * PIECE
    rise = rss.rise_mib
    print(f"40 MiB through 4 bodies in {seconds:.2f}s, RSS rise {rise:.1f} MiB")
    assert rise < 16, f"RSS rose by {rise:.1f} MiB for a 40 MiB upload"
