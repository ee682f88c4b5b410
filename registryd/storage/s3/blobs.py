"""Blobs in an S3-compatible store: the BlobBackend several registryd nodes share.

A blob is one object at ``blobs/<alg>/<2 hex>/<hex>``. S3 makes an object
visible only once its PUT (or CompleteMultipartUpload) succeeded, and whole,
which is the interface's first rule; content-addressing makes every write of
a key carry the same bytes, so a write that finds the key taken has
succeeded too.

Bytes never pass through memory whole: a local file goes up straight from
disk (one PUT up to the part size, multipart above it), and a blob goes out
streamed into the consumer with its backpressure, or as a presigned URL the
client fetches itself.

With a hot cache (``[storage] cache_size``, registryd.storage.s3.hot_cache),
a streamed blob the node has cached goes out as a local file instead, once
the bucket confirmed it still holds it; a whole-blob GET that missed fills
the cache on its way to the client.
"""
from __future__ import annotations

import os
from typing import Any, BinaryIO

from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from zope.interface import implementer

from registryd.deferreds import bounded_gather
from registryd.digest import Digest
from registryd.storage.guard import BlobGuard
from registryd.storage.local import FileBlobSource
from registryd.storage.sink import Sink
from registryd.storage.s3.client import MAX_PARTS, S3Client
from registryd.storage.s3.documents import Part
from registryd.storage.s3.errors import ObjectTooLarge, S3Error, S3Unavailable
from registryd.storage.s3.hot_cache import CacheFill, HotCache
from registryd.storage.layout import blob_key
from registryd.storage.s3.settings import MAX_PART_SIZE

log = Logger()

#: Parts of one multipart upload in flight at once: S3 rewards parallel
#: connections, and each part streams from disk, so memory stays flat.
PART_CONCURRENCY = 4
#: Conditional PUTs of one key that conflict with another under way, before giving up.
CONFLICT_ATTEMPTS = 3


class S3BlobSource:
    """A stored blob, sent from the store with a ranged GET, or handed out as a presigned URL.

    Holds nothing between calls: each ``send`` is its own request. With a
    hot cache, a send of the whole blob also fills the cache (if it takes it).
    """

    def __init__(self, client: S3Client, key: str, size: int, presign: bool,
                 cache: HotCache | None = None, digest: Digest | None = None) -> None:
        self._client = client
        self._key = key
        self._presign = presign
        self._cache = cache
        self._digest = digest
        self.size = size

    def local_file(self) -> BinaryIO | None:
        return None

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        # An empty range needs no request (and S3 refuses a Range on an empty object).
        if end <= start:
            return
        fill = None
        if self._cache is not None and self._digest is not None:
            self._cache.record_miss()
            if start == 0 and end == self.size:
                fill = self._cache.begin_fill(self._digest, self.size)
        try:
            await self._client.get_object(self._key, _Relay(consumer, fill), (start, end - 1))
        except BaseException:
            if fill is not None:
                fill.abandon()
            raise
        if fill is not None:
            fill.complete()

    def redirect_url(self, expires: int) -> str | None:
        if not self._presign:
            return None
        return self._client.presign_get(self._key, expires)

    def close(self) -> None:
        pass


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


