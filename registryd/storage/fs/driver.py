"""A data directory as a registryd.storage.driver.Driver: a key is a path under the root.

Writes go through ``tmp/`` of the data directory: a temporary file, fsync,
rename into place, fsync of the directory (as registryd.storage.files
does), so a crash leaves the old value or the new one, and the start-up
clean-up of ``tmp/`` takes what was half-written. Moves are renames (the
data directory is one filesystem); deletes and moves remove the
directories they empty, below the top two levels and never a
repository's ``_``-folders.

Every call that touches the disk runs in the pool given, so the reactor
never waits on a walk or an fsync — except what costs no more than a stat:
``stat`` itself and the ``read`` of a tiny file (``INLINE_READ``), which
answer at once. Every write goes to the pool, the smallest too: creating a
file may wait on the journal. ``threaded()`` gives the twin whose calls
block, for a pass that runs whole in one worker thread: of the
``maintenance`` pool when one is given, so a long walk (a collection, a
survey) never holds the threads a request's fsync waits for.
"""
from __future__ import annotations

import builtins
import errno
import itertools
import os
import shutil
import stat
import uuid
from typing import AsyncIterator, BinaryIO, Callable, Iterator, Sequence

from twisted.internet.interfaces import IConsumer

from registryd.storage.driver import Entry, Pool, check_key, too_large
from registryd.storage.fs.appendable import FileAppendable
from registryd.storage.files import fsync_dir_if_there, make_dirs, remove_file, rename_into
from registryd.storage.paced import send_paced
from registryd.threads import InlinePool

#: Entries walked per trip to the pool: a listing's memory stays flat.
LIST_BATCH = 1000
#: What ``stream`` reads at once.
STREAM_CHUNK = 1024 * 1024
#: A value this small is read at once on the caller's thread (a tag, a revision: the cost of a
#: stat), so a manifest GET waits on no thread hop; a larger one is read in the pool.
INLINE_READ = 64 * 1024
def _version(info: os.stat_result) -> str:
    return f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}:{info.st_size}"


def _entry(key: str, info: os.stat_result) -> Entry:
    return Entry(key, info.st_size, info.st_mtime, _version(info))


