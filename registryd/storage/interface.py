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

from typing import Any, BinaryIO, Protocol

from twisted.internet.interfaces import IConsumer

from registryd.digest import Digest
from registryd.storage.guard import BlobGuard


class StoreUnusable(Exception):
    """At start-up: the store cannot be written and read; the message is one line for the operator."""


class BlobSource(Protocol):
    """An open blob, ready to be sent to a client."""

    size: int

    def local_file(self) -> BinaryIO | None:
        """A real file to hand to sendfile, or None when the bytes are elsewhere."""

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        """Write bytes ``[start, end)`` to ``consumer``, honouring its backpressure."""

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


class UploadBackend(Protocol):
    """Upload sessions that any node can continue and commit."""

    def known(self, repo: str, upload_id: str) -> Any | None:
        """The session if this node can answer without waiting (memory, a small local read),
        else None: then ``get`` says whether it exists."""

    async def create(self, repo: str) -> Any: ...

    async def get(self, repo: str, upload_id: str) -> Any:
        """The session, or raise BLOB_UPLOAD_UNKNOWN."""

    def open_writer(self, upload: Any, start: int | None, algorithm: str | None,
                    limit: int | None = None) -> UploadWriter:
        """Append the next body at the acknowledged end (416 for any other ``start``)."""

    async def acknowledge(self, writer: UploadWriter) -> None:
        """Make the body durable and count it; 202 may be sent after this."""

    async def commit(self, writer: UploadWriter, digest: Digest) -> None:
        """Verify the whole session against ``digest`` and store it as that blob."""

    async def cancel(self, upload: Any) -> None: ...

    async def reap(self, expiry: float) -> int:
        """Remove sessions untouched for ``expiry`` seconds; how many went."""
