"""containerd's content as keys and bytes (``Store.objects``): ``blobs/<alg>/<2 hex>/<hex>``, read-only.

Maintenance that reads a store's layout (``registryd fsck`` re-hashing every
blob, the usage survey) sees containerd's content here, read through the
content service. Nothing else of registryd's layout exists on this driver
(repositories are containerd's images), and every change is refused
(read-only file system): containerd collects its own garbage from its
images, leases and ``gc.ref`` labels, so registryd's own collection and the
mirror cache's eviction never run on it (``registryd.upkeep.scheduler``,
``registryd gc``).
"""
from __future__ import annotations

import builtins
import errno
from typing import Any, AsyncIterator, Callable, Sequence

from twisted.internet.interfaces import IConsumer

from registryd.digest import HEX_LENGTHS, Digest
from registryd.storage import layout
from registryd.storage.containerd.client import ContainerdClient, NotFound
from registryd.storage.containerd.names import digest_or_none
from registryd.storage.driver import Appendable, Driver, Entry, Pool, too_large
from registryd.storage.paced import send_paced

#: Bytes read from the content service at once by ``stream``.
STREAM_CHUNK = 4 * 1024 * 1024


def _refused(key: str) -> OSError:
    return OSError(errno.EROFS, "containerd's store is changed only through its content and images services",
                   key)


def _digest_of_key(key: str) -> Digest | None:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] + "/" != layout.BLOBS or parts[1] not in HEX_LENGTHS:
        return None
    digest = digest_or_none(f"{parts[1]}:{parts[3]}")
    return digest if digest is not None and parts[2] == digest.hex[:2] else None


def _entry(info: Any) -> Entry | None:
    digest = digest_or_none(info.digest)
    if digest is None:
        return None
    return Entry(layout.blob_key(digest), info.size, float(info.created_at.seconds), info.digest)


class ContainerdObjects:
    """A read-only Driver over containerd's content (see the module docstring)."""

    name = "containerd"

    def __init__(self, client: ContainerdClient, location: str) -> None:
        self._client = client
        self._location = location

    @property
    def location(self) -> str:
        return self._location

    async def list(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[Entry]:
        if not (prefix.startswith(layout.BLOBS) or layout.BLOBS.startswith(prefix)):
            return
        entries = sorted((e for e in map(_entry, await self._client.list_content()) if e is not None),
                         key=lambda e: e.key)
        rolled: set[str] = set()
        for entry in entries:
            if not entry.key.startswith(prefix):
                continue
            rest = entry.key[len(prefix):]
            if delimiter is not None and delimiter in rest:
                common = prefix + rest[:rest.index(delimiter) + 1]
                if common not in rolled:
                    rolled.add(common)
                    yield Entry(common, is_prefix=True)
                continue
            yield entry

    async def stat(self, key: str) -> Entry | None:
        digest = _digest_of_key(key)
        info = await self._client.info(str(digest)) if digest is not None else None
        return _entry(info) if info is not None else None

    async def read(self, key: str, limit: int) -> bytes | None:
        entry = await self.stat(key)
        if entry is None:
            return None
        if entry.size > limit:
            raise too_large(key, limit)
        try:
            return await self._client.read(entry.version, 0, entry.size) if entry.size else b""
        except NotFound:
            return None

    async def stream(self, key: str, write: Callable[[bytes], None]) -> Entry | None:
        entry = await self.stat(key)
        if entry is None:
            return None
        position = 0
        try:
            while position < entry.size:
                data = await self._client.read(entry.version, position, min(STREAM_CHUNK, entry.size - position))
                if not data:
                    raise OSError(errno.EIO, f"containerd's content ended at {position} of {entry.size} bytes", key)
                write(data)
                position += len(data)
        except NotFound:
            return None
        return entry

    async def write(self, key: str, data: bytes, if_absent: bool = False, durable: bool = True) -> bool:
        raise _refused(key)

    async def touch(self, key: str, when: float) -> None:
        raise _refused(key)

    async def copy(self, src: str, dst: str) -> bool:
        raise _refused(dst)

    async def move(self, src: str, dst: str, expect: Entry | None = None,
                   unless: Callable[[], bool] | None = None, durable: bool = True) -> bool:
        raise _refused(src)

    async def delete(self, key: str) -> bool:
        raise _refused(key)

    async def delete_many(self, keys: Sequence[str], durable: bool = True) -> builtins.list[str]:
        raise _refused(keys[0] if keys else layout.BLOBS)

    async def tidy(self, prefix: str) -> int:
        return 0

    def local_path(self, key: str) -> str | None:
        return None

    def presign(self, key: str, expires: int) -> str | None:
        return None

    def threaded(self) -> tuple[Driver, Pool] | None:
        return None

    # -- what blobs need: reads only (registryd.storage.containerd.blobs serves the API) ----------

    async def send(self, key: str, consumer: IConsumer, start: int, end: int) -> bool:
        entry = await self.stat(key)
        if entry is None:
            return False
        version = entry.version

        async def chunks() -> AsyncIterator[bytes]:
            position = start
            while position < end:
                data = await self._client.read(version, position, min(STREAM_CHUNK, end - position))
                if not data:
                    raise OSError(errno.EIO, f"containerd's content ended at {position} of {end} bytes", key)
                position += len(data)
                yield data

        try:
            await send_paced(consumer, chunks())
        except NotFound:
            return False
        return True

    async def put_file(self, key: str, path: str) -> None:
        raise _refused(key)

    def appendable(self, spool_dir: str, pool: Pool) -> Appendable:
        raise _refused(layout.UPLOADS)


#: mypy proves here that it is a registryd.storage.driver.Driver.
_IS_A_DRIVER: type[Driver] = ContainerdObjects
