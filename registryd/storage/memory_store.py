"""A Store over any driver's plain keys (the MemoryDriver in tests): blobs and repositories in it,
upload sessions spooled in the local ``uploads/`` and written into it on commit.

For tests that run the whole API in seconds: no fsync, no bucket. Blobs
have none of the other stores' fast paths (sendfile, presigned redirects):
a GET reads the value and writes it to the client.
"""
from __future__ import annotations

import os
from typing import BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer

from registryd.digest import Digest
from registryd.storage import layout
from registryd.storage.driver import Driver
from registryd.storage.files import empty_dir, make_dirs
from registryd.storage.guard import BlobGuard
from registryd.storage.interface import HotCache, Store
from registryd.storage.repositories import Repositories
from registryd.storage.listing import blob_usage, list_blobs, mirror_folders
from registryd.storage.uploads import UploadStore
from registryd.threads import BlockingPool, InlinePool

#: A blob is read whole before it is sent: test content is small.
BLOB_LIMIT = 1 << 30


class BytesSource:
    """A blob read from the driver, sent from memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def local_file(self) -> BinaryIO | None:
        return None

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        consumer.write(self._data[start:end])

    def redirect_url(self, expires: int) -> str | None:
        return None

    def close(self) -> None:
        self._data = b""


class DriverBlobs:
    """BlobBackend over a driver's ``blobs/`` keys: size is a stat, open a read, put a write."""

    def __init__(self, driver: Driver, guard: BlobGuard, pool: BlockingPool | InlinePool) -> None:
        self._driver = driver
        self.guard = guard
        self._pool = pool

    async def size(self, digest: Digest) -> int | None:
        entry = await self._driver.stat(layout.blob_key(digest))
        return entry.size if entry is not None else None

    async def open(self, digest: Digest) -> BytesSource | None:
        data = await self._driver.read(layout.blob_key(digest), BLOB_LIMIT)
        return BytesSource(data) if data is not None else None

    async def read(self, digest: Digest, limit: int) -> bytes | None:
        data = await self._driver.read(layout.blob_key(digest), BLOB_LIMIT)
        return data[:limit] if data is not None else None

    async def put(self, digest: Digest, data: bytes) -> None:
        self.guard.claim([digest])
        await self._driver.write(layout.blob_key(digest), data, if_absent=True)

    async def commit_file(self, path: str, digest: Digest) -> None:
        def consume() -> bytes:
            with open(path, "rb") as f:
                data = f.read()
            os.unlink(path)
            return data
        await self.put(digest, await self._pool.run(consume))

    async def delete(self, digest: Digest) -> bool:
        return await self._driver.delete(layout.blob_key(digest))


class DriverStore:
    """A registryd.storage.interface.Store whose content lives in ``driver`` (see the module docstring)."""

    shared = False

    def __init__(self, root: str, pool: BlockingPool | InlinePool, driver: Driver) -> None:
        self.root = root
        self.pool = pool
        self.driver = driver.name
        self.tmp_dir = layout.local_path(root, layout.TMP)
        self.guard = BlobGuard()
        self.objects = driver
        self.hot_cache: HotCache | None = None
        self.blobs = DriverBlobs(driver, self.guard, pool)
        self.repositories = Repositories(driver, layout.repositories_root(None))
        self.uploads = UploadStore(layout.local_path(root, layout.UPLOADS), self.tmp_dir, self.blobs, pool)

    def mirror_repositories(self, namespace: str) -> Repositories:
        return Repositories(self.objects, layout.repositories_root(namespace), durable_links=False)

    def prepare(self) -> None:
        for sub in (layout.UPLOADS, layout.TMP):
            make_dirs(layout.local_path(self.root, sub))

    def recover(self, keep_tmp: bool = False) -> None:
        if not keep_tmp:
            empty_dir(self.tmp_dir)

    def check_store(self) -> None:
        """Nothing to check: memory takes every write."""

    async def check_backend(self) -> str | None:
        return None

    async def check_ready(self) -> str | None:
        return None

    def readiness_problem(self, min_free_bytes: int) -> str | None:
        return None

    def location(self) -> str:
        return self.objects.location

    async def mirror_folders(self) -> list[str]:
        return await mirror_folders(self.objects)

    async def blob_sizes(self) -> dict[Digest, int]:
        return {digest: entry.size for digest, entry in (await list_blobs(self.objects)).items()}

    async def blob_usage(self) -> tuple[int, int] | None:
        return await blob_usage(self.objects)

    def close(self) -> Deferred[None]:
        return succeed(None)


#: mypy proves here that a store over a driver's keys is a registryd.storage.interface.Store.
_IS_A_STORE: type[Store] = DriverStore
