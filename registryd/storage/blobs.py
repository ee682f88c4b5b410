"""Immutable, content-addressed blobs shared by every repository, written once over any driver.

A blob is the value of ``blobs/<alg>/<first 2 hex>/<hex>``
(registryd.storage.layout.blob_key) — no extension, so nothing maps a name
to a Content-Encoding. A value is visible only once whole (the driver's
contract), and content-addressing makes every write of a key carry the same
bytes, so a write that finds the key taken has succeeded too.

What a blob costs depends only on what the driver offers:

- a local file (the data directory): a GET opens it and the API sends it
  with sendfile; a verified file is committed by a rename (``put_file``);
- otherwise a GET is streamed by ``Driver.send`` at the client's pace, or,
  with ``redirect``, answered with a presigned URL the client fetches from
  the store itself (``Driver.presign``); a file is committed by an upload;
- with a hot cache (registryd.storage.hot_cache, S3's ``[storage]
  cache_size``), a streamed blob the node has cached goes out as a local
  file instead, once the store confirmed it still holds it; a whole-blob
  GET that missed fills the cache on its way to the client.

``put`` and ``commit_file`` claim the digest in the BlobGuard first: an
in-server garbage collection must not take what is being written.
"""
from __future__ import annotations

import errno
import os
from typing import Any, BinaryIO

from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from registryd.digest import Digest
from registryd.storage.driver import Driver, TooLarge
from registryd.storage.guard import BlobGuard
from registryd.storage.hot_cache import CacheFill, HotCache
from registryd.storage.interface import BlobGone, BlobSource
from registryd.storage.layout import blob_key
from registryd.storage.sink import Sink


class FileBlobSource:
    """A stored blob as an open file: the API sends it with sendfile."""

    def __init__(self, file: BinaryIO, size: int | None = None) -> None:
        self._file = file
        self.size = os.fstat(file.fileno()).st_size if size is None else size

    def local_file(self) -> BinaryIO | None:
        return self._file

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        raise NotImplementedError("a local file is sent with registryd.web.sendfile")

    def redirect_url(self, expires: int) -> str | None:
        return None

    def close(self) -> None:
        self._file.close()


class CachedBlobSource(FileBlobSource):
    """A stored blob this node has in its hot cache: an open local file, sent with sendfile."""

    def __init__(self, file: BinaryIO, size: int, digest: Digest, cache: HotCache) -> None:
        super().__init__(file, size)
        self._digest = digest
        self._cache = cache
        self._counted = False

    def local_file(self) -> BinaryIO | None:
        # The API asks for the file only when it sends bytes (not for a HEAD):
        # that is a hit, and a use for the LRU order.
        if not self._counted:
            self._counted = True
            self._cache.record_hit(self._digest)
        return super().local_file()


class StreamedBlobSource:
    """A stored blob the driver streams (``Driver.send``), or hands out as a presigned URL.

    Holds nothing between calls: each ``send`` is its own transfer. With a
    hot cache, a send of the whole blob also fills the cache (if it takes it).
    """

    def __init__(self, driver: Driver, key: str, size: int, redirect: bool,
                 cache: HotCache | None, digest: Digest) -> None:
        self._driver = driver
        self._key = key
        self._redirect = redirect
        self._cache = cache
        self._digest = digest
        self.size = size

    def local_file(self) -> BinaryIO | None:
        return None

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        # An empty range needs no transfer (and S3 refuses a Range on an empty object).
        if end <= start:
            return
        fill = None
        if self._cache is not None:
            self._cache.record_miss()
            if start == 0 and end == self.size:
                fill = self._cache.begin_fill(self._digest, self.size)
        try:
            sent = await self._driver.send(self._key, _Relay(consumer, fill), start, end)
            if not sent:
                raise BlobGone(errno.ENOENT, "the blob was deleted before it was sent", self._key)
        except BaseException:
            if fill is not None:
                fill.abandon()
            raise
        if fill is not None:
            fill.complete()

    def redirect_url(self, expires: int) -> str | None:
        return self._driver.presign(self._key, expires) if self._redirect else None

    def close(self) -> None:
        pass


class Blobs:
    """The BlobBackend over ``driver`` (see the module docstring).

    ``redirect``: blob GETs may be answered with the driver's presigned URLs.
    ``hot_cache`` keeps hot blobs on the local disk (never with ``redirect``:
    clients then fetch from the store itself).
    """

    def __init__(self, driver: Driver, guard: BlobGuard, redirect: bool = False,
                 hot_cache: HotCache | None = None) -> None:
        self.guard = guard
        self.hot_cache = None if redirect else hot_cache
        self._driver = driver
        self._redirect = redirect

    async def size(self, digest: Digest) -> int | None:
        entry = await self._driver.stat(blob_key(digest))
        return entry.size if entry is not None else None

    async def open(self, digest: Digest) -> BlobSource | None:
        """The local file if the driver has one; else one stat of the store, which stays the
        truth, then the cached file if there is one, else a streamed source."""
        key = blob_key(digest)
        path = self._driver.local_path(key)
        if path is not None:
            try:
                return FileBlobSource(open(path, "rb"))
            except (FileNotFoundError, NotADirectoryError):
                return None
        entry = await self._driver.stat(key)
        cache = self.hot_cache
        if entry is None:
            if cache is not None:
                cache.discard(digest)   # removed (by gc on some node): not served from here either
            return None
        if cache is not None:
            file = cache.open(digest, entry.size)
            if file is not None:
                return CachedBlobSource(file, entry.size, digest, cache)
        return StreamedBlobSource(self._driver, key, entry.size, self._redirect, cache, digest)

    async def read(self, digest: Digest, limit: int) -> bytes | None:
        """At most ``limit`` bytes: a larger blob gives its first ``limit``, as a file read would."""
        key = blob_key(digest)
        if limit < 1:
            return None if await self._driver.stat(key) is None else b""
        try:
            return await self._driver.read(key, limit)
        except TooLarge:
            pass
        collected = _Collect()
        if not await self._driver.send(key, collected, 0, limit):
            return None   # deleted between the two
        return b"".join(collected.chunks)

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store small verified content such as a manifest (kept if already there)."""
        self.guard.claim([digest])
        await self._driver.write(blob_key(digest), data, if_absent=True)

    async def commit_file(self, path: str, digest: Digest) -> None:
        """Store the verified file at ``path`` as ``digest``, then it is gone (left in place on failure)."""
        self.guard.claim([digest])
        await self._driver.put_file(blob_key(digest), path)

    async def delete(self, digest: Digest) -> bool:
        removed = await self._driver.delete(blob_key(digest))
        if self.hot_cache is not None:
            # After the delete: a fill that began before it is cancelled too.
            self.hot_cache.discard(digest)
        return removed


@implementer(IConsumer)
class _Relay:
    """Passes a streamed blob to the client's consumer and, chunk by chunk, into a cache fill (if any).

    The client's consumer keeps the producer: its backpressure paces both.
    """

    def __init__(self, consumer: IConsumer, fill: CacheFill | None) -> None:
        self._consumer = consumer
        self._fill = fill

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        # A twisted.web Request whose client went away has dropped its channel,
        # and its unregisterProducer would raise; the producer ended with the
        # connection, so there is nothing left to unregister.
        if getattr(self._consumer, "channel", True) is None:
            return
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self._consumer.write(data)
        if self._fill is not None:
            self._fill.write(data)


class _Collect(Sink):
    """Keeps what a bounded transfer delivers (at most ``read``'s limit)."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
