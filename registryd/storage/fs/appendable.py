"""Upload session data in the data directory: one file, ``<prefix>data``, that bodies are appended to.

A body is written straight into the file (after a truncation to the
acknowledged size, which drops what a body cut off left behind) and is
acknowledged once the file is fsynced, so the file's size is the session's,
also after a restart or a crash (a tail cut off just before a crash can
only be the client's own bytes in order, and the digest is checked at the
end in any case). The commit renames the file into ``blobs/``: the sealed
value is the file itself. Nothing is recorded: the state is written once.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from typing import Any, Awaitable, Callable

import attrs

from registryd.storage.driver import BodySpool, Check, Pool, Save, Sealed, SessionMoved
from registryd.storage.files import write_fully

DATA = "data"
_HASH_BLOCK = 1024 * 1024


class FileSpool:
    """A body written into the session's data file from its acknowledged end."""

    def __init__(self, fd: int, start: int) -> None:
        self.fd = fd
        self._start = start
        self._closed = False

    def write(self, data: bytes) -> None:
        write_fully(self.fd, data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def drop(self) -> None:
        if not self._closed:
            try:
                os.ftruncate(self.fd, self._start)
            except OSError:
                pass  # the next body truncates again
        self.close()


@attrs.frozen
class SealedFile:
    path: str | None
    seen: bool = True


class FileAppendable:
    """registryd.storage.driver.Appendable on a data directory (see the module docstring)."""

    recorded = False

    def __init__(self, path: Callable[[str], str], pool: Pool) -> None:
        self._path = path     # a key's file (registryd.storage.fs.driver.FsDriver.path)
        self._pool = pool

    def _data(self, prefix: str) -> str:
        return self._path(prefix + DATA)

    async def measure(self, prefix: str, record: dict[str, Any], size: int) -> int:
        try:
            return os.stat(self._data(prefix)).st_size
        except FileNotFoundError:
            return 0

    def spool(self, prefix: str, size: int) -> FileSpool:
        path = self._data(prefix)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)   # the state is usually there first
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # Worker processes share the data directory: one body at a time per session, and the
            # kernel drops the lock of a process that dies mid-body.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            on_disk = os.fstat(fd).st_size
            if on_disk > size:
                raise SessionMoved(on_disk)   # another process acknowledged a body since
            # Drop whatever a cut-off body left behind the acknowledged end.
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)
        except BlockingIOError:
            os.close(fd)
            raise SessionMoved(None) from None
        except BaseException:
            os.close(fd)
            raise
        return FileSpool(fd, size)

    def size_now(self, prefix: str) -> int | None:
        try:
            return os.stat(self._data(prefix)).st_size
        except FileNotFoundError:
            return 0   # nothing written yet (or the session is gone: then its state is too)

    async def append(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                     save: Save, check: Check) -> None:
        assert isinstance(spool, FileSpool)
        await self._pool.run(os.fsync, spool.fd)

    async def seal(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                   check: Check) -> SealedFile:
        return SealedFile(self._data(prefix))   # BlobBackend.commit_file fsyncs it

    async def hash(self, sealed: Sealed, hasher: Any) -> Any:
        assert sealed.path is not None
        return await self._pool.run(_hash_file, sealed.path, hasher)

    async def place(self, sealed: Sealed, key: str) -> None:
        raise NotImplementedError("a sealed file is committed by BlobBackend.commit_file")

    async def remove(self, prefix: str, record: dict[str, Any] | None, last: str) -> None:
        await self._pool.run(shutil.rmtree, self._path(prefix.rstrip("/")), True)

    async def reap_strays(self, prefix: str, cutoff: float, skip: set[str],
                          record_of: Callable[[str], Awaitable[dict[str, Any] | None]]) -> int:
        return 0   # a session is its folder


def _hash_file(path: str, hasher: Any) -> Any:
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher
