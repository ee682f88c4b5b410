"""The filesystem implementation of the storage interface (registryd.storage.interface).

A thin async face over the blocking BlobStore (repositories are
registryd.storage.repositories, over the driver). What costs a stat or a
small read runs at once on the reactor; what fsyncs or writes runs in the
IO pool.
"""
from __future__ import annotations

import os
from typing import BinaryIO

from twisted.internet.interfaces import IConsumer

from registryd.digest import Digest
from registryd.storage.blobs import BlobStore
from registryd.storage.files import read_small
from registryd.storage.guard import BlobGuard
from registryd.threads import BlockingPool, InlinePool


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


class FileBlobs:
    """BlobBackend on ``DATA_DIR/blobs``."""

    def __init__(self, files: BlobStore, pool: BlockingPool | InlinePool) -> None:
        self.files = files
        self.guard: BlobGuard = files.guard
        self._pool = pool

    async def size(self, digest: Digest) -> int | None:
        return self.files.size(digest)

    async def open(self, digest: Digest) -> FileBlobSource | None:
        file = self.files.open(digest)
        return FileBlobSource(file) if file is not None else None

    async def read(self, digest: Digest, limit: int) -> bytes | None:
        return read_small(self.files.path(digest), limit)

    async def put(self, digest: Digest, data: bytes) -> None:
        await self._pool.run(self.files.put, digest, data)

    async def commit_file(self, path: str, digest: Digest) -> None:
        await self._pool.run(self.files.commit_file, path, digest)

    async def delete(self, digest: Digest) -> bool:
        return await self._pool.run(self.files.remove, digest)
