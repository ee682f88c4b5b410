"""A Store over any driver's plain keys (the MemoryDriver in tests): blobs, repositories and
upload sessions in it.

For tests that run the whole API in seconds: no fsync, no bucket. Blobs
are registryd.storage.blobs over the driver, as on the other stores; without
a local file or presigned URLs, a GET streams the value to the client.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from registryd.digest import Digest
from registryd.storage import layout
from registryd.storage.blobs import Blobs
from registryd.storage.driver import Driver
from registryd.storage.files import empty_dir, make_dirs
from registryd.storage.guard import BlobGuard
from registryd.storage.interface import HotCache, Store
from registryd.storage.repositories import Repositories
from registryd.storage.listing import blob_usage, list_blobs, mirror_folders
from registryd.storage.uploads import UploadStore
from registryd.threads import BlockingPool, InlinePool


class DriverStore:
    """A registryd.storage.interface.Store whose content lives in ``driver`` (see the module docstring)."""

    shared = False
    self_collecting = False

    def __init__(self, root: str, pool: BlockingPool | InlinePool, driver: Driver) -> None:
        self.root = root
        self.pool = pool
        self.driver = driver.name
        self.tmp_dir = layout.local_path(root, layout.TMP)
        self.guard = BlobGuard()
        self.objects = driver
        self.hot_cache: HotCache | None = None
        self.blobs = Blobs(driver, self.guard)
        self.repositories = Repositories(driver, layout.repositories_root(None))
        self.uploads = UploadStore(driver, driver.appendable(self.tmp_dir, pool), self.blobs)

    def mirror_repositories(self, namespace: str) -> Repositories:
        return Repositories(self.objects, layout.repositories_root(namespace), durable_links=False)

    def prepare(self) -> None:
        make_dirs(self.tmp_dir)

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
