"""The store of a node whose content and metadata live in a shared S3 bucket.

Everything a client can see is in the bucket, so any node can serve any
request. The local data directory keeps only ``tmp/``: upload spools and
partial upstream fills on their way into the bucket, emptied at start-up;
and, with ``[storage] cache_size``, a bounded cache of hot blobs (``cache/``
unless ``cache_dir`` says otherwise), which the bucket still vouches for on
every GET.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred

from registryd.storage.blobs import Blobs
from registryd.storage.files import empty_dir, free_space_problem, make_dirs, prove_writable
from registryd.storage.guard import BlobGuard
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.driver import S3Driver
from registryd.storage.hot_cache import HotCache
from registryd.storage.listing import blob_usage, list_blobs, mirror_folders
from registryd.digest import Digest
from registryd.storage import layout
from registryd.storage.s3.probe import BucketUnusable, ReadyProbe, check_bucket
from registryd.storage.repositories import Repositories
from registryd.storage.s3.settings import S3Settings
from registryd.storage.uploads import UploadStore
from registryd.threads import BlockingPool, InlinePool
from registryd.storage.interface import Store, StoreUnusable


class S3Store:
    """The storage interface on one bucket, with the same faces as the filesystem Store."""

    driver = "s3"
    #: Every node writes the bucket: this node's BlobGuard sees only its own claims (see upkeep.eviction).
    shared = True
    self_collecting = False

    def __init__(self, root: str, pool: BlockingPool | InlinePool, settings: S3Settings, reactor: Any,
                 presign: bool = False, cache_size: int = 0, cache_dir: str | None = None) -> None:
        self.root = root
        self.pool = pool
        self.tmp_dir = layout.local_path(root, layout.TMP)
        self.guard = BlobGuard()
        # The keys, from the config's variable or file if it names one: read once, here (SecretUnavailable).
        settings = settings.with_secrets_read()
        self.client = S3Client(settings, reactor)
        # The bucket as keys and bytes: what maintenance (gc) works on.
        self.objects = S3Driver(self.client)
        # Redirected GETs never pass through the node: nothing to cache then.
        self.hot_cache = (HotCache(cache_dir or os.path.join(root, "cache"), cache_size, pool)
                          if cache_size > 0 and not presign else None)
        self.blobs = Blobs(self.objects, self.guard, redirect=presign, hot_cache=self.hot_cache)
        self.repositories = Repositories(self.objects, layout.repositories_root(None))
        self.uploads = UploadStore(self.objects, self.objects.appendable(os.path.join(self.tmp_dir, "uploads"), pool),
                                   self.blobs)
        self._remote_problem: str | None = None
        self._ready_probe = ReadyProbe(settings, reactor)

    def mirror_repositories(self, namespace: str) -> Repositories:
        """The cached repositories of one upstream (``mirror/<namespace folder>``): a PUT is durable anyway."""
        return Repositories(self.objects, layout.repositories_root(namespace))

    def prepare(self) -> None:
        """Create the local ``tmp/`` (and the hot cache's folders) and prove it writable (raises OSError)."""
        make_dirs(os.path.join(self.tmp_dir, "uploads"))
        prove_writable(self.tmp_dir)
        if self.hot_cache is not None:
            self.hot_cache.prepare()

    def recover(self, keep_tmp: bool = False) -> None:
        """Drop local leftovers of a crash: spools and fills are re-sent by their clients.

        The hot cache rebuilds its index in the IO pool (which must be running)
        and answers once that is done.
        """
        if not keep_tmp:
            empty_dir(self.tmp_dir)
        make_dirs(os.path.join(self.tmp_dir, "uploads"))
        if self.hot_cache is not None:
            self.hot_cache.start()

    def check_store(self) -> None:
        """At start-up: the bucket exists and takes a write and a read (raises StoreUnusable, one line)."""
        try:
            check_bucket(self.client.settings)
        except BucketUnusable as e:
            raise StoreUnusable(str(e)) from None

    async def check_backend(self) -> str | None:
        """Why the bucket cannot be used now, or None: the probe object read within
        ``ready_timeout`` (a missing one is fine): admin commands change nothing."""
        self._remote_problem = await self._ready_probe.check(write=False)
        return self._remote_problem

    async def check_ready(self) -> str | None:
        """For /readyz: why this node cannot serve now, or None: the probe object written
        and read back within ``ready_timeout`` (registryd.storage.s3.probe)."""
        self._remote_problem = await self._ready_probe.check(write=True)
        return self._remote_problem

    def location(self) -> str:
        """Where the content lives, for messages: ``s3://bucket/prefix``."""
        settings = self.client.settings
        return f"s3://{settings.bucket}/{settings.prefix}"

    async def mirror_folders(self) -> list[str]:
        """The upstream folders under ``mirror/`` (a namespace with ``:`` as ``_``), sorted."""
        return await mirror_folders(self.objects)

    async def blob_sizes(self) -> dict[Digest, int]:
        """Every stored blob and its size (one listing of ``blobs/``)."""
        return {digest: entry.size for digest, entry in (await list_blobs(self.objects)).items()}

    async def blob_usage(self) -> tuple[int, int] | None:
        """Not counted: that would be a listing of the whole bucket for a page view."""
        return None

    def readiness_problem(self, min_free_bytes: int) -> str | None:
        """The last known state of the bucket, and room for spools on the local disk."""
        if self._remote_problem is not None:
            return self._remote_problem
        try:
            return free_space_problem(self.root, min_free_bytes, " for spools")
        except OSError as e:
            return f"data directory is not usable: {e.strerror}"

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self.hot_cache is not None:
            await self.hot_cache.settle()   # renames and removals still in the pool
        await self._ready_probe.close()
        await self.client.close()


#: mypy proves here that the bucket's store is a registryd.storage.interface.Store.
_IS_A_STORE: type[Store] = S3Store
