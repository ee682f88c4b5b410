"""An S3 bucket (one S3Client, its prefix) as a registryd.storage.driver.Driver.

Keys are the client's (the configured prefix is its business). Times are
LastModified, to the second; ``version`` is the ETag. A move is a
server-side copy (multipart above the copy threshold), a HEAD of the source
when ``expect`` is given, then a delete of the source: a reader may find
the value in both places for a moment, never in neither. A local file goes
up straight from disk (``put_file``: one PUT up to the part size, multipart
above it), and ``send`` streams one ranged GET: bytes never pass through
memory whole.
"""
from __future__ import annotations

import builtins
import math
import os
from typing import AsyncIterator, Callable, Sequence

from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger

from registryd.deferreds import bounded_gather
from registryd.storage.driver import Entry, Pool, check_key
from registryd.storage.sink import Sink
from registryd.storage.s3.client import MAX_PARTS, S3Client
from registryd.storage.s3.documents import ObjectEntry, Part
from registryd.storage.s3.appendable import S3Appendable
from registryd.storage.s3.errors import S3Error, S3Unavailable
from registryd.storage.s3.settings import MAX_PART_SIZE

log = Logger()

#: Parts of one multipart upload in flight at once: S3 rewards parallel
#: connections, and each part streams from disk, so memory stays flat.
PART_CONCURRENCY = 4
#: Conditional PUTs of one key that conflict with another under way, before giving up.
CONFLICT_ATTEMPTS = 3


