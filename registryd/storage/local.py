"""The filesystem implementation of the storage interface (registryd.storage.interface).

Thin async faces over the blocking BlobStore and RepositoryStore, which the
admin commands also use directly. What costs a stat or a small read runs at
once on the reactor; what fsyncs, walks or writes runs in the IO pool.
"""
from __future__ import annotations

import os
from typing import Any, BinaryIO

from twisted.internet.interfaces import IConsumer

from registryd.digest import Digest
from registryd.storage.blobs import BlobStore
from registryd.storage.files import read_small
from registryd.storage.guard import BlobGuard
from registryd.storage.repositories import RepositoryStore
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


class FileRepositories:
    """RepositoryBackend on ``DATA_DIR/repositories`` or one upstream's ``DATA_DIR/mirror/<ns>``.

    ``durable_links`` False is for the mirror cache: a link lost in a crash
    is made again by the next pull, so it is not worth an fsync per layer.
    """

    def __init__(self, files: RepositoryStore, pool: BlockingPool | InlinePool, durable_links: bool = True) -> None:
        self.files = files
        self._pool = pool
        self._durable_links = durable_links

    async def exists(self, name: str) -> bool:
        return self.files.exists(name)

    async def has_blob(self, name: str, digest: Digest) -> bool:
        return self.files.has_blob(name, digest)

    async def link_blob(self, name: str, digest: Digest) -> None:
        if not self.files.has_blob(name, digest):
            await self._pool.run(self.files.link_blob, name, digest, self._durable_links)

    async def unlink_blob(self, name: str, digest: Digest) -> bool:
        return await self._pool.run(self.files.unlink_blob, name, digest)

    async def manifest_media_type(self, name: str, digest: Digest) -> str | None:
        return self.files.manifest_media_type(name, digest)

    async def add_manifest(self, name: str, digest: Digest, media_type: str, tags: list[str],
                           referrer: tuple[Digest, dict[str, Any]] | None) -> None:
        await self._pool.run(self.files.add_manifest, name, digest, media_type, tags, referrer)

    async def set_tags(self, name: str, digest: Digest, tags: list[str]) -> None:
        await self._pool.run(self.files.set_tags, name, digest, tags)

    async def delete_manifest(self, name: str, digest: Digest, subject: Digest | None) -> bool:
        return await self._pool.run(self.files.delete_manifest, name, digest, subject)

    async def resolve_tag(self, name: str, tag: str) -> Digest | None:
        return self.files.resolve_tag(name, tag)

    async def tag_mtime(self, name: str, tag: str) -> float | None:
        try:
            return self.files.tag_mtime(name, tag)
        except OSError:
            return None

    async def touch_tag(self, name: str, tag: str, digest: Digest) -> None:
        self.files.touch_tag(name, tag)

    async def delete_tag(self, name: str, tag: str) -> bool:
        return await self._pool.run(self.files.delete_tag, name, tag)

    async def tags(self, name: str) -> list[str] | None:
        return self.files.tags(name)

    async def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        return await self._pool.run(self.files.referrers, name, subject)

    async def record_pull(self, name: str, digest: Digest, when: float) -> None:
        await self._pool.run(self.files.record_pull, name, digest, when)

    async def revisions(self, name: str) -> dict[Digest, float]:
        return await self._pool.run(self.files.revisions, name)

    async def pulls(self, name: str) -> dict[Digest, float]:
        return await self._pool.run(self.files.pulls, name)

    async def catalog(self) -> list[str]:
        return await self._pool.run(self.files.catalog)
