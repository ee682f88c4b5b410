"""The one blob store (registryd.storage.blobs) over the data directory's driver and memory.

What a blob costs follows what the driver offers, never its name: a local
file is sent with sendfile, anything else streamed; the hot cache serves
any driver without local files. (Over a bucket: tests/test_s3_store.py and
tests/test_s3_hot_cache.py.) Every driver call here completes at once
(an inline pool), so ``finish`` runs them without a reactor.
"""
from __future__ import annotations

import os
from typing import Any

import pytest

from registryd.digest import digest_of
from registryd.storage.blobs import Blobs
from registryd.storage.driver import Driver, finish
from registryd.storage.fs.driver import FsDriver
from registryd.storage.guard import BlobGuard
from registryd.storage.hot_cache import HotCache
from registryd.storage.layout import blob_key
from registryd.storage.memory import MemoryDriver
from registryd.threads import InlinePool
from s3_helpers import PausingSink


@pytest.fixture(params=["filesystem", "memory"])
def driver(request: Any, tmp_path: Any) -> Driver:
    if request.param == "filesystem":
        return FsDriver(str(tmp_path / "data"), InlinePool())
    return MemoryDriver()


def test_a_blob_goes_out_as_a_local_file_where_the_driver_has_one(driver: Driver) -> None:
    blobs = Blobs(driver, BlobGuard())
    data = os.urandom(100_000)
    digest = digest_of(data)
    assert finish(blobs.open(digest)) is None
    finish(blobs.put(digest, data))
    source = finish(blobs.open(digest))
    assert source is not None
    try:
        assert source.size == len(data) and source.redirect_url(60) is None
        file = source.local_file()
        if driver.name == "filesystem":
            assert file is not None and file.read() == data      # for sendfile
        else:
            assert file is None
            part = PausingSink()
            finish(source.send(part, 10, 50_000))
            assert part.data == data[10:50_000] and part.registrations == 1 and part.producer is None
            empty = PausingSink()
            finish(source.send(empty, 5, 5))
            assert empty.data == b"" and empty.registrations == 0
    finally:
        source.close()


def test_read_gives_at_most_the_limit(driver: Driver) -> None:
    blobs = Blobs(driver, BlobGuard())
    data = os.urandom(200_000)
    digest = digest_of(data)
    finish(blobs.put(digest, data))
    assert finish(blobs.read(digest, len(data))) == data
    assert finish(blobs.read(digest, 100)) == data[:100]       # the first bytes, as a file read gives
    assert finish(blobs.read(digest, 0)) == b""
    missing = digest_of(b"missing")
    assert finish(blobs.read(missing, 10)) is None and finish(blobs.read(missing, 0)) is None


def test_put_and_commit_claim_the_digest_and_a_commit_consumes_the_file(driver: Driver, tmp_path: Any) -> None:
    guard = BlobGuard()
    blobs = Blobs(driver, guard)
    manifest = b'{"schemaVersion": 2}'
    manifest_digest = digest_of(manifest)
    finish(blobs.put(manifest_digest, manifest))
    assert guard.last_claim(manifest_digest) is not None
    finish(blobs.put(manifest_digest, manifest))               # already there: fine
    layer = os.urandom(70_000)
    path = tmp_path / "verified-upload"
    path.write_bytes(layer)
    digest = digest_of(layer)
    assert guard.last_claim(digest) is None
    finish(blobs.commit_file(str(path), digest))
    assert guard.last_claim(digest) is not None and not path.exists()
    assert finish(blobs.size(digest)) == len(layer) and finish(blobs.read(digest, len(layer))) == layer
    assert finish(blobs.delete(digest)) is True and finish(blobs.delete(digest)) is False
    assert finish(blobs.size(digest)) is None


def test_the_hot_cache_serves_any_driver_without_local_files(tmp_path: Any) -> None:
    memory = MemoryDriver()
    cache = HotCache(str(tmp_path / "cache"), 1_000_000, InlinePool())
    cache.prepare()
    finish(cache.load())
    blobs = Blobs(memory, BlobGuard(), hot_cache=cache)
    data = os.urandom(100_000)
    digest = digest_of(data)
    finish(blobs.put(digest, data))
    first = finish(blobs.open(digest))
    assert first is not None and first.local_file() is None
    whole = PausingSink()
    finish(first.send(whole, 0, len(data)))                    # a whole-blob GET that missed fills the cache
    finish(cache.settle())
    assert whole.data == data and digest in cache and (cache.stats.misses, cache.stats.fills) == (1, 1)
    second = finish(blobs.open(digest))
    assert second is not None
    file = second.local_file()
    assert file is not None and file.read() == data and cache.stats.hits == 1
    second.close()
    # The store stays the truth: a blob gone from it is gone here too, its cached copy dropped.
    assert finish(memory.delete(blob_key(digest)))
    assert finish(blobs.open(digest)) is None
    finish(cache.settle())
    assert digest not in cache and not os.path.exists(cache.path(digest))
    # Clients fetching from the store itself (redirects) never pass through a cache.
    assert Blobs(memory, BlobGuard(), redirect=True, hot_cache=cache).hot_cache is None
