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
"""
from __future__ import annotations

import os
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from zope.interface import implementer

from registryd.digest import Digest
from registryd.storage.guard import BlobGuard
from registryd.storage.s3.client import MAX_PARTS, S3Client
from registryd.storage.s3.documents import Part
from registryd.storage.s3.errors import ObjectTooLarge, S3Error, S3Unavailable
from registryd.storage.s3.layout import blob_key
from registryd.storage.s3.settings import MAX_PART_SIZE

log = Logger()

#: Parts of one multipart upload in flight at once: S3 rewards parallel
#: connections, and each part streams from disk, so memory stays flat.
PART_CONCURRENCY = 4


class S3BlobSource:
    """A stored blob, sent from the store with a ranged GET, or handed out as a presigned URL.

    Holds nothing between calls: each ``send`` is its own request.
    """

    def __init__(self, client: S3Client, key: str, size: int, presign: bool) -> None:
        self._client = client
        self._key = key
        self._presign = presign
        self.size = size

    def local_file(self) -> BinaryIO | None:
        return None

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        # An empty range needs no request (and S3 refuses a Range on an empty object).
        if end <= start:
            return
        await self._client.get_object(self._key, consumer, (start, end - 1))

    def redirect_url(self, expires: int) -> str | None:
        if not self._presign:
            return None
        return self._client.presign_get(self._key, expires)

    def close(self) -> None:
        pass


class S3BlobStore:
    """BlobBackend on one bucket; ``presign`` lets the API redirect blob GETs to the store."""

    def __init__(self, client: S3Client, guard: BlobGuard, presign: bool = False,
                 part_concurrency: int = PART_CONCURRENCY) -> None:
        self.guard = guard
        self._client = client
        self._presign = presign
        self._part_concurrency = max(1, part_concurrency)

    async def size(self, digest: Digest) -> int | None:
        info = await self._client.head_object(blob_key(digest))
        return info.size if info is not None else None

    async def open(self, digest: Digest) -> S3BlobSource | None:
        key = blob_key(digest)
        info = await self._client.head_object(key)
        if info is None:
            return None
        return S3BlobSource(self._client, key, info.size, self._presign)

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
            return False
        await self._client.delete_object(key)
        return True

    async def _put_once(self, key: str, body: bytes | str) -> None:
        try:
            await self._client.put_object(key, body, if_none_match=True)
        except S3Error as e:
            # Already there: content-addressed, so the same bytes.
            if e.code != "PreconditionFailed":
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
        pending = iter(enumerate(range(0, size, part_size), start=1))
        parts: list[Part] = []
        failed: list[BaseException] = []

        async def worker() -> None:
            for number, offset in pending:
                if failed:
                    return
                length = min(part_size, size - offset)
                try:
                    etag = await self._client.upload_part(key, upload_id, number, path, offset, length)
                except BaseException as e:
                    failed.append(e)
                    return
                parts.append(Part(number, etag, length))

        workers = [Deferred.fromCoroutine(worker()) for _ in range(self._part_concurrency)]
        await DeferredList(workers, consumeErrors=True)
        if failed:
            raise failed[0]
        return parts

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
class _Collect:
    """Keeps what a bounded ranged GET delivers (at most ``read``'s limit)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
