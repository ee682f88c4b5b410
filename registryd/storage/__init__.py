"""Storage: a driver (registryd.storage.driver) and, written once above it, the layout,
blobs, repositories and uploads behind one typed Store (registryd.storage.interface).

``open_store`` opens the store ``[storage] driver`` names: a data directory
(registryd.storage.fs), a shared S3 bucket (registryd.storage.s3) or the
node's containerd (registryd.storage.containerd).
"""
from __future__ import annotations

from typing import Any

from registryd.storage.blobs import Blobs
from registryd.storage.fs.store import FsStore
from registryd.storage.guard import BlobGuard
from registryd.storage.interface import Store
from registryd.storage.repositories import Repositories
from registryd.storage.uploads import UploadStore
from registryd.threads import BlockingPool, InlinePool

__all__ = ["Store", "FsStore", "BlobGuard", "Blobs", "Repositories", "UploadStore", "open_store"]


def open_store(config: Any, pool: BlockingPool | InlinePool, reactor: Any,
               maintenance: BlockingPool | InlinePool | None = None) -> Store:
    """The store ``[storage] driver`` names: the data directory, a shared S3 bucket, or the node's containerd.

    ``maintenance``: where whole-store passes over a data directory run (a bucket's go over the network)."""
    if config.storage.driver == "s3":
        from registryd.storage.s3.store import S3Store

        storage = config.storage
        return S3Store(config.data_dir, pool, storage.s3, reactor, presign=storage.redirect,
                       cache_size=storage.cache_size, cache_dir=storage.cache_dir)
    if config.storage.driver == "containerd":
        from registryd.storage.containerd.store import ContainerdStore

        return ContainerdStore(config.data_dir, pool, config.storage.containerd, reactor, keep=config.gc_delay)
    return FsStore(config.data_dir, pool, maintenance)