class FsDriver:
    """The Driver on the data directory ``root`` (see the module docstring)."""

    name = "filesystem"

    def __init__(self, root: str, pool: Pool, tmp_dir: str | None = None, maintenance: Pool | None = None) -> None:
        self.root = root
        self.tmp_dir = tmp_dir or os.path.join(root, "tmp")
        self._pool = pool
        self._maintenance = maintenance or pool

    @property
    def location(self) -> str:
        return self.root

    def path(self, key: str) -> str:
        check_key(key)
        return os.path.join(self.root, key)   # checked: relative, and "/" is the separator here

    # -- reads ------------------------------------------------------------------

    async def list(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[Entry]:
        if delimiter not in (None, "/"):
            raise ValueError(f"the filesystem driver lists with the delimiter '/' only, not {delimiter!r}")
        walk = self._walk(prefix, delimiter is not None)
        while True:
            batch = await self._pool.run(lambda: builtins.list(itertools.islice(walk, LIST_BATCH)))
            for entry in batch:
                yield entry
            if len(batch) < LIST_BATCH:
                return

    def _walk(self, prefix: str, rolled_up: bool) -> Iterator[Entry]:
        """Blocking: the listing, in key order (a directory sorts as its name plus ``/``)."""
        folder, _, start = prefix.rpartition("/")
        if folder:
            check_key(folder)
        base = f"{folder}/" if folder else ""
        yield from self._walk_dir(os.path.join(self.root, *folder.split("/")) if folder else self.root,
                                  base, start, rolled_up)

    def _walk_dir(self, directory: str, base: str, start: str, rolled_up: bool) -> Iterator[Entry]:
        try:
            with os.scandir(directory) as it:
                found = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e)
                         for e in it if e.name.startswith(start)]
        except (FileNotFoundError, NotADirectoryError):
            return
        for name, entry in sorted(found, key=lambda item: item[0]):
            if name.endswith("/"):
                if rolled_up:
                    yield Entry(base + name, is_prefix=True)
                else:
                    yield from self._walk_dir(entry.path, base + name, "", False)
            elif entry.is_file(follow_symlinks=False):
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we looked
                yield _entry(base + name, info)

    async def stat(self, key: str) -> Entry | None:
        return self._stat(key)

    def _stat(self, key: str) -> Entry | None:
        try:
            info = os.stat(self.path(key), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _entry(key, info) if stat.S_ISREG(info.st_mode) else None

    async def read(self, key: str, limit: int) -> bytes | None:
        f: BinaryIO | None
        try:
            f = open(self.path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            size = os.fstat(f.fileno()).st_size
            if size <= INLINE_READ:
                return self._read_open(f, key, limit, size)
            opened, f = f, None
            return await self._pool.run(self._read_open, opened, key, limit, size)
        finally:
            if f is not None:
                f.close()

    @staticmethod
    def _read_open(f: BinaryIO, key: str, limit: int, size: int) -> bytes:
        """The value of the open ``f``, ``size`` bytes when opened (no buffer of ``limit`` bytes for a tag)."""
        with f:
            data = f.read(min(limit, size) + 1)
            if size < len(data) <= limit:   # written again since the fstat
                data += f.read(limit + 1 - len(data))
        if len(data) > limit:
            raise too_large(key, limit)
        return data

    async def stream(self, key: str, write: Callable[[bytes], None]) -> Entry | None:
        return await self._pool.run(self._stream, key, write)

    def _stream(self, key: str, write: Callable[[bytes], None]) -> Entry | None:
        try:
            f = open(self.path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        with f:
            info = os.fstat(f.fileno())
            while chunk := f.read(STREAM_CHUNK):
                write(chunk)
        return _entry(key, info)

    # -- writes -----------------------------------------------------------------

    async def write(self, key: str, data: bytes, if_absent: bool = False, durable: bool = True) -> bool:
        return await self._pool.run(self._write, key, data, if_absent, durable)

    def _temporary(self) -> str:
        make_dirs(self.tmp_dir)
        return os.path.join(self.tmp_dir, uuid.uuid4().hex)

    def _place(self, tmp: str, target: str, if_absent: bool, durable: bool = True) -> bool:
        """Blocking: the written ``tmp`` becomes ``target`` (``if_absent``: by a link, which fails if it exists)."""
        try:
            return rename_into(tmp, target, durable, exclusive=if_absent)
        finally:
            remove_file(tmp)

    def _write(self, key: str, data: bytes, if_absent: bool, durable: bool = True) -> bool:
        target = self.path(key)
        if if_absent and os.path.lexists(target):
            return False  # the common case, decided without a temporary file (the link still decides a race)
        tmp = self._temporary()
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            remove_file(tmp)  # a full disk must not leave empty files behind
            raise
        return self._place(tmp, target, if_absent, durable)

    async def touch(self, key: str, when: float) -> None:
        await self._pool.run(self._touch, key, when)

    def _touch(self, key: str, when: float) -> None:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.utime(fd, (when, when))
        finally:
            os.close(fd)

    async def copy(self, src: str, dst: str) -> bool:
        return await self._pool.run(self._copy, src, dst)

    def _copy(self, src: str, dst: str) -> bool:
        target = self.path(dst)
        tmp = self._temporary()
        try:
            try:
                shutil.copyfile(self.path(src), tmp, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return False
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            remove_file(tmp)
            raise
        return self._place(tmp, target, False)

    async def move(self, src: str, dst: str, expect: Entry | None = None,
                   unless: Callable[[], bool] | None = None, durable: bool = True) -> bool:
        return await self._pool.run(self._move, src, dst, expect, unless, durable)

    def _move(self, src: str, dst: str, expect: Entry | None, unless: Callable[[], bool] | None,
              durable: bool = True) -> bool:
        source, target = self.path(src), self.path(dst)
        try:
            before = os.stat(source, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not stat.S_ISREG(before.st_mode) or (expect is not None and expect.version
                                                 and _version(before) != expect.version):
            return False
        try:
            rename_into(source, target, durable)
        except (FileNotFoundError, NotADirectoryError):
            return False
        replaced = False
        if expect is not None and expect.version:
            after = os.stat(target, follow_symlinks=False)
            # Written again between our look and the rename: that value stays where it was.
            replaced = (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino)
        if replaced or (unless is not None and unless()):
            rename_into(target, source)
            return False
        if durable:
            fsync_dir_if_there(os.path.dirname(source))
            self._prune(src)
        return True

    async def delete(self, key: str) -> bool:
        return await self._pool.run(self._delete, key)

    def _delete(self, key: str) -> bool:
        path = self.path(key)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        fsync_dir_if_there(os.path.dirname(path))
        self._prune(key)
        return True

    async def delete_many(self, keys: Sequence[str], durable: bool = True) -> builtins.list[str]:
        return await self._pool.run(self._delete_many, keys, durable)

    def _delete_many(self, keys: Sequence[str], durable: bool = True) -> builtins.list[str]:
        """Unlink every key, then fsync each directory once (a purge empties a few hundred)."""
        removed = []
        for key in keys:
            try:
                os.unlink(self.path(key))
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            removed.append(key)
        if not durable:
            return []
        # One key per folder: each folder is made durable once, then pruned deepest first.
        last_in_folder = {key.rpartition("/")[0]: key for key in removed}
        for key in last_in_folder.values():
            fsync_dir_if_there(os.path.dirname(self.path(key)))
        for _, key in sorted(last_in_folder.items(), reverse=True):
            self._prune(key)
        return []

    async def tidy(self, prefix: str) -> int:
        return await self._pool.run(self._tidy, prefix)

    def _tidy(self, prefix: str) -> int:
        check_key(prefix.rstrip("/"))
        top = self.path(prefix.rstrip("/"))
        removed = 0
        for directory, folders, files in os.walk(top, topdown=False):
            if directory != top and not files and not any(os.path.isdir(os.path.join(directory, f))
                                                          for f in folders):
                try:
                    os.rmdir(directory)
                    removed += 1
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        raise
        return removed

    def _prune(self, key: str) -> None:
        """Remove the directories ``key``'s removal emptied: never the top two levels
        (``blobs/<alg>``, ``trash/<run>``: ``tidy`` takes those), never a ``_``-folder of a
        repository (``_blobs``, ``_manifests``...) nor what holds it."""
        parts = key.split("/")[:-1]
        while len(parts) > 2 and not parts[-1].startswith("_"):
            try:
                os.rmdir(os.path.join(self.root, *parts))
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                    return
                raise
            parts.pop()

    # -- capabilities -----------------------------------------------------------

    def local_path(self, key: str) -> str | None:
        return self.path(key)

    def presign(self, key: str, expires: int) -> str | None:
        return None

    def threaded(self) -> tuple[FsDriver, Pool] | None:
        return FsDriver(self.root, InlinePool(), self.tmp_dir), self._maintenance

    # -- what blobs need (registryd.storage.blobs) ------------------------------

    async def send(self, key: str, consumer: IConsumer, start: int, end: int) -> bool:
        path = self.path(key)
        if self._stat(key) is None:
            return False

        async def chunks() -> AsyncIterator[bytes]:
            offset = start
            while offset < end:
                chunk = await self._pool.run(_read_at, path, offset, min(STREAM_CHUNK, end - offset))
                offset += len(chunk)
                yield chunk

        await send_paced(consumer, chunks())
        return True

    async def put_file(self, key: str, path: str) -> None:
        await self._pool.run(self._put_file, self.path(key), path)

    @staticmethod
    def _put_file(target: str, path: str) -> None:
        """fsync the file, then rename it into place: a second commit of the same content
        replaces identical bytes, so one copy remains."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        rename_into(path, target)

    # -- appendable values: upload sessions ----------------------------------------

    def appendable(self, spool_dir: str, pool: Pool) -> FileAppendable:
        """Bodies appended to one file per session, renamed into place on commit (no spool)."""
        return FileAppendable(self.path, self._pool)

def _read_at(path: str, offset: int, length: int) -> bytes:
    """Blocking: ``length`` bytes of ``path`` from ``offset``. Each chunk opens the file, so a send
    cancelled while a read runs in the pool leaves nothing open behind it."""
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    if len(chunk) < length:
        raise OSError(errno.EIO, f"the file ended {length - len(chunk)} bytes short of a read at {offset}", path)
    return chunk
