"""A bounded local disk cache of hot blobs in front of a store without local files: the S3
bucket's ``[storage] cache_size`` (registryd.storage.blobs consults it).

The bucket stays the truth. Every blob GET still asks it (one HEAD, the
stat ``Blobs.open`` always makes) whether the blob exists and how large it
is, so a blob that garbage collection on any node removed is a 404 here
too, and its cached copy is dropped. Only then does a cached copy answer,
as a local file that goes out through sendfile.

A whole-blob GET that misses streams from the bucket to the client as
before and, on the way, into a fill file, hashed as it is written. Only a
fill whose size and digest match is renamed into place (after an fsync, so
a crash leaves the old state or the whole blob); a client that goes away, a
short or wrong body, or a full disk drops the fill. One fill per digest at a
time: a second client meanwhile streams from the bucket alone.

The total of cached blobs, plus room reserved for fills under way, never
passes the configured size: least recently used blobs go first. Use is
tracked in memory; at start-up a scan in the IO pool rebuilds the order
from the files' access and modification times and removes leftover fills.
A blob above a quarter of the cache is never cached. Blobs are evicted by
unlinking: a client still reading one keeps its open file to the end, so
the disk may briefly hold a little more than the limit.

Layout under the cache directory::

    blobs/<alg>/<hex>     verified blobs, named by digest, no extension
    fills/<random>        fills being written (removed at start-up)
"""
from __future__ import annotations

import os
import re
import uuid
from collections import OrderedDict
from typing import Any, BinaryIO, Coroutine, Iterator

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from registryd.digest import HEX_LENGTHS, Digest
from registryd.storage.files import empty_dir, make_dirs, remove_file, write_fully
from registryd.threads import BlockingPool, InlinePool

log = Logger()

BLOBS = "blobs"
FILLS = "fills"
#: Blobs larger than this share of the cache are served from the bucket only.
MAX_BLOB_SHARE = 4

_HEX = re.compile(r"^[a-f0-9]+$")


class LruIndex:
    """Sizes of cached blobs, least recently used first, and room reserved for fills.

    Pure bookkeeping, no I/O: the caller removes the files of the entries
    it is handed back. ``used + reserved`` never passes ``capacity``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.reserved = 0
        self._entries: OrderedDict[Digest, int] = OrderedDict()

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Digest]:
        """Least recently used first."""
        return iter(list(self._entries))

    def size_of(self, digest: Digest) -> int | None:
        return self._entries.get(digest)

    def touch(self, digest: Digest) -> None:
        """``digest`` was just used: it goes last in line for eviction."""
        if digest in self._entries:
            self._entries.move_to_end(digest)

    def reserve(self, size: int) -> list[tuple[Digest, int]] | None:
        """Room for a fill of ``size`` bytes: the entries evicted to make it, or None when
        fills already under way leave too little even with every entry gone (nothing changes)."""
        if size > self.capacity - self.reserved:
            return None
        evicted = []
        while self.used + self.reserved + size > self.capacity:
            digest, evicted_size = self._entries.popitem(last=False)
            self.used -= evicted_size
            evicted.append((digest, evicted_size))
        self.reserved += size
        return evicted

    def release(self, size: int) -> None:
        """A fill that reserved ``size`` bytes ended without an entry."""
        self.reserved -= size

    def commit(self, digest: Digest, size: int) -> None:
        """A fill that reserved ``size`` bytes is in place: its room becomes an entry, used last."""
        self.reserved -= size
        self.add(digest, size)

    def add(self, digest: Digest, size: int) -> list[tuple[Digest, int]]:
        """Take ``digest`` in as most recently used (at start-up, oldest first); the entries evicted
        to stay within capacity (``digest`` itself if it can never fit)."""
        self.remove(digest)
        if size > self.capacity - self.reserved:
            return [(digest, size)]
        self._entries[digest] = size
        self.used += size
        evicted = []
        while self.used + self.reserved > self.capacity:
            victim, victim_size = self._entries.popitem(last=False)
            self.used -= victim_size
            evicted.append((victim, victim_size))
        return evicted

    def remove(self, digest: Digest) -> int | None:
        """Forget ``digest``; its size, or None if it was not there."""
        size = self._entries.pop(digest, None)
        if size is not None:
            self.used -= size
        return size


@attrs.define
class HotCacheStats:
    """What the cache did since start-up, for metrics and tests."""

    hits: int = 0            # blob GETs sent from a cached file
    misses: int = 0          # blob GETs streamed from the bucket
    fills: int = 0           # blobs that went into the cache
    filled_bytes: int = 0
    rejected: int = 0        # complete fills whose size or digest was wrong
    evictions: int = 0
    evicted_bytes: int = 0


class CacheFill:
    """One blob on its way into the cache while it streams to a client, hashed as it is written.

    ``write`` takes each chunk the client gets (one write and one hash update
    of at most a socket read, fine on the reactor); then exactly one of
    ``complete`` or ``abandon``.
    """

    def __init__(self, cache: HotCache, digest: Digest, size: int, path: str, fd: int) -> None:
        self.digest = digest
        self.size = size
        self.path = path
        self.written = 0
        #: Set by a discard while the fill runs: it must never be put in place.
        self.cancelled = False
        self._cache = cache
        self._fd: int | None = fd
        self._hasher = digest.hasher()
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def write(self, data: bytes) -> None:
        if self._ended or self._fd is None:
            return
        if self.cancelled:
            self._cache._drop_fill(self, None)
            return
        if self.written + len(data) > self.size:
            self._cache._drop_fill(self, f"more than the {self.size} bytes the bucket announced")
            return
        try:
            write_fully(self._fd, data)
        except OSError as e:
            self._cache._drop_fill(self, f"cannot write {self.path}: {e.strerror}")
            return
        self._hasher.update(data)
        self.written += len(data)

    def complete(self) -> None:
        """The whole body went through: verify, and put it in place if it is the blob."""
        if self._ended:
            return
        if self.cancelled:
            self._cache._drop_fill(self, None)
            return
        if self.written != self.size or self._hasher.hexdigest() != self.digest.hex:
            self._cache.stats.rejected += 1
            self._cache._drop_fill(self, f"the body had {self.written} bytes and digest "
                                         f"{self.digest.algorithm}:{self._hasher.hexdigest()}")
            return
        self._cache._install(self)

    def abandon(self) -> None:
        """The body did not go through whole (the client left, the bucket failed)."""
        if not self._ended:
            self._cache._drop_fill(self, None)

    def _end(self) -> int | None:
        """Mark the fill ended; the file descriptor, now the caller's to close."""
        self._ended = True
        fd, self._fd = self._fd, None
        return fd


