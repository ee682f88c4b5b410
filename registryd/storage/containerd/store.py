"""The node's containerd as registryd's store (a registryd.storage.interface.Store).

Content and images live in containerd (``[storage.containerd]``); the data
directory keeps only the states of upload sessions (``uploads/``) and the
body on its way in: a session's bytes are in containerd's ingest, under a
lease of its own, and committed there (``appendable``). containerd is the
truth: a restarted registryd serves whatever containerd holds.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc
from twisted.internet.defer import Deferred, succeed

from registryd.digest import Digest
from registryd.errors import denied
from registryd.storage import layout
from registryd.storage.containerd.appendable import ContainerdAppendable
from registryd.storage.containerd.blobs import ContainerdBlobs, RecentLeases
from registryd.storage.containerd.client import VERSION, ContainerdClient
from registryd.storage.containerd.errors import ContainerdError, ContainerdUnavailable
from registryd.storage.containerd.names import LocalNaming, MirrorNaming, digest_or_none
from registryd.storage.containerd.objects import ContainerdObjects
from registryd.storage.containerd.proto import containerd_api_pb2 as api
from registryd.storage.containerd.repositories import ContainerdRepositories
from registryd.storage.containerd.settings import ContainerdSettings
from registryd.storage.fs.driver import FsDriver
from registryd.storage.files import empty_dir, local_readiness_problem, make_dirs, prove_writable
from registryd.storage.guard import BlobGuard
from registryd.storage.interface import HotCache, Store, StoreUnusable
from registryd.storage.uploads import UploadStore
from registryd.threads import BlockingPool, InlinePool

#: Seconds /readyz and the admin commands give containerd to answer its version.
READY_TIMEOUT = 3.0


class OwnNameUploads(UploadStore):
    """A session starts only in a repository a push may change (``check_name``): a push under
    another registry's name is refused before any byte is sent, not at its manifest."""

    check_name: Callable[[str], None] = staticmethod(lambda name: None)

    async def create(self, repo: str) -> Any:
        self.check_name(repo)
        return await super().create(repo)


class ReadOnlyUploads(OwnNameUploads):
    """``read_only``: no upload session starts (403 DENIED), so nothing is ever spooled."""

    async def create(self, repo: str) -> Any:
        raise denied("this registry serves containerd's images read-only ([storage.containerd] read_only)")


class ContainerdStore:
    """containerd's content and images, and the local spool of uploads (see the module docstring)."""

    driver = "containerd"
    #: containerd's GC, not registryd's, removes content: no BlobGuard of another process matters.
    shared = False
    #: containerd collects its own garbage, and its images are the node's (the kubelet's too).
    self_collecting = True

    def __init__(self, root: str, pool: BlockingPool | InlinePool, settings: ContainerdSettings, reactor: Any,
                 keep: float) -> None:
        """``keep``: seconds containerd keeps content registryd wrote before anything references it."""
        self.root = root
        self.pool = pool
        self.settings = settings
        self.tmp_dir = layout.local_path(root, layout.TMP)
        self.guard = BlobGuard()
        self.client = ContainerdClient(settings.socket, settings.namespace, reactor, settings.timeout)
        self.objects = ContainerdObjects(self.client, self.location())
        self.blobs = ContainerdBlobs(self.client, self.guard, RecentLeases(self.client, keep), settings.content_dir,
                                     reactor)
        naming = LocalNaming(settings.hostname)
        self.repositories = ContainerdRepositories(
            self.client, self.blobs, naming, read_only=settings.read_only,
            foreign_host=None if settings.foreign_names else naming.foreign_host)
        uploads = ReadOnlyUploads if settings.read_only else OwnNameUploads
        # Sessions' states are kept in the data directory, their bytes in containerd's ingests.
        spool = FsDriver(root, pool, self.tmp_dir)
        self.uploads = uploads(spool, ContainerdAppendable(self.client, self.blobs.leases, spool.path,
                                                           self.tmp_dir, pool), self.blobs)
        self.uploads.check_name = self.repositories.check_own
        self.hot_cache: HotCache | None = None

    def mirror_repositories(self, namespace: str) -> ContainerdRepositories:
        """One upstream's repositories: containerd's images named ``<namespace>/...``."""
        return ContainerdRepositories(self.client, self.blobs, MirrorNaming(namespace))

    def prepare(self) -> None:
        """Create the local spool folders and prove them writable (raises OSError)."""
        for sub in (layout.UPLOADS, layout.TMP):
            make_dirs(layout.local_path(self.root, sub))
        prove_writable(self.tmp_dir)

    def recover(self, keep_tmp: bool = False) -> None:
        if not keep_tmp:
            empty_dir(self.tmp_dir)

    def check_store(self) -> None:
        """At start-up, before the reactor runs: containerd answers on its socket (one line if not)."""
        call = grpc.insecure_channel(f"unix://{self.settings.socket}")
        try:
            version = call.unary_unary(VERSION, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=api.VersionResponse.FromString)
            version(api.Empty(), timeout=self.settings.timeout)
        except grpc.RpcError as e:
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            raise StoreUnusable(f"containerd does not answer on {self.settings.socket}: {details}") from None
        finally:
            call.close()

    async def check_backend(self) -> str | None:
        try:
            await self.client.version(timeout=READY_TIMEOUT)
        except (ContainerdUnavailable, ContainerdError) as e:
            return f"containerd does not answer on {self.settings.socket}: {e}"
        return None

    async def check_ready(self) -> str | None:
        return await self.check_backend()

    def readiness_problem(self, min_free_bytes: int) -> str | None:
        """The local spool takes writes and has room (uploads are spooled there)."""
        return local_readiness_problem(self.tmp_dir, self.root, min_free_bytes)

    def location(self) -> str:
        return f"containerd {self.settings.socket} namespace {self.settings.namespace}"

    async def mirror_folders(self) -> list[str]:
        """None: a mirrored repository is an image named after its upstream, not a folder."""
        return []

    async def blob_sizes(self) -> dict[Digest, int]:
        """Every piece of content in the namespace and its size (one listing of the content service)."""
        sizes = {}
        for info in await self.client.list_content():
            digest = digest_or_none(info.digest)
            if digest is not None:
                sizes[digest] = info.size
        return sizes

    async def blob_usage(self) -> tuple[int, int] | None:
        """Not counted for a page view (a listing of all of containerd's content)."""
        return None

    def close(self) -> Deferred[None]:
        self.client.close()
        return succeed(None)


#: mypy proves here that containerd's store is a registryd.storage.interface.Store.
_IS_A_STORE: type[Store] = ContainerdStore
