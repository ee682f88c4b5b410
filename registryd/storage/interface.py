"""The storage interface: what the API, the mirror cache and the upkeep may ask of a store.

Two implementations: the filesystem (``registryd.storage``, the embedded
default) and an S3-compatible object store (``registryd.storage.s3``), which
several registryd nodes can share. Everything is async, because an object
store answers over the network; the filesystem answers at once where a call
is cheap (a stat, a small read) and uses the IO pool where it is not.

The layout is the same on both (S3 keys under the bucket's prefix):
registryd.storage.layout maps every path.

Rules every implementation keeps:

* A blob is visible only once its whole verified content is in place, and
  then never changes.
* A tag is written only after the manifest revision it points at, and a
  revision only after its content blob: a crash (or another node) never
  sees a tag without its manifest.
* Every write that returns has been made durable (fsync + rename on disk; a
  completed PUT on S3), except pull times, which are advisory.
"""
from __future__ import annotations

from typing import Any, BinaryIO, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer

from registryd.digest import Digest
from registryd.storage.driver import Driver
from registryd.storage.guard import BlobGuard
from registryd.threads import BlockingPool, InlinePool


class BlobGone(FileNotFoundError):
    """The blob was deleted (by a GC, an eviction, another node) between its open and its
    first byte: nothing of it was sent, so the request may still be answered otherwise."""


class StoreUnusable(Exception):
    """At start-up: the store cannot be written and read; the message is one line for the operator."""


class BlobSource(Protocol):
    """An open blob, ready to be sent to a client."""

    size: int

    def local_file(self) -> BinaryIO | None:
        """A real file to hand to sendfile, or None when the bytes are elsewhere."""

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        """Write bytes ``[start, end)`` to ``consumer``, honouring its backpressure.

        BlobGone if the blob was deleted before the first byte went out."""

    def redirect_url(self, expires: int) -> str | None:
        """A short-lived URL the client may fetch the blob from directly, or None."""

    def close(self) -> None:
        """Release what the source holds (a file handle, a connection)."""


class BlobBackend(Protocol):
    """Content-addressed, immutable blobs shared by every repository."""

    guard: BlobGuard

    async def size(self, digest: Digest) -> int | None:
        """The blob's size, or None if it is not stored."""

    async def open(self, digest: Digest) -> BlobSource | None:
        """The blob, to send; None if it is not stored."""

    async def read(self, digest: Digest, limit: int) -> bytes | None:
        """Small content (a manifest), at most ``limit`` bytes; None if not stored."""

    async def put(self, digest: Digest, data: bytes) -> None:
        """Store small content whose digest the caller verified."""

    async def commit_file(self, path: str, digest: Digest) -> None:
        """Store a verified local file (a mirror fill) as ``digest``; the file is consumed."""

    async def delete(self, digest: Digest) -> bool:
        """Remove the blob; False if it was not there."""


class RepositoryBackend(Protocol):
    """Per-repository metadata: blob links, manifest revisions, tags, referrers, pull times.

    One instance serves the local repositories, one more each mirrored upstream.
    """

    async def exists(self, name: str) -> bool: ...

    async def has_blob(self, name: str, digest: Digest) -> bool: ...

    async def link_blob(self, name: str, digest: Digest) -> None: ...

    async def unlink_blob(self, name: str, digest: Digest) -> bool: ...

    async def manifest_media_type(self, name: str, digest: Digest) -> str | None:
        """The media type the revision was stored with, or None if ``name`` lacks it."""

    async def add_manifest(self, name: str, digest: Digest, media_type: str, tags: list[str],
                           referrer: tuple[Digest, dict[str, Any]] | None) -> None:
        """Record a revision (its content is already stored), its referrer entry, then its tags."""

    async def set_tags(self, name: str, digest: Digest, tags: list[str]) -> None:
        """Point ``tags`` at a revision ``name`` already has."""

    async def delete_manifest(self, name: str, digest: Digest, subject: Digest | None) -> bool:
        """Remove a revision, the tags pointing at it, its referrer entry and pull time."""

    async def resolve_tag(self, name: str, tag: str) -> Digest | None: ...

    async def tag_mtime(self, name: str, tag: str) -> float | None:
        """When the tag was written or last confirmed (the mirror's TTL clock)."""

    async def touch_tag(self, name: str, tag: str, digest: Digest) -> None:
        """Mark the tag as confirmed now, pointing at ``digest`` (what the upstream just said)."""

    async def delete_tag(self, name: str, tag: str) -> bool: ...

    async def tags(self, name: str) -> list[str] | None:
        """Sorted tags, or None when the repository does not exist."""

    async def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]: ...

    async def record_pull(self, name: str, digest: Digest, when: float) -> None: ...

    async def revisions(self, name: str) -> dict[Digest, float]:
        """Every manifest revision of ``name`` and when it was written (mtime / LastModified).

        For ``registryd prune`` inside a server: a revision's write time is
        when the mirror cached it. Empty for a repository that does not exist.
        """

    async def pulls(self, name: str) -> dict[Digest, float]:
        """When each manifest of ``name`` was last pulled (``_pulls/``); advisory, like the writes."""

    async def catalog(self) -> list[str]:
        """Every repository name, sorted."""


class UploadWriter(Protocol):
    """Receives one request body, chunk by chunk, from ``handleContentChunk`` (so: synchronously)."""

    upload: Any
    start: int
    end: int

    def write(self, data: bytes) -> None: ...

    @property
    def written(self) -> int: ...

    def abandon(self) -> None:
        """The body never completed: the session stays as it was acknowledged."""


