"""The S3 driver's local cache of hot blobs (``[storage] cache_size``).

Through the HTTP API of an in-process registryd on a fresh bucket of the
session's radosgw: fills, hits, ranges, eviction, blobs gone from the bucket,
clients that leave mid-download. Proving that a GET came from the cache: the
bucket object is overwritten with other bytes of the same size (nothing a
registry would do to content-addressed data, which is why it is a clean
observable); a cached blob still comes out right, an uncached one does not.

Then the cache's own parts without a reactor or a bucket: the LRU index, a
fill whose bytes are wrong, the start-up scan, the metrics.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Coroutine, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from conftest import RunningRegistry
from oci_client import Client
from registryd.config import StorageSettings
from registryd.digest import Digest, digest_of, parse_digest
from registryd.metrics import Metrics
from registryd.storage.s3.client import S3Client
from registryd.storage.hot_cache import BLOBS, FILLS, HotCache, LruIndex
from registryd.storage.layout import blob_key
from registryd.threads import InlinePool
from support.wait import sleep

REPO = "hot/app"


# --- helpers ---------------------------------------------------------------------------------------------


async def until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def blob_bytes(size: int, seed: str) -> bytes:
    """``size`` bytes that differ per seed (no two test blobs share a digest)."""
    block = hashlib.sha512(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def bucket(ceph_s3: Any) -> Iterator[S3Client]:
    client = pytest_twisted.blockon(Deferred.fromCoroutine(ceph_s3.new_bucket()))
    yield client
    pytest_twisted.blockon(Deferred.fromCoroutine(client.close()))


@pytest.fixture
def start(make_registry: Any, bucket: S3Client, tmp_path: Any) -> Callable[..., Any]:
    """Start a node on ``bucket`` with a hot cache of ``cache_size`` bytes (in ``tmp_path/cache``); await it."""
    async def started(cache_size: int, cache_dir: str | None = None) -> RunningRegistry:
        storage = StorageSettings("s3", s3=bucket.settings, cache_size=cache_size,
                                  cache_dir=cache_dir or str(tmp_path / "cache"))
        node = make_registry(storage=storage)
        cache = hot(node)
        await until(lambda: cache.loaded, what="the cache's start-up scan")
        return node
    return started


def hot(node: RunningRegistry) -> HotCache:
    cache = node.service.store.hot_cache
    assert cache is not None
    return cache  # type: ignore[no-any-return]


async def get(node: RunningRegistry, digest: str, headers: dict[str, str] | None = None) -> Any:
    """GET the blob; then wait for what the GET left running in the cache (a rename, a removal)."""
    reply = await Client(node.url).get(f"/v2/{REPO}/blobs/{digest}", headers=headers)
    await hot(node).settle()
    return reply


def cached_file(node: RunningRegistry, digest: str) -> str:
    return hot(node).path(parse_digest(digest))


def fills_left(node: RunningRegistry) -> list[str]:
    return os.listdir(os.path.join(hot(node).directory, FILLS))


def files_in_cache(cache: HotCache) -> dict[str, int]:
    """Every blob file in the cache directory and its size."""
    found = {}
    for algorithm in ("sha256", "sha512"):
        folder = os.path.join(cache.directory, BLOBS, algorithm)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            found[f"{algorithm}:{name}"] = os.path.getsize(os.path.join(folder, name))
    return found


async def overwrite_in_bucket(bucket: S3Client, digest: str, data: bytes) -> None:
    """Put other bytes of the same size under the blob's key, behind the registry's back."""
    await bucket.put_object(blob_key(parse_digest(digest)), data)


# --- through the HTTP API --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_first_get_fills_the_cache_and_the_second_is_served_from_it(start: Any, bucket: S3Client) -> None:
    node = await start(4_000_000)
    cache = hot(node)
    data = blob_bytes(300_000, "one")
    digest = await Client(node.url).push_blob(REPO, data)
    assert not os.path.exists(cached_file(node, digest))   # a push does not fill

    reply = await get(node, digest)
    assert reply.status == 200 and reply.body == data
    assert reply.header("Docker-Content-Digest") == digest and reply.header("Content-Length") == str(len(data))
    with open(cached_file(node, digest), "rb") as f:
        assert f.read() == data
    assert (cache.stats.misses, cache.stats.hits, cache.stats.fills) == (1, 0, 1)
    assert cache.used == len(data) and cache.reserved == 0 and fills_left(node) == []

    # Same size, other bytes in the bucket: only the cache can still answer with the blob.
    other = blob_bytes(len(data), "not the blob")
    await overwrite_in_bucket(bucket, digest, other)
    reply = await get(node, digest)
    assert reply.status == 200 and reply.body == data
    assert (cache.stats.misses, cache.stats.hits) == (1, 1)
    head = await Client(node.url).head(f"/v2/{REPO}/blobs/{digest}")
    assert head.status == 200 and head.header("Content-Length") == str(len(data))
    assert cache.stats.hits == 1    # a HEAD sends no bytes: no hit
    metrics = (await Client(node.url).get("/metrics")).body.decode()
    assert 'registryd_s3_hot_cache_requests_total{result="hit"} 1.0' in metrics
    assert f"registryd_s3_hot_cache_bytes {float(len(data))}" in metrics

    # The observable is honest: without the cached copy the bucket's bytes come out, and a
    # fill of them fails its digest check, so they are never cached (a corrupted fill end to end).
    cache.discard(parse_digest(digest))
    await cache.settle()
    reply = await get(node, digest)
    assert reply.status == 200 and reply.body == other
    assert cache.stats.rejected == 1 and cache.stats.fills == 1
    assert not os.path.exists(cached_file(node, digest)) and fills_left(node) == []
    assert cache.used == 0 and cache.reserved == 0


@pytest_twisted.ensureDeferred
async def test_ranges_on_a_cached_blob(start: Any, bucket: S3Client) -> None:
    node = await start(4_000_000)
    cache = hot(node)
    data = blob_bytes(200_000, "ranges")
    digest = await Client(node.url).push_blob(REPO, data)

    # A range of a blob not cached comes from the bucket and starts no fill.
    reply = await get(node, digest, {"Range": "bytes=10-19"})
    assert reply.status == 206 and reply.body == data[10:20]
    assert digest_of(data) not in cache and not os.path.exists(cached_file(node, digest))

    assert (await get(node, digest)).body == data
    assert parse_digest(digest) in cache
    await overwrite_in_bucket(bucket, digest, blob_bytes(len(data), "other"))
    for header, expected, content_range in [
        ("bytes=100-199", data[100:200], f"bytes 100-199/{len(data)}"),
        ("bytes=-10", data[-10:], f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"),
        ("bytes=199990-", data[199990:], f"bytes 199990-{len(data) - 1}/{len(data)}"),
        ("bytes=150000-999999", data[150000:], f"bytes 150000-{len(data) - 1}/{len(data)}"),
    ]:
        reply = await get(node, digest, {"Range": header})
        assert reply.status == 206, str(reply)
        assert reply.body == expected and reply.header("Content-Range") == content_range
        assert reply.header("Content-Length") == str(len(expected))
    assert cache.stats.hits == 4
    unsatisfiable = await get(node, digest, {"Range": f"bytes={len(data)}-"})
    assert unsatisfiable.status == 416 and unsatisfiable.header("Content-Range") == f"bytes */{len(data)}"


@pytest_twisted.ensureDeferred
async def test_eviction_keeps_the_total_under_cache_size_least_recently_used_first(start: Any) -> None:
    node = await start(400_000)   # blobs up to 100_000 bytes are cached
    cache = hot(node)
    client = Client(node.url)
    blobs = {name: blob_bytes(90_000, name) for name in "abcde"}
    digests = {name: await client.push_blob(REPO, data) for name, data in blobs.items()}
    for name in "abcd":
        assert (await get(node, digests[name])).body == blobs[name]
    assert set(files_in_cache(cache)) == {digests[n] for n in "abcd"}
    assert (await get(node, digests["a"])).body == blobs["a"]    # a hit: a is now the most recent

    assert (await get(node, digests["e"])).body == blobs["e"]    # room for e: b goes
    on_disk = files_in_cache(cache)
    assert set(on_disk) == {digests[n] for n in "acde"}
    assert sum(on_disk.values()) == cache.used == 360_000 <= 400_000
    assert [str(d) for d in cache.lru_order()] == [digests[n] for n in "cdae"]
    assert (cache.stats.evictions, cache.stats.evicted_bytes) == (1, 90_000)

    # Above a quarter of the cache: served, never cached, nothing evicted for it.
    big = blob_bytes(100_001, "big")
    big_digest = await client.push_blob(REPO, big)
    assert (await get(node, big_digest)).body == big
    assert big_digest not in files_in_cache(cache) and cache.stats.evictions == 1

    # b comes back as a fill, evicting the least recently used (c).
    assert (await get(node, digests["b"])).body == blobs["b"]
    assert set(files_in_cache(cache)) == {digests[n] for n in "adeb"}
    assert sum(files_in_cache(cache).values()) <= 400_000


@pytest_twisted.ensureDeferred
async def test_a_blob_gone_from_the_bucket_is_404_though_cached(start: Any, bucket: S3Client) -> None:
    node = await start(4_000_000)
    cache = hot(node)
    client = Client(node.url)
    gone, deleted = blob_bytes(50_000, "gone"), blob_bytes(50_000, "deleted")
    gone_digest, deleted_digest = await client.push_blob(REPO, gone), await client.push_blob(REPO, deleted)
    for digest in (gone_digest, deleted_digest):
        assert (await get(node, digest)).status == 200
        assert os.path.exists(cached_file(node, digest))

    # Another node's gc removed it from the bucket: every node answers 404, and drops its copy.
    await bucket.delete_object(blob_key(parse_digest(gone_digest)))
    reply = await get(node, gone_digest)
    assert reply.status == 404 and reply.codes == ["BLOB_UNKNOWN"]
    assert not os.path.exists(cached_file(node, gone_digest)) and parse_digest(gone_digest) not in cache
    assert (await client.head(f"/v2/{REPO}/blobs/{gone_digest}")).status == 404

    # Deleted through this node's store: the cached file goes with it.
    assert await node.service.store.blobs.delete(parse_digest(deleted_digest))
    await cache.settle()
    assert not os.path.exists(cached_file(node, deleted_digest)) and len(cache) == 0 and cache.used == 0
    assert (await get(node, deleted_digest)).status == 404


class _Leaver(Protocol):
    """Asks for a blob, takes the first bytes of the answer, then drops the connection."""

    def __init__(self, request: bytes, probe: Callable[[], Any] = lambda: None) -> None:
        self._request = request
        self._probe = probe
        self.received = 0
        self.probed: Any = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= 256 * 1024 and self.probed is None:
            self.probed = self._probe()
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_mid_download_leaves_no_partial_file(start: Any) -> None:
    node = await start(1024 ** 3)
    cache = hot(node)
    # Far more than the socket buffers between the node and the client can hold.
    data = blob_bytes(64 * 1024 * 1024, "large")
    digest = await Client(node.url).push_blob(REPO, data)

    host, port = node.host.split(":")
    request = f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: {node.host}\r\n\r\n".encode()
    leaver = await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), _Leaver(request, cache.filling))
    await leaver.lost
    assert 0 < leaver.received < len(data)
    assert leaver.probed == [parse_digest(digest)]        # the fill was under way when the client left
    await until(lambda: not cache.filling(), what="the fill to be dropped")
    await cache.settle()
    assert fills_left(node) == [] and not os.path.exists(cached_file(node, digest))
    assert cache.stats.fills == 0 and cache.used == 0 and cache.reserved == 0

    # The dropped fill holds nothing up: the next whole GET fills the cache.
    reply = await get(node, digest)
    assert reply.status == 200 and hashlib.sha256(reply.body).hexdigest() == parse_digest(digest).hex
    with open(cached_file(node, digest), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == parse_digest(digest).hex
    assert cache.stats.fills == 1 and fills_left(node) == []


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_a_streamed_get_without_a_cache_is_quiet(make_registry: Any,
                                                                           bucket: S3Client) -> None:
    """The relay between bucket and client ends quietly when the client's request has lost its channel
    (the autouse fixture fails the test on any logged error)."""
    node = make_registry(storage=StorageSettings("s3", s3=bucket.settings))
    data = blob_bytes(64 * 1024 * 1024, "large")
    digest = await Client(node.url).push_blob(REPO, data)
    host, port = node.host.split(":")
    request = f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: {node.host}\r\n\r\n".encode()
    leaver = await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), _Leaver(request))
    await leaver.lost
    assert 0 < leaver.received < len(data)
    await sleep(0.5)
    reply = await Client(node.url).get(f"/v2/{REPO}/blobs/{digest}", headers={"Range": "bytes=0-9"})
    assert reply.status == 206 and reply.body == data[:10]


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_finds_its_cache_and_removes_leftover_fills(
        start: Any, bucket: S3Client, tmp_path: Any) -> None:
    first = await start(4_000_000)
    data = blob_bytes(100_000, "kept")
    digest = await Client(first.url).push_blob(REPO, data)
    assert (await get(first, digest)).body == data
    await first.service.stopService()
    leftover = tmp_path / "cache" / FILLS / "0123abcd"
    leftover.write_bytes(b"half a blob")

    second = await start(4_000_000)
    cache = hot(second)
    assert not leftover.exists()
    assert [str(d) for d in cache.lru_order()] == [digest] and cache.used == len(data)
    await overwrite_in_bucket(bucket, digest, blob_bytes(len(data), "other"))
    assert (await get(second, digest)).body == data and cache.stats.hits == 1


@pytest_twisted.ensureDeferred
async def test_no_cache_without_cache_size_or_with_redirects(make_registry: Any, bucket: S3Client) -> None:
    plain = make_registry(storage=StorageSettings("s3", s3=bucket.settings))
    assert plain.service.store.hot_cache is None and plain.service.store.blobs.hot_cache is None
    # StorageSettings built in code skips the config check: the store still never caches redirected GETs.
    redirecting = make_registry(storage=StorageSettings("s3", s3=bucket.settings, redirect=True, cache_size=10 ** 6))
    assert redirecting.service.store.hot_cache is None
    data = blob_bytes(1000, "redirect")
    digest = await Client(redirecting.url).push_blob(REPO, data)
    reply = await Client(redirecting.url).get(f"/v2/{REPO}/blobs/{digest}")
    assert reply.status == 307 and reply.header("Location")
    assert not os.path.exists(os.path.join(redirecting.data_dir, "cache"))
    default = make_registry(storage=StorageSettings("s3", s3=bucket.settings, cache_size=10 ** 6))
    assert hot(default).directory == os.path.join(default.data_dir, "cache")
    assert os.path.isdir(os.path.join(default.data_dir, "cache", BLOBS, "sha256"))


# --- the cache's parts, without a bucket -----------------------------------------------------------------

def done(work: Coroutine[Any, Any, Any]) -> Any:
    """The result of work that ends at once (an InlinePool does its jobs on the spot): no reactor needed."""
    outcome: list[Any] = []
    Deferred.fromCoroutine(work).addBoth(outcome.append)
    assert outcome, "the work did not end at once"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def d(name: str) -> Digest:
    return digest_of(name.encode())


def test_lru_index_evicts_least_recently_used_first() -> None:
    index = LruIndex(100)
    for name in "abc":
        assert index.reserve(30) == []
        index.commit(d(name), 30)
    assert list(index) == [d("a"), d("b"), d("c")] and index.used == 90 and index.reserved == 0
    index.touch(d("a"))
    assert list(index) == [d("b"), d("c"), d("a")]
    assert index.reserve(30) == [(d("b"), 30)]           # 90 + 30 > 100: b goes
    assert index.used == 60 and index.reserved == 30
    index.commit(d("d"), 30)
    assert list(index) == [d("c"), d("a"), d("d")] and index.used == 90
    assert index.reserve(70) == [(d("c"), 30), (d("a"), 30)]
    index.release(70)
    assert index.used + index.reserved == 30 and list(index) == [d("d")]
    assert index.remove(d("d")) == 30 and index.remove(d("d")) is None
    assert index.used == 0 and len(index) == 0


def test_lru_index_never_promises_room_that_fills_under_way_hold() -> None:
    index = LruIndex(100)
    assert index.reserve(60) == []
    assert index.reserve(50) is None                     # 60 reserved: 50 cannot fit even in an empty cache
    assert index.reserve(40) == []
    assert index.reserved == 100
    index.release(60)
    index.commit(d("x"), 40)
    assert index.used == 40 and index.reserved == 0
    assert index.reserve(101) is None and index.used == 40   # nothing evicted for a refusal


def test_lru_index_add_at_start_up_keeps_capacity() -> None:
    index = LruIndex(100)
    assert index.add(d("old"), 50) == []
    assert index.add(d("new"), 40) == []
    assert index.add(d("newest"), 30) == [(d("old"), 50)]
    assert index.add(d("huge"), 101) == [(d("huge"), 101)]
    assert list(index) == [d("new"), d("newest")] and index.used == 70
    assert d("new") in index and index.size_of(d("new")) == 40


def loaded_cache(tmp_path: Any, capacity: int = 1000) -> HotCache:
    cache = HotCache(str(tmp_path / "cache"), capacity, InlinePool())
    cache.prepare()
    done(cache.load())
    assert cache.loaded
    return cache


def test_a_fill_with_the_wrong_digest_is_never_put_in_place(tmp_path: Any) -> None:
    cache = loaded_cache(tmp_path)
    right = digest_of(b"right")
    fill = cache.begin_fill(right, 5)
    assert fill is not None and cache.reserved == 5
    assert cache.begin_fill(right, 5) is None             # one fill per digest at a time
    fill.write(b"wrong")
    fill.complete()
    done(cache.settle())
    assert not os.path.exists(cache.path(right)) and os.listdir(os.path.join(cache.directory, FILLS)) == []
    assert right not in cache and cache.reserved == 0 and cache.stats.rejected == 1

    short = cache.begin_fill(right, 5)
    assert short is not None
    short.write(b"rig")
    short.complete()                                     # fewer bytes than the bucket announced
    too_long = cache.begin_fill(right, 5)
    assert too_long is not None
    too_long.write(b"right!")                            # more: dropped at once
    assert too_long.ended
    too_long.complete()
    done(cache.settle())
    assert not os.path.exists(cache.path(right)) and cache.stats.rejected == 2 and cache.reserved == 0

    good = cache.begin_fill(right, 5)
    assert good is not None
    good.write(b"rig")
    good.write(b"ht")
    good.complete()
    done(cache.settle())
    with open(cache.path(right), "rb") as f:
        assert f.read() == b"right"
    assert right in cache and cache.used == 5 and cache.stats.fills == 1
    assert cache.begin_fill(right, 5) is None             # already cached
    assert os.listdir(os.path.join(cache.directory, FILLS)) == []


def test_fills_refused_and_cancelled(tmp_path: Any) -> None:
    cache = HotCache(str(tmp_path / "cache"), 1000, InlinePool())
    cache.prepare()
    assert cache.begin_fill(d("a"), 10) is None          # not loaded yet
    done(cache.load())
    assert cache.begin_fill(d("a"), 251) is None         # above a quarter of the cache
    assert cache.begin_fill(d("a"), 0) is None
    blob = b"deleted while it streamed"
    fill = cache.begin_fill(digest_of(blob), len(blob))
    assert fill is not None
    fill.write(blob[:10])
    cache.discard(digest_of(blob))
    fill.write(blob[10:])
    fill.complete()
    done(cache.settle())
    assert not os.path.exists(cache.path(digest_of(blob))) and cache.reserved == 0 and len(cache) == 0
    left = cache.begin_fill(digest_of(blob), len(blob))
    assert left is not None
    left.write(blob)
    left.abandon()                                       # the client went away
    done(cache.settle())
    assert os.listdir(os.path.join(cache.directory, FILLS)) == [] and cache.reserved == 0


def test_start_up_scan_rebuilds_the_order_and_the_bound(tmp_path: Any) -> None:
    root = tmp_path / "cache"
    folder = root / BLOBS / "sha256"
    folder.mkdir(parents=True)
    (root / FILLS).mkdir()
    (root / FILLS / "leftover").write_bytes(b"x" * 10)
    blobs = {name: name.encode() * 40 for name in "abcd"}   # 40 bytes each
    for when, (name, data) in enumerate(blobs.items()):
        path = folder / digest_of(data).hex
        path.write_bytes(data)
        os.utime(path, (1000.0 + when, 1000.0 + when))
    (folder / "not-a-digest").write_bytes(b"ignored")
    cache = HotCache(str(root), 100, InlinePool(), max_blob=50)
    done(cache.load())
    done(cache.settle())
    # Newest first up to 100 bytes: d and c; a and b removed.
    assert cache.lru_order() == [digest_of(blobs["c"]), digest_of(blobs["d"])] and cache.used == 80
    assert sorted(os.listdir(folder)) == sorted([digest_of(blobs["c"]).hex, digest_of(blobs["d"]).hex,
                                                 "not-a-digest"])
    assert os.listdir(root / FILLS) == []
    file = cache.open(digest_of(blobs["d"]), 40)
    assert file is not None and file.read() == blobs["d"]
    file.close()
    assert cache.open(digest_of(blobs["d"]), 41) is None   # the bucket says otherwise: dropped
    done(cache.settle())
    assert digest_of(blobs["d"]) not in cache and not (folder / digest_of(blobs["d"]).hex).exists()


def test_metrics_read_the_cache_counters(tmp_path: Any) -> None:
    cache = loaded_cache(tmp_path, capacity=4000)
    metrics = Metrics()
    metrics.watch_hot_cache(cache)
    fill = cache.begin_fill(digest_of(b"metered"), 7)
    assert fill is not None
    fill.write(b"metered")
    fill.complete()
    done(cache.settle())
    cache.record_hit(digest_of(b"metered"))
    cache.record_miss()
    text = metrics.render().decode()
    for line in ['registryd_s3_hot_cache_requests_total{result="hit"} 1.0',
                 'registryd_s3_hot_cache_requests_total{result="miss"} 1.0',
                 "registryd_s3_hot_cache_filled_bytes_total 7.0", "registryd_s3_hot_cache_bytes 7.0",
                 "registryd_s3_hot_cache_blobs 1.0", "registryd_s3_hot_cache_max_bytes 4000.0"]:
        assert line in text.splitlines()

