"""A page's many small store reads in one trip to the IO pool, not on the reactor.

On a data directory a small read or a stat answers at once on the calling
thread, so a page of 100 tags (a tag, a manifest and a config read each) or
the summary of a repository of 1,000 manifests would run on the reactor from
start to end. Over the driver's blocking twin (``Driver.threaded``) the whole
batch runs in one worker thread instead: one trip, however many tags. A
store without a twin (a bucket, containerd, memory) has none of this: its
calls wait on the network and give the reactor back by themselves.

Work in the thread only reads: what it learns is handed back and kept by
the reactor.
"""
from __future__ import annotations

from typing import Any, Callable, Coroutine, TypeVar

from registryd.digest import Digest
from registryd.storage.driver import Driver, TooLarge, finish
from registryd.storage.interface import RepositoryBackend, Store
from registryd.storage.layout import blob_key
from registryd.storage.repositories import Repositories
from registryd.threads import BlockingPool, InlinePool

T = TypeVar("T")


class TwinBlobs:
    """Blob reads over the blocking twin (what registryd.web.ui.images reads: manifests, configs)."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    async def read(self, digest: Digest, limit: int) -> bytes | None:
        try:
            return await self._driver.read(blob_key(digest), limit)
        except TooLarge:    # nothing the UI shows is this large: shown as missing
            return None

    async def size(self, digest: Digest) -> int | None:
        entry = await self._driver.stat(blob_key(digest))
        return entry.size if entry is not None else None


class Offload:
    """Runs a batch of reads over the store's blocking twin in the IO pool; counts its trips."""

    def __init__(self, twin: Driver, pool: BlockingPool | InlinePool) -> None:
        self._twin = twin
        self._pool = pool
        self.blobs = TwinBlobs(twin)
        self.trips = 0

    def backend(self, backend: RepositoryBackend) -> RepositoryBackend | None:
        """The same repositories over the twin (None: this backend has no files to read)."""
        return Repositories(self._twin, backend.root) if isinstance(backend, Repositories) else None

    async def run(self, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``work()`` (calls over the twin only) whole in one worker thread."""
        self.trips += 1
        return await self._pool.run(lambda: finish(work()))


def offload(store: Store) -> Offload | None:
    """The store's offload, or None where its calls do not block (no twin)."""
    threaded = store.objects.threaded()
    return None if threaded is None else Offload(threaded[0], store.pool)
