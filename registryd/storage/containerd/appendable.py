"""Upload session data in containerd's ingest: the bytes of a session are never a local copy.

Each session is an ingest of containerd's content service, ref
``registryd-upload-<id>``, opened under a lease of the same name (created
with the session's first body, dropped by containerd's GC after
``SESSION_LEASE`` seconds should registryd never reap it), so containerd's
garbage collector never removes a session mid-upload.

A body arrives into a local spool file (unlinked at once: a crash leaves
nothing); appending it sends it into the ingest through the content
service's Write, which then holds it. A Write stream cannot outlive one
request of the client, so each body opens one, resumes at the ingest's
offset and closes it without committing. The ingest's offset is the
session's size, also after a restart of registryd (``measure`` asks
containerd), and the Write's check of that offset refuses a body that
does not start there (another worker process moved the session:
SessionMoved). Sealing appends the last body; containerd answers the
digest of the whole ingest, so a hasher lost in a restart costs no second
read. Each append sets ``<prefix>ingested`` in the data directory to the
ingest's length, as a sparse file (no block of it is allocated): its
length tells the worker processes of the node at once how far the session
got (``size_now``), its time tells the reaper the session's last body. Placing commits the ingest with the expected digest and size
(containerd verifies both) under the lease of recent content
(blobs.RecentLeases, as every blob registryd writes). Removing a session
aborts its ingest and drops its lease. The session's state stays in the
data directory (an FsDriver), as on the filesystem store.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Awaitable, Callable, Iterator

import attrs

from registryd.digest import Digest
from registryd.storage import layout
from registryd.storage.containerd.blobs import WRITE_CHUNK, RecentLeases, rfc3339, sha256_only
from registryd.storage.containerd.client import AlreadyExists, ContainerdClient, IngestElsewhere
from registryd.storage.driver import BodySpool, Check, Pool, Save, Sealed, SessionMoved
from registryd.storage.files import write_fully

#: The sparse file in the session's folder as long as its ingest, of the time of its last body.
MARK = "ingested"
#: The ref of a session's ingest and the id of its lease.
PREFIX = "registryd-upload-"
#: Seconds containerd keeps a session's lease (and its ingest) should registryd never reap it.
SESSION_LEASE = 7 * 24 * 3600


def session_ref(prefix: str) -> str:
    """``registryd-upload-<id>`` for ``uploads/<id>/``."""
    return PREFIX + prefix.rstrip("/").rsplit("/", 1)[-1]


class IngestSpool:
    """One body in an anonymous local file, sent into the ingest at ``append`` or ``seal``."""

    def __init__(self, spool_dir: str, start: int) -> None:
        self.start = start
        fd, path = tempfile.mkstemp(prefix="upload-", dir=spool_dir)
        os.unlink(path)
        self.fd = fd
        self._closed = False

    def write(self, data: bytes) -> None:
        write_fully(self.fd, data)

    def chunks(self, length: int) -> Iterator[bytes]:
        """The body, read in the client's thread."""
        offset = 0
        while offset < length:
            chunk = os.pread(self.fd, min(WRITE_CHUNK, length - offset), offset)
            if not chunk:
                raise OSError(f"the spooled body ended at {offset} of {length} bytes")
            yield chunk
            offset += len(chunk)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def drop(self) -> None:
        self.close()


@attrs.frozen
class SealedIngest:
    ref: str
    size: int
    digest: str
    path: None = None
    seen: bool = True


@attrs.frozen
class KnownHash:
    """A hasher's result that containerd computed over the ingest (sha256)."""

    name: str
    hex: str

    def hexdigest(self) -> str:
        return self.hex