#: The writer type of one upload backend: it takes back only the writers it opened.
W = TypeVar("W", bound=UploadWriter)


class UploadBackend(Protocol[W]):
    """Upload sessions (registryd.storage.uploads, written once over the driver): where the
    driver records them in the store (a bucket), any node can continue and commit them."""

    def known(self, repo: str, upload_id: str) -> Any | None:
        """The session if this node has it in memory (no waiting), else None: then ``get``
        says whether it exists."""

    def open_here(self, repo: str, upload_id: str) -> bool:
        """Whether the session is open, answered without waiting: from memory, or from its state
        file where the driver keeps one locally (a session another worker process of this node
        started); False where only the store could say (then a limit counts what this process knows)."""

    async def create(self, repo: str) -> Any: ...

    async def get(self, repo: str, upload_id: str) -> Any:
        """The session, or raise BLOB_UPLOAD_UNKNOWN."""

    def open_writer(self, upload: Any, start: int | None, algorithm: str | None) -> W:
        """Append the next body at the acknowledged end (416 for any other ``start``)."""

    async def acknowledge(self, writer: W) -> None:
        """Make the body durable and count it; 202 may be sent after this."""

    async def commit(self, writer: W, digest: Digest) -> None:
        """Verify the whole session against ``digest`` and store it as that blob."""

    async def cancel(self, upload: Any) -> None: ...

    async def reap(self, expiry: float) -> int:
        """Remove sessions untouched for ``expiry`` seconds; how many went."""


class HotCacheCounts(Protocol):
    """What a hot cache did since start-up (registryd.storage.hot_cache.HotCacheStats)."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def filled_bytes(self) -> int: ...
    @property
    def evicted_bytes(self) -> int: ...
    @property
    def rejected(self) -> int: ...


class HotCache(Protocol):
    """A node's local cache of hot blobs (registryd.storage.hot_cache.HotCache), as metrics read it."""

    @property
    def stats(self) -> HotCacheCounts: ...
    @property
    def used(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    def __len__(self) -> int: ...


class Store(Protocol):
    """A store, whichever its driver: what the web layer, the mirror, upkeep and the admin commands use.

    ``registryd.storage.open_store`` returns one: ``registryd.storage.fs.store.FsStore``
    (a data directory) or ``registryd.storage.s3.store.S3Store`` (a bucket).
    Optional capabilities are attributes that may be None, never asked with getattr.
    """

    @property
    def driver(self) -> str:
        """``"filesystem"`` or ``"s3"``: for messages and reports."""

    @property
    def shared(self) -> bool:
        """Whether other nodes write the same store (then this node's BlobGuard sees only its own claims)."""

    @property
    def self_collecting(self) -> bool:
        """True where the store collects its own garbage and what it holds is not registryd's alone
        (containerd: the node's images, which its kubelet runs): registryd's collection, the mirror
        cache's eviction and prune leave it alone."""

    @property
    def root(self) -> str:
        """The local data directory (on S3: spools, the hot cache)."""

    @property
    def pool(self) -> BlockingPool | InlinePool:
        """Where blocking work runs."""

    @property
    def tmp_dir(self) -> str:
        """The local folder for files on their way into the store; emptied by ``recover``."""

    @property
    def guard(self) -> BlobGuard: ...

    @property
    def objects(self) -> Driver:
        """The store as keys and bytes: what maintenance (gc, surveys, fsck) works on."""

    @property
    def blobs(self) -> BlobBackend: ...

    @property
    def repositories(self) -> RepositoryBackend:
        """The local repositories."""

    @property
    def uploads(self) -> UploadBackend[Any]: ...

    @property
    def hot_cache(self) -> HotCache | None:
        """The local cache of hot blobs of a bucket (``[storage] cache_size``), or None."""

    def mirror_repositories(self, namespace: str) -> RepositoryBackend:
        """The cached repositories of one upstream (``mirror/<namespace folder>``)."""

    def prepare(self) -> None:
        """Create the local folders and prove them writable (raises OSError)."""

    def recover(self, keep_tmp: bool = False) -> None:
        """Drop what a crash left half-written locally (``tmp/``; not with ``keep_tmp``: a worker
        process of a node, whose ``tmp/`` other workers are using)."""

    def check_store(self) -> None:
        """At start-up: the store takes a write and a read (raises StoreUnusable, one line)."""

    async def check_backend(self) -> str | None:
        """Why the store cannot be used now, or None; changes nothing (admin commands)."""

    async def check_ready(self) -> str | None:
        """For /readyz: why this node cannot serve now, or None."""

    def readiness_problem(self, min_free_bytes: int) -> str | None:
        """Why the store cannot take writes now, or None (cheap: for /readyz)."""

    def location(self) -> str:
        """Where the content lives, for messages: a directory or ``s3://bucket/prefix``."""

    async def mirror_folders(self) -> list[str]:
        """The upstream folders under ``mirror/`` (a namespace with ``:`` as ``_``), sorted."""

    async def blob_sizes(self) -> dict[Digest, int]:
        """Every stored blob and its size."""

    async def blob_usage(self) -> tuple[int, int] | None:
        """Bytes and files under ``blobs/`` for the status page, or None where counting them
        would be a listing of a whole bucket (not done for a page view)."""

    def close(self) -> Deferred[None]: ...