class HotCache:
    """Blob files under ``directory``, at most ``capacity`` bytes, least recently used evicted.

    Everything but the pool's work runs on the reactor. Until ``start``'s
    scan has rebuilt the index, the cache neither answers nor fills.
    """

    def __init__(self, directory: str, capacity: int, pool: BlockingPool | InlinePool,
                 max_blob: int | None = None) -> None:
        self.directory = directory
        self.capacity = capacity
        self.max_blob = capacity // MAX_BLOB_SHARE if max_blob is None else max_blob
        self.stats = HotCacheStats()
        self.loaded = False
        self._pool = pool
        self._index = LruIndex(capacity)
        self._fills: dict[Digest, CacheFill] = {}
        self._removing: set[Digest] = set()
        self._pending: set[Deferred[Any]] = set()

    # -- views ---------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes of cached blobs (fills under way not counted)."""
        return self._index.used

    @property
    def reserved(self) -> int:
        """Bytes reserved for fills under way."""
        return self._index.reserved

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: object) -> bool:
        return digest in self._index

    def lru_order(self) -> list[Digest]:
        """Cached blobs, the next to be evicted first."""
        return list(self._index)

    def filling(self) -> list[Digest]:
        return list(self._fills)

    def path(self, digest: Digest) -> str:
        return os.path.join(self.directory, BLOBS, digest.algorithm, digest.hex)

    # -- start-up ------------------------------------------------------------

    def prepare(self) -> None:
        """Create the layout (blocking: at start-up, before serving; raises OSError)."""
        for algorithm in HEX_LENGTHS:
            make_dirs(os.path.join(self.directory, BLOBS, algorithm))
        make_dirs(os.path.join(self.directory, FILLS))

    def start(self) -> None:
        """Rebuild the index from the files in the background; the cache works once it is done."""
        self._background(self.load(), "loading the hot blob cache")

    async def load(self) -> None:
        """Scan the directory in the pool: newest files kept up to the capacity, the rest removed."""
        try:
            found = await self._pool.run(_scan, self.directory)
        except OSError as e:
            log.error("hot blob cache disabled: cannot read {directory}: {error}", directory=self.directory,
                      error=e.strerror or str(e))
            return
        found.sort(key=lambda item: item[0], reverse=True)
        keep: list[tuple[Digest, int]] = []
        drop: list[Digest] = []
        total = 0
        for _, digest, size in found:
            if 0 < size <= self.max_blob and total + size <= self.capacity:
                keep.append((digest, size))
                total += size
            else:
                drop.append(digest)
        for digest, size in reversed(keep):
            self._index.add(digest, size)
        self.loaded = True
        for digest in drop:
            self._remove_file(digest)
        log.info("hot blob cache: {count} blobs, {bytes} bytes of {capacity} in {directory}",
                 count=len(keep), bytes=total, capacity=self.capacity, directory=self.directory)

    # -- serving -------------------------------------------------------------

    def open(self, digest: Digest, size: int) -> BinaryIO | None:
        """The cached file of ``digest`` if it holds the ``size`` bytes the bucket has, else None.

        An open of a file we know is there, like the filesystem driver's, so on the reactor.
        """
        known = self._index.size_of(digest)
        if known is None or digest in self._removing:
            return None
        if known != size:
            # Cannot be the same content; the bucket is the truth.
            self.discard(digest)
            return None
        try:
            file = open(self.path(digest), "rb")
        except OSError:
            self._index.remove(digest)  # gone behind our back (an operator, a disk problem)
            return None
        if os.fstat(file.fileno()).st_size != size:
            file.close()
            self.discard(digest)
            return None
        return file

    def record_hit(self, digest: Digest) -> None:
        self.stats.hits += 1
        self._index.touch(digest)

    def record_miss(self) -> None:
        self.stats.misses += 1

    def begin_fill(self, digest: Digest, size: int) -> CacheFill | None:
        """A fill for a whole-blob GET that missed, or None when this one is not to be cached
        (too large, already cached or filling, being removed, no room, not loaded yet)."""
        if (not self.loaded or not 0 < size <= self.max_blob or digest in self._index
                or digest in self._fills or digest in self._removing):
            return None
        evicted = self._index.reserve(size)
        if evicted is None:
            return None
        self._evict(evicted)
        path = os.path.join(self.directory, FILLS, uuid.uuid4().hex)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._index.release(size)
            log.warn("hot blob cache: cannot create {path}: {error}", path=path, error=e.strerror)
            return None
        fill = CacheFill(self, digest, size, path, fd)
        self._fills[digest] = fill
        return fill

    def discard(self, digest: Digest) -> None:
        """``digest`` is gone from the bucket, or being deleted: drop its file and any fill of it."""
        fill = self._fills.get(digest)
        if fill is not None:
            fill.cancelled = True
        if self._index.remove(digest) is not None:
            self._remove_file(digest)

    async def settle(self) -> None:
        """Wait for the background work started so far (renames, removals, the start-up scan)."""
        while self._pending:
            await DeferredList(list(self._pending))

    # -- fills ----------------------------------------------------------------

    def _drop_fill(self, fill: CacheFill, why: str | None) -> None:
        fd = fill._end()
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
        self._index.release(fill.size)
        if why is not None:
            log.warn("hot blob cache: not caching {digest}: {why}", digest=str(fill.digest), why=why)
        if fd is not None:
            os.close(fd)
        self._background(self._pool.run(remove_file, fill.path), "removing a dropped fill")

    def _install(self, fill: CacheFill) -> None:
        fd = fill._end()
        assert fd is not None
        self._background(self._put_in_place(fill, fd), "putting a fill in place")

    async def _put_in_place(self, fill: CacheFill, fd: int) -> None:
        target = self.path(fill.digest)
        try:
            try:
                await self._pool.run(_install_file, fd, fill.path, target)
            except OSError as e:
                log.warn("hot blob cache: cannot put {digest} in place: {error}", digest=str(fill.digest),
                         error=e.strerror or str(e))
                await self._pool.run(remove_file, fill.path)
                self._index.release(fill.size)
                return
            if fill.cancelled:
                # Deleted while it streamed: the renamed file must go too.
                self._index.release(fill.size)
                await self._pool.run(remove_file, target)
                return
            self._index.commit(fill.digest, fill.size)
            self.stats.fills += 1
            self.stats.filled_bytes += fill.size
        finally:
            if self._fills.get(fill.digest) is fill:
                del self._fills[fill.digest]

    # -- removal --------------------------------------------------------------

    def _evict(self, evicted: list[tuple[Digest, int]]) -> None:
        for digest, size in evicted:
            self.stats.evictions += 1
            self.stats.evicted_bytes += size
            self._remove_file(digest)

    def _remove_file(self, digest: Digest) -> None:
        """Unlink the file in the pool; until then, the digest is neither served nor filled."""
        if digest in self._removing:
            return
        self._removing.add(digest)
        self._background(self._unlink(digest), "removing a cached blob")

    async def _unlink(self, digest: Digest) -> None:
        try:
            await self._pool.run(remove_file, self.path(digest))
        except OSError as e:
            log.warn("hot blob cache: cannot remove {path}: {error}", path=self.path(digest), error=e.strerror)
        finally:
            self._removing.discard(digest)

    def _background(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        """Run ``work`` on its own: a failure is logged, never lost; ``settle`` waits for it."""
        d = Deferred.fromCoroutine(work)

        def failed(failure: Failure) -> None:
            log.failure("hot blob cache: {what} failed", failure, what=what)

        d.addErrback(failed)
        if not d.called:
            self._pending.add(d)
            d.addBoth(lambda _: self._pending.discard(d))


def _install_file(fd: int, source: str, target: str) -> None:
    """fsync and close ``fd`` (the fill at ``source``), then rename it to ``target`` (blocking)."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(source, target)
    except FileNotFoundError:
        # Its folder went (an operator cleaning up): make it again.
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)


def _scan(directory: str) -> list[tuple[float, Digest, int]]:
    """Every cached blob as (last use, digest, size); leftover fills removed (blocking)."""
    fills = os.path.join(directory, FILLS)
    if os.path.isdir(fills):
        empty_dir(fills)
    found = []
    for algorithm, length in HEX_LENGTHS.items():
        try:
            entries = os.scandir(os.path.join(directory, BLOBS, algorithm))
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if len(entry.name) != length or not _HEX.match(entry.name):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((max(stat.st_atime, stat.st_mtime), Digest(algorithm, entry.name), stat.st_size))
    return found