class _Feed(Sink):
    """A GET's body, chunk by chunk, to a ``write`` callable."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        super().__init__()
        self._write = write

    def write(self, data: bytes) -> None:
        self._write(data)


def entry_of(entry: ObjectEntry) -> Entry:
    return Entry(entry.key, entry.size, entry.last_modified, entry.etag, entry.is_prefix)


class S3Driver:
    """The Driver on the bucket and prefix ``client`` works on."""

    name = "s3"

    def __init__(self, client: S3Client) -> None:
        self.client = client

    @property
    def location(self) -> str:
        settings = self.client.settings
        return f"s3://{settings.bucket}/{settings.prefix}"

    async def list(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[Entry]:
        if delimiter is None:
            async for found in self.client.list_objects(prefix):
                yield entry_of(found)
            return
        # A page lists its keys, then its common prefixes: sorted here (such listings are short).
        rolled = [entry_of(found) async for found in self.client.list_objects(prefix, delimiter)]
        for entry in sorted(rolled, key=lambda e: e.key):
            yield entry

    async def stat(self, key: str) -> Entry | None:
        info = await self.client.head_object(key)
        return None if info is None else Entry(key, info.size, info.last_modified, info.etag)

    async def read(self, key: str, limit: int) -> bytes | None:
        # ObjectTooLarge is a registryd.storage.driver.TooLarge.
        return await self.client.get_small(key, limit)

    async def stream(self, key: str, write: Callable[[bytes], None]) -> Entry | None:
        try:
            info = await self.client.get_object(key, _Feed(write))
        except S3Error as e:
            if e.status != 404:
                raise
            return None
        return Entry(key, info.size, info.last_modified, info.etag)

    async def write(self, key: str, data: bytes, if_absent: bool = False, durable: bool = True) -> bool:
        # A completed PUT is durable whatever ``durable`` says.
        check_key(key)
        if if_absent:
            return await self._put_if_absent(key, data)
        await self.client.put_object(key, data)
        return True

    async def touch(self, key: str, when: float) -> None:
        """PUT the empty marker: its LastModified (the bucket's clock, to the second) is now, not ``when``."""
        check_key(key)
        await self.client.put_object(key, b"")

    async def copy(self, src: str, dst: str) -> bool:
        info = await self.client.head_object(src)
        if info is None:
            return False
        return await self._copy(src, dst, info.size)

    async def _copy(self, src: str, dst: str, size: int) -> bool:
        check_key(dst)
        try:
            await self.client.copy_large(src, dst, size)
        except S3Error as e:
            if e.status != 404:
                raise
            return False
        return True

    async def move(self, src: str, dst: str, expect: Entry | None = None,
                   unless: Callable[[], bool] | None = None, durable: bool = True) -> bool:
        if expect is None:
            info = await self.client.head_object(src)
            if info is None:
                return False
            size = info.size
        else:
            size = expect.size
        try:
            if not await self._copy(src, dst, size):
                return False
            if expect is not None:
                now = await self.client.head_object(src)
                # A HEAD's Last-Modified is to the second; the listing's may be finer.
                if now is None or now.last_modified is None or expect.modified is None \
                        or now.last_modified >= math.floor(expect.modified) + 1:
                    await self.client.delete_object(dst)
                    return False
            if unless is not None and unless():
                await self.client.delete_object(dst)
                return False
        except BaseException:
            # Cancelled or failed: the source is still in place, so a copy would only be clutter.
            await self._drop(dst)
            raise
        await self.client.delete_object(src)
        return True

    async def _drop(self, key: str) -> None:
        """Best effort: a copy left behind is found by whoever lists its folder (a later collection)."""
        try:
            await self.client.delete_object(key)
        except (S3Error, S3Unavailable):
            pass

    async def delete(self, key: str) -> bool:
        if await self.client.head_object(key) is None:
            return False
        await self.client.delete_object(key)
        return True

    async def delete_many(self, keys: Sequence[str], durable: bool = True) -> builtins.list[str]:
        if not keys:
            return []
        return [failure.key for failure in await self.client.delete_objects(keys)]

    async def tidy(self, prefix: str) -> int:
        return 0  # no folders here

    def local_path(self, key: str) -> str | None:
        return None

    def presign(self, key: str, expires: int) -> str | None:
        return self.client.presign_get(key, expires)

    def threaded(self) -> tuple[S3Driver, Pool] | None:
        return None

    # -- what blobs need (registryd.storage.blobs) ------------------------------

    async def send(self, key: str, consumer: IConsumer, start: int, end: int) -> bool:
        try:
            await self.client.get_object(key, consumer, (start, end - 1))
        except S3Error as e:
            if e.code != "NoSuchKey":
                raise
            return False
        return True

    async def put_file(self, key: str, path: str) -> None:
        """A HEAD first: a value of the same size is the same content, and nothing goes up.
        The file stays in place if the upload fails (a multipart one is aborted)."""
        check_key(key)
        size = os.stat(path).st_size
        existing = await self.client.head_object(key)
        if existing is None or existing.size != size:
            part_size = _part_size(self.client.settings.part_size, size)
            if size <= part_size:
                await self._put_if_absent(key, path)
            else:
                await self._multipart(key, path, size, part_size)
        os.unlink(path)

    async def _put_if_absent(self, key: str, body: bytes | str) -> bool:
        """A conditional PUT: False if ``key`` exists. AWS refuses one while another conditional
        PUT of the key is under way (two mirror fills of one digest commit at once): the next
        attempt sees how that one ended."""
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                await self.client.put_object(key, body, if_none_match=True)
                return True
            except S3Error as e:
                if e.code == "PreconditionFailed":
                    return False
                if e.code != "ConditionalRequestConflict" or attempt == CONFLICT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _multipart(self, key: str, path: str, size: int, part_size: int) -> None:
        upload_id = await self.client.create_multipart(key)
        try:
            parts = await self._send_parts(key, upload_id, path, size, part_size)
            await self.client.complete_multipart(key, upload_id, parts)
        except BaseException:
            await self._abort(key, upload_id)
            raise

    async def _send_parts(self, key: str, upload_id: str, path: str, size: int, part_size: int) -> builtins.list[Part]:
        """Every part, PART_CONCURRENCY at a time; on a failure, the first one raised
        once every part in flight has ended (so an abort comes after the last of them)."""

        async def send(part: tuple[int, int]) -> Part:
            number, offset = part
            length = min(part_size, size - offset)
            return Part(number, await self.client.upload_part(key, upload_id, number, path, offset, length), length)

        return await bounded_gather(enumerate(range(0, size, part_size), start=1), send, PART_CONCURRENCY)

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.client.abort_multipart(key, upload_id)
        except (S3Error, S3Unavailable) as e:
            log.warn("could not abort the multipart upload of {key} ({error}); "
                     "it stays until uploads are reaped", key=key, error=str(e))

    # -- appendable values: upload sessions ----------------------------------------

    def appendable(self, spool_dir: str, pool: Pool) -> S3Appendable:
        """Bodies spooled in ``spool_dir``, then parts and a tail recorded in the session's state."""
        return S3Appendable(self.client, spool_dir, self.client.settings.part_size, pool)

def _part_size(configured: int, size: int) -> int:
    """The configured part size, raised if ``size`` would otherwise need more than 10000 parts."""
    return min(max(configured, -(-size // MAX_PARTS)), MAX_PART_SIZE)