class S3BlobStore:
    """BlobBackend on one bucket; ``presign`` lets the API redirect blob GETs to the store.

    ``hot_cache`` keeps hot blobs on the local disk (never used with ``presign``:
    clients then fetch from the store itself).
    """

    def __init__(self, client: S3Client, guard: BlobGuard, presign: bool = False,
                 part_concurrency: int = PART_CONCURRENCY, hot_cache: HotCache | None = None) -> None:
        self.guard = guard
        self.hot_cache = None if presign else hot_cache
        self._client = client
        self._presign = presign
        self._part_concurrency = max(1, part_concurrency)

    async def size(self, digest: Digest) -> int | None:
        info = await self._client.head_object(blob_key(digest))
        return info.size if info is not None else None

    async def open(self, digest: Digest) -> S3BlobSource | CachedBlobSource | None:
        """One HEAD of the bucket, which stays the truth; then the cached file if there is one."""
        key = blob_key(digest)
        info = await self._client.head_object(key)
        cache = self.hot_cache
        if info is None:
            if cache is not None:
                cache.discard(digest)   # removed (by gc on some node): not served from here either
            return None
        if cache is not None:
            file = cache.open(digest, info.size)
            if file is not None:
                return CachedBlobSource(file, info.size, digest, cache)
        return S3BlobSource(self._client, key, info.size, self._presign, cache, digest)

    async def read(self, digest: Digest, limit: int) -> bytes | None:
        """At most ``limit`` bytes: a larger blob gives its first ``limit``, as a file read would."""
        key = blob_key(digest)
        if limit < 1:
            return None if await self._client.head_object(key) is None else b""
        try:
            return await self._client.get_small(key, limit)
        except ObjectTooLarge:
            pass
        collected = _Collect()
        try:
            await self._client.get_object(key, collected, (0, limit - 1))
        except S3Error as e:
            if e.code == "NoSuchKey":  # deleted between the two requests
                return None
            raise
        return b"".join(collected.chunks)

    async def put(self, digest: Digest, data: bytes) -> None:
        self.guard.claim([digest])
        await self._put_once(blob_key(digest), data)

    async def commit_file(self, path: str, digest: Digest) -> None:
        """Upload the verified file at ``path``, then remove it (left in place on failure)."""
        self.guard.claim([digest])
        key = blob_key(digest)
        size = os.stat(path).st_size
        existing = await self._client.head_object(key)
        if existing is None or existing.size != size:
            part_size = _part_size(self._client.settings.part_size, size)
            if size <= part_size:
                await self._put_once(key, path)
            else:
                await self._multipart(key, path, size, part_size)
        os.unlink(path)

    async def delete(self, digest: Digest) -> bool:
        key = blob_key(digest)
        if await self._client.head_object(key) is None:
            self._forget(digest)
            return False
        await self._client.delete_object(key)
        # After the delete: a fill that began before it is cancelled too.
        self._forget(digest)
        return True

    def _forget(self, digest: Digest) -> None:
        if self.hot_cache is not None:
            self.hot_cache.discard(digest)

    async def _put_once(self, key: str, body: bytes | str) -> None:
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                await self._client.put_object(key, body, if_none_match=True)
                return
            except S3Error as e:
                # Already there: content-addressed, so the same bytes.
                if e.code == "PreconditionFailed":
                    return
                # AWS: another conditional PUT of this key is under way (two mirror
                # fills of one digest commit at once); the next attempt sees how it ended.
                if e.code != "ConditionalRequestConflict" or attempt == CONFLICT_ATTEMPTS - 1:
                    raise

    async def _multipart(self, key: str, path: str, size: int, part_size: int) -> None:
        upload_id = await self._client.create_multipart(key)
        try:
            parts = await self._send_parts(key, upload_id, path, size, part_size)
            await self._client.complete_multipart(key, upload_id, parts)
        except BaseException:
            await self._abort(key, upload_id)
            raise

    async def _send_parts(self, key: str, upload_id: str, path: str, size: int, part_size: int) -> list[Part]:
        """Every part, ``part_concurrency`` at a time; on a failure, the first one raised
        once every part in flight has ended (so an abort comes after the last of them)."""

        async def send(part: tuple[int, int]) -> Part:
            number, offset = part
            length = min(part_size, size - offset)
            return Part(number, await self._client.upload_part(key, upload_id, number, path, offset, length), length)

        return await bounded_gather(enumerate(range(0, size, part_size), start=1), send, self._part_concurrency)

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._client.abort_multipart(key, upload_id)
        except (S3Error, S3Unavailable) as e:
            log.warn("could not abort the multipart upload of {key} ({error}); "
                     "it stays until uploads are reaped", key=key, error=str(e))


def _part_size(configured: int, size: int) -> int:
    """The configured part size, raised if ``size`` would otherwise need more than 10000 parts."""
    return min(max(configured, -(-size // MAX_PARTS)), MAX_PART_SIZE)


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
    """Keeps what a bounded ranged GET delivers (at most ``read``'s limit)."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
