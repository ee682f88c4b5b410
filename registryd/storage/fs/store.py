"""The store of a data directory: content-addressed blobs, repositories, upload sessions.

``tmp/`` holds every file being written before its rename; it is emptied at
start-up, which is how a crash's leftovers are cleaned.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from registryd.digest import Digest
from registryd.storage import layout
from registryd.storage.blobs import Blobs
from registryd.storage.files import empty_dir, local_readiness_problem, make_dirs, prove_writable
from registryd.storage.fs.driver import FsDriver
from registryd.storage.guard import BlobGuard
from registryd.storage.interface import HotCache, Store
from registryd.storage.repositories import Repositories
from registryd.storage.uploads import UploadStore
from registryd.threads import BlockingPool, InlinePool
from registryd.storage.listing import blob_usage, list_blobs, mirror_folders


class FsStore:
    """The data directory and the three stores inside it (a registryd.storage.interface.Store)."""

    driver = "filesystem"
    #: One process serves a data directory: its BlobGuard sees every claim (see upkeep.eviction).
    shared = False
    self_collecting = False

    def __init__(self, root: str, pool: BlockingPool | InlinePool,
                 maintenance: BlockingPool | InlinePool | None = None) -> None:
        """``maintenance``: the pool of whole-store passes (gc, surveys, usage walks); ``pool`` by default."""
        self.root = root
        self.pool = pool
        self.tmp_dir = layout.local_path(root, layout.TMP)
        self.guard = BlobGuard()
        # The data directory as keys and bytes: what maintenance (gc) works on.
        self.objects = FsDriver(root, pool, self.tmp_dir, maintenance)
        # Blobs are sent with sendfile from their files and committed by a rename.
        self.blobs = Blobs(self.objects, self.guard)
        self.repositories = Repositories(self.objects, layout.repositories_root(None))
        self.uploads = UploadStore(self.objects, self.objects.appendable(self.tmp_dir, pool), self.blobs)
        self.hot_cache: HotCache | None = None   # every blob is a local file here already

    def mirror_repositories(self, namespace: str) -> Repositories:
        """The cached repositories of one upstream (``mirror/<namespace folder>``)."""
        return Repositories(self.objects, layout.repositories_root(namespace), durable_links=False)

    def prepare(self) -> None:
        """Create the layout and prove it writable (raises OSError)."""
        for sub in (layout.BLOBS, layout.REPOSITORIES, layout.UPLOADS, layout.TMP):
            make_dirs(layout.local_path(self.root, sub))
        prove_writable(self.tmp_dir)

    def check_store(self) -> None:
        """Nothing beyond the data directory to check at start-up (``prepare`` proves it writable)."""

    def readiness_problem(self, min_free_bytes: int) -> str | None:
        """Why the store cannot take writes now, or None (cheap: for /readyz)."""
        return local_readiness_problem(self.tmp_dir, self.root, min_free_bytes)

    async def check_backend(self) -> str | None:
        """Nothing beyond the data directory to check (readiness_problem does that)."""
        return None

    async def check_ready(self) -> str | None:
        """For /readyz: as ``check_backend`` (readiness_problem writes a probe file)."""
        return None

    def location(self) -> str:
        """Where the content lives, for messages: the data directory."""
        return self.root

    async def mirror_folders(self) -> list[str]:
        """The upstream folders under ``mirror/`` (a namespace with ``:`` as ``_``), sorted.

        Each can be passed to ``mirror_repositories`` as it is; the config's
        upstreams say which namespace a folder stands for.
        """
        return await mirror_folders(self.objects)

    async def blob_usage(self) -> tuple[int, int] | None:
        """Bytes and files under ``blobs/``: one walk, in one trip to the pool."""
        return await blob_usage(self.objects)

    async def blob_sizes(self) -> dict[Digest, int]:
        """Every stored blob and its size (one listing of ``blobs/``, walked in the pool)."""
        return {digest: entry.size for digest, entry in (await list_blobs(self.objects)).items()}

    def close(self) -> Deferred[None]:
        return succeed(None)

    def recover(self, keep_tmp: bool = False) -> None:
        """Drop what a crash left half-written: everything under ``tmp/``."""
        if not keep_tmp:
            empty_dir(self.tmp_dir)


#: mypy proves here that the data directory's store is a registryd.storage.interface.Store.
_IS_A_STORE: type[Store] = FsStore
