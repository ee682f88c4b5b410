"""Upload session data in a bucket: S3 parts and a tail, recorded in the session's state, so any node continues.

A body arrives into a local spool file (one per request body). Appending
it makes it durable in the bucket: S3 parts but the last must be at least
5 MiB, so the pending bytes are the previous tail plus the body; every full
``part_size`` of them goes up as a part of the multipart upload of
``<prefix>data-<name>``, and the rest (less than a part) as the new tail
object. The record (the multipart upload, its key, its parts, the tail) is
saved with the session's state last: that is what acknowledges the body.

The previous tail is fetched back into the spool for that: each spool file
starts with a sparse hole of ``part_size`` bytes, the body is written after
it and the tail lands just before it, so tail and body are one file region
and parts go up from the file as they are. This re-upload (less than one
part per body) is the only data that crosses twice; the blob itself is never
downloaded and uploaded again. Sealing uploads the rest as the last part
and completes the upload (placing it is a server-side copy); a session that
never filled a part is all in the spool when sealed (tail and final body)
and is put once, straight at its key, from there.

A race between two nodes inside the window of the session's check can
leave a record whose parts no longer match, which fails the seal
(CompleteMultipartUpload checks every part's ETag, and the digest is
checked) but never places a value that was not the one verified: every
multipart upload targets a key of its own (``data-<name>``, chosen when it
is created), so the object a seal completed can only be the one its own
part list made, whatever other nodes complete meanwhile. Tails, too, are
named anew each time, so a body that fails half-way, or a racing node,
never overwrites the tail a saved record names.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Awaitable, Callable

import attrs
from twisted.logger import Logger

from registryd.storage.driver import BodySpool, Check, Pool, Save, Sealed
from registryd.storage.files import write_fully
from registryd.storage.s3.bodies import FileRegion
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.documents import Part
from registryd.storage.s3.errors import S3Error, S3Unavailable
from registryd.storage.s3.settings import MAX_PART_SIZE, MIN_PART_SIZE
from registryd.storage.sink import Sink

log = Logger()


def data_key(prefix: str, name: str | None = None) -> str:
    """The key a multipart upload of the value targets (and the object it completes into).

    Each multipart upload gets a key of its own (``data-<name>``): an object
    completed there was written by that one upload and nothing else. Sessions
    from before had one shared ``data`` key (``name`` None).
    """
    return prefix + ("data" if name is None else f"data-{name}")


def tail_key(prefix: str, name: str) -> str:
    return prefix + f"tail-{name}"


def _name() -> str:
    return uuid.uuid4().hex


@attrs.frozen
class Tail:
    """The acknowledged bytes after the last full part (fewer than a part)."""

    key: str
    size: int


@attrs.frozen
class Record:
    """What a session's state says of its data (the JSON fields ``multipart``, ``data``, ``parts``, ``tail``)."""

    multipart: str | None = None
    parts: tuple[Part, ...] = ()
    tail: Tail | None = None
    data: str | None = None         # the key ``multipart`` targets (None: the legacy ``data``)

    def data_key(self, prefix: str) -> str:
        return self.data if self.data is not None else data_key(prefix)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts) + (0 if self.tail is None else self.tail.size)

    def to_json(self) -> dict[str, Any]:
        return {"multipart": self.multipart, "data": self.data,
                "parts": [{"number": p.number, "etag": p.etag, "size": p.size} for p in self.parts],
                "tail": None if self.tail is None else {"key": self.tail.key, "size": self.tail.size}}

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Record:
        """The record in a state's fields (none: an empty session's); ValueError for what is not one."""
        if not raw:
            return cls()
        try:
            parts = tuple(Part(int(p["number"]), str(p["etag"]), int(p["size"])) for p in raw["parts"])
            tail = raw["tail"]
            return cls(None if raw["multipart"] is None else str(raw["multipart"]), parts,
                       None if tail is None else Tail(str(tail["key"]), int(tail["size"])),
                       None if raw.get("data") is None else str(raw["data"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not an upload record: {e}") from None


class SpoolFile:
    """Spools one request body after a ``hole`` of one part (room for the tail)."""

    def __init__(self, path: str, fd: int, hole: int) -> None:
        self.path = path
        self.fd = fd
        self.hole = hole
        self._closed = False

    def write(self, data: bytes) -> None:
        write_fully(self.fd, data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    drop = close


@attrs.frozen
class SealedObject:
    """A sealed value: ``size`` bytes at ``key`` in the bucket, or of the spool at ``path`` from ``offset``."""

    size: int
    key: str | None = None
    region: FileRegion | None = None
    seen: bool = True
    path: str | None = None     # never a whole local file here


class FileSink(Sink):
    """Writes a download into an open file from ``offset`` (``pwrite``: one chunk, no buffering)."""

    def __init__(self, fd: int, offset: int) -> None:
        super().__init__()
        self._fd = fd
        self.offset = offset

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self.offset)
            self.offset += written
            view = view[written:]


class HashSink(Sink):
    """Hashes a download as it arrives (verification of an object nobody here saw whole)."""

    def __init__(self, hasher: Any) -> None:
        super().__init__()
        self.hasher = hasher

    def write(self, data: bytes) -> None:
        self.hasher.update(data)


def hash_region(path: str, offset: int, length: int, hasher: Any, block: int = 1024 * 1024) -> Any:
    """Feed ``length`` bytes of ``path`` from ``offset`` to ``hasher`` (blocking: run it in the pool)."""
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            data = f.read(min(block, length))
            if not data:
                raise ValueError(f"{path} ended {length} bytes early")
            hasher.update(data)
            length -= len(data)
    return hasher


class S3Appendable:
    """registryd.storage.driver.Appendable on a bucket shared by several nodes (see the module docstring)."""

    recorded = True

    def __init__(self, client: S3Client, spool_dir: str, part_size: int, pool: Pool) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE}, not {part_size}")
        self._client = client
        self._spool_dir = spool_dir
        self._part_size = part_size
        self._pool = pool

    async def measure(self, prefix: str, record: dict[str, Any], size: int) -> int:
        if Record.of(record).size != size:
            raise ValueError("upload state: parts and tail do not add up to its size")
        return size

    def size_now(self, prefix: str) -> int | None:
        return None   # the record in the bucket says, read with the state

    def spool(self, prefix: str, size: int) -> SpoolFile:
        path = os.path.join(self._spool_dir, f"{prefix.rstrip('/').rpartition('/')[2]}-{uuid.uuid4().hex}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            # Made on first need: a store opened only to read (an admin command) leaves no folder.
            os.makedirs(self._spool_dir, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            # A sparse hole: the file has its final layout (tail room, body) from the start.
            os.ftruncate(fd, self._part_size)
            os.lseek(fd, self._part_size, os.SEEK_SET)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return SpoolFile(path, fd, self._part_size)

    async def append(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                     save: Save, check: Check) -> None:
        """Parts and tail first, the record (the state) last."""
        assert isinstance(spool, SpoolFile)
        if not length:
            return
        old = Record.of(record)
        offset, pending = await self._pending(spool, old, length, check)
        multipart, key, parts, offset, pending = await self._store_parts(prefix, old, spool.path, offset,
                                                                         pending, final=False)
        tail = Tail(tail_key(prefix, _name()), pending) if pending else None
        if tail is not None:
            await self._client.put_object(tail.key, FileRegion(spool.path, offset, pending))
        await save(Record(multipart, tuple(parts), tail, key).to_json())
        if old.tail is not None:
            await self._delete_quietly(old.tail.key)

    async def seal(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                   check: Check) -> SealedObject:
        assert isinstance(spool, SpoolFile)
        old = Record.of(record)
        size = old.size + length
        if await self._completed_before(prefix, old, size):
            # An earlier try of this commit completed the upload, then the store failed:
            # the object is whole in the bucket; it is verified as it is.
            return SealedObject(size, key=old.data_key(prefix), seen=False)
        offset, pending = await self._pending(spool, old, length, check)
        multipart, key, parts, offset, pending = await self._store_parts(prefix, old, spool.path, offset,
                                                                         pending, final=True)
        await check()
        if multipart is None:
            # Never filled a part: the whole value is tail + body, here in the spool.
            return SealedObject(size, region=FileRegion(spool.path, offset, pending))
        assert key is not None
        await self._client.complete_multipart(key, multipart, parts)
        return SealedObject(size, key=key)

    async def hash(self, sealed: Sealed, hasher: Any) -> Any:
        assert isinstance(sealed, SealedObject)
        if sealed.region is not None:
            region = sealed.region
            return await self._pool.run(hash_region, region.path, region.offset, region.length, hasher)
        assert sealed.key is not None
        sink = HashSink(hasher)
        await self._client.get_object(sealed.key, sink)
        return sink.hasher

    async def place(self, sealed: Sealed, key: str) -> None:
        assert isinstance(sealed, SealedObject)
        if sealed.region is not None:
            await self._client.put_object(key, sealed.region)
        else:
            assert sealed.key is not None
            await self._client.copy_large(sealed.key, key, sealed.size)

    async def _completed_before(self, prefix: str, old: Record, size: int) -> bool:
        """Did a failed try of this seal already complete the multipart upload into its object?

        Then the upload is gone (no part can be added), and the object holds
        the value and this same final body, if it has their size.
        """
        if old.multipart is None:
            return False
        info = await self._client.head_object(old.data_key(prefix))
        return info is not None and info.size == size

    async def _pending(self, spool: SpoolFile, old: Record, length: int, check: Check) -> tuple[int, int]:
        """Fetch the tail into the hole before the body; the region (offset, length) of both."""
        if old.tail is None:
            return spool.hole, length
        offset = spool.hole - old.tail.size
        sink = FileSink(spool.fd, offset)
        try:
            await self._client.get_object(old.tail.key, sink)
        except S3Error as e:
            if e.code != "NoSuchKey":
                raise
            await check()  # another node replaced it
            raise
        if sink.offset != spool.hole:
            raise S3Unavailable(f"S3 GET {old.tail.key}: {sink.offset - offset} bytes, not {old.tail.size}")
        return offset, old.tail.size + length

    async def _store_parts(self, prefix: str, old: Record, path: str, offset: int, length: int,
                           final: bool) -> tuple[str | None, str | None, list[Part], int, int]:
        """Upload the full parts of the region; on ``final``, the rest too, as the last part.

        Without a multipart upload and less than a part, nothing is sent. Returns
        the multipart upload id and the key it targets, all parts, and the region
        left over.
        """
        multipart, parts = old.multipart, list(old.parts)
        if multipart is None and length < self._part_size:
            return None, None, parts, offset, length
        if multipart is None:
            # Made on first need, at a key of its own; one orphaned by a failure
            # here is aborted by reap_strays.
            key = data_key(prefix, _name())
            multipart = await self._client.create_multipart(key)
        else:
            key = old.data_key(prefix)
        while length >= self._part_size or (final and length > 0):
            size = min(self._part_size, length)
            number = len(parts) + 1
            etag = await self._client.upload_part(key, multipart, number, path, offset, size)
            parts.append(Part(number, etag, size))
            offset, length = offset + size, length - size
        return multipart, key, parts, offset, length

    async def remove(self, prefix: str, record: dict[str, Any] | None, last: str) -> None:
        """Abort the value's multipart uploads, delete its objects, ``last`` at the very end."""
        old = Record.of(record) if record else None
        if old is not None and old.multipart is not None:
            await self._client.abort_multipart(old.data_key(prefix), old.multipart)
        async for orphan in self._client.list_multipart_uploads(prefix):
            await self._client.abort_multipart(orphan.key, orphan.upload_id)
        keys = [entry.key async for entry in self._client.list_objects(prefix)]
        others = [key for key in keys if key != last]
        failures = await self._client.delete_objects(others) if others else []
        if failures:
            raise S3Error(500, failures[0].code, failures[0].message, failures[0].key, "DeleteObjects")
        await self._client.delete_object(last)

    async def reap_strays(self, prefix: str, cutoff: float, skip: set[str],
                          record_of: Callable[[str], Awaitable[dict[str, Any] | None]]) -> int:
        """Abort the multipart uploads begun before ``cutoff`` that no record names."""
        aborted = 0
        async for multipart in self._client.list_multipart_uploads(prefix):
            folder = multipart.key[len(prefix):].partition("/")[0]
            if folder in skip or (multipart.initiated or 0.0) >= cutoff:
                continue
            record = await record_of(folder) if folder else None
            if record and Record.of(record).multipart == multipart.upload_id:
                continue
            if await self._client.abort_multipart(multipart.key, multipart.upload_id):
                aborted += 1
        return aborted

    async def _delete_quietly(self, key: str) -> None:
        try:
            await self._client.delete_object(key)
        except (S3Error, S3Unavailable) as e:
            # It is under the session's prefix: the commit, cancel or reap removes it.
            log.warn("could not delete {key}: {error}", key=key, error=str(e))