class ContainerdAppendable:
    """registryd.storage.driver.Appendable over containerd's ingests (see the module docstring)."""

    recorded = False

    def __init__(self, client: ContainerdClient, leases: RecentLeases, path: Callable[[str], str],
                 spool_dir: str, pool: Pool, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._leases = leases
        self._path = path            # a key's file in the data directory (FsDriver.path)
        self._spool_dir = spool_dir
        self._pool = pool
        self._clock = clock

    async def measure(self, prefix: str, record: dict[str, Any], size: int) -> int:
        ref = session_ref(prefix)
        for status in await self._client.statuses([f"ref=={ref}"]):
            if status.ref == ref:
                return int(status.offset)
        return 0

    def spool(self, prefix: str, size: int) -> IngestSpool:
        return IngestSpool(self._spool_dir, size)

    def size_now(self, prefix: str) -> int | None:
        """The ingest's size as the last append here or in another worker process left it
        (the mark's length); containerd checks the offset at every append in any case."""
        try:
            return os.stat(self._path(prefix + MARK)).st_size
        except FileNotFoundError:
            return 0   # nothing written yet (or the session is gone: then its state is too)

    async def _lease(self, ref: str) -> str:
        await self._client.create_lease(ref, rfc3339(self._clock() + SESSION_LEASE))
        return ref

    async def _send(self, prefix: str, spool: BodySpool, length: int) -> str:
        """Send the spooled body into the ingest; containerd's digest of the whole ingest."""
        assert isinstance(spool, IngestSpool)
        ref = session_ref(prefix)
        lease = await self._lease(ref)
        try:
            reply = await self._client.ingest(ref, spool.chunks(length), spool.start, lease, length=length)
        except IngestElsewhere as e:
            raise SessionMoved(e.offset) from None
        await self._pool.run(_mark, self._path(prefix + MARK), spool.start + length)
        return str(reply.digest)

    async def append(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                     save: Save, check: Check) -> None:
        await self._send(prefix, spool, length)

    async def seal(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                   check: Check) -> SealedIngest:
        assert isinstance(spool, IngestSpool)
        digest = await self._send(prefix, spool, length)
        return SealedIngest(session_ref(prefix), spool.start + length, digest)

    async def hash(self, sealed: Sealed, hasher: Any) -> Any:
        """containerd's digest of the ingest, when the hasher asks for sha256 (its only algorithm)."""
        assert isinstance(sealed, SealedIngest)
        algorithm, _, hex_digest = sealed.digest.partition(":")
        if algorithm != hasher.name or not hex_digest:
            return hasher   # hashes nothing: no digest of another algorithm matches it
        return KnownHash(algorithm, hex_digest)

    async def place(self, sealed: Sealed, key: str) -> None:
        """Commit the ingest as the blob ``key`` names: containerd checks its size and digest."""
        assert isinstance(sealed, SealedIngest)
        digest = blob_digest(key)
        if digest.algorithm != "sha256":
            # The session can never become a blob here: let it go at once (400 DIGEST_INVALID).
            await self._client.abort(sealed.ref)
            await self._client.delete_lease(sealed.ref)
            sha256_only(digest)
        lease = await self._leases.current()
        try:
            await self._client.ingest(sealed.ref, (), sealed.size, lease, commit=(sealed.size, str(digest), {}))
        except AlreadyExists:
            await self._client.abort(sealed.ref)
            await self._client.add_to_lease(lease, str(digest))
        except IngestElsewhere as e:
            raise SessionMoved(e.offset) from None

    async def remove(self, prefix: str, record: dict[str, Any] | None, last: str) -> None:
        ref = session_ref(prefix)
        await self._client.abort(ref)
        await self._client.delete_lease(ref)
        await self._pool.run(shutil.rmtree, self._path(prefix.rstrip("/")), True)

    async def reap_strays(self, prefix: str, cutoff: float, skip: set[str],
                          record_of: Callable[[str], Awaitable[dict[str, Any] | None]]) -> int:
        """Ingests and leases of sessions whose state is gone (a crash between the two)."""
        gone = 0
        for lease in await self._client.leases():
            if not lease.id.startswith(PREFIX):
                continue
            upload_id = lease.id[len(PREFIX):]
            if upload_id in skip or lease.created_at.seconds >= cutoff or await record_of(upload_id) is not None:
                continue
            await self._client.abort(lease.id)
            await self._client.delete_lease(lease.id)
            gone += 1
        return gone


def _mark(path: str, size: int) -> None:
    with open(path, "ab") as f:
        f.truncate(size)   # a hole: no block is allocated
    os.utime(path)


def blob_digest(key: str) -> Digest:
    """The digest a ``blobs/<alg>/<xx>/<hex>`` key names."""
    algorithm, _, rest = key[len(layout.BLOBS):].partition("/")
    return Digest(algorithm, rest.rsplit("/", 1)[-1])
