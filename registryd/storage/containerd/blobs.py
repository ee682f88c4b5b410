"""Blobs in containerd's content store (a BlobBackend), and the leases that keep new ones.

A GET is sent with sendfile from containerd's own file
(``<content_dir>/blobs/<alg>/<hex>``) when registryd can read it, which it
can on the same machine as root; otherwise it streams through the content
service's ``Read``, a chunk at a time, as fast as the client takes it.

Content registryd writes (a pushed blob, a manifest, a mirror fill) is
written through the content service under a lease (``RecentLeases``) that
containerd's GC keeps for ``keep`` seconds: long enough for the manifest
that names a pushed blob to arrive. From then on that manifest's image and
its ``gc.ref`` labels keep the blob, and when the image goes the GC takes it.
"""
from __future__ import annotations

import errno
import os
import time
import uuid
from typing import Any, BinaryIO, Callable, Iterator

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer

from registryd.digest import Digest
from registryd.errors import digest_invalid
from registryd.storage.containerd.client import ContainerdClient, NotFound
from registryd.storage.containerd.joined import written_by_another
from registryd.storage.guard import BlobGuard
from registryd.storage.interface import BlobGone
from registryd.storage.paced import Paced
from registryd.storage.blobs import FileBlobSource

#: Bytes asked of the content service's Read at once when streaming a blob to a client.
READ_CHUNK = 1024 * 1024
#: Bytes sent in one Write message: containerd spends less CPU per byte on fewer, larger messages
#: (its CPU is what a fill waits for); far below its 16 MiB limit, and at most
#: client.WRITE_WINDOW of them wait at once.
WRITE_CHUNK = 4 * 1024 * 1024


def rfc3339(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class RecentLeases:
    """One lease per period of time for what registryd wrote in it, each dropped by containerd's GC
    ``keep`` seconds after its period ends (label ``containerd.io/gc.expire``)."""

    PREFIX = "registryd-recent-"

    def __init__(self, client: ContainerdClient, keep: float, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._keep = keep
        self._clock = clock
        # A period of a quarter of the time kept (at least a second): a few leases live at once.
        self._period = max(1, int(keep // 4))
        self._made: str | None = None

    async def current(self) -> str:
        """The lease for content written now (created on first use in its period)."""
        now = self._clock()
        start = int(now // self._period) * self._period
        lease = f"{self.PREFIX}{start}"
        if lease != self._made:
            await self._client.create_lease(lease, rfc3339(start + self._period + self._keep))
            self._made = lease
        return lease


class StreamedBlobSource:
    """A blob sent through the content service's Read, one chunk ahead of the client."""

    def __init__(self, client: ContainerdClient, digest: Digest, size: int) -> None:
        self._client = client
        self._digest = digest
        self.size = size

    def local_file(self) -> BinaryIO | None:
        return None

    async def send(self, consumer: IConsumer, start: int, end: int) -> None:
        if end <= start:
            return
        paced = Paced()
        consumer.registerProducer(paced, True)
        try:
            position = start
            pending: Deferred[bytes] | None = Deferred.fromCoroutine(self._read(position, end))
            while pending is not None:
                try:
                    data = await pending
                except NotFound:
                    if position == start:
                        raise BlobGone(errno.ENOENT, "the blob was deleted before it was sent",
                                       str(self._digest)) from None
                    raise
                position += len(data)
                # The next chunk is asked for while this one goes out.
                pending = Deferred.fromCoroutine(self._read(position, end)) if position < end else None
                consumer.write(data)
                try:
                    await paced.ready()
                except CancelledError:   # the client went away
                    if pending is not None:
                        pending.addErrback(lambda _: None)
                    return
        finally:
            # A request whose client went away has no channel left to unregister from.
            if getattr(consumer, "channel", True) is not None:
                consumer.unregisterProducer()

    async def _read(self, position: int, end: int) -> bytes:
        data = await self._client.read(str(self._digest), position, min(READ_CHUNK, end - position))
        if not data:
            raise OSError(f"containerd's content {self._digest} ended at {position} of {end} bytes")
        return data

    def redirect_url(self, expires: int) -> str | None:
        return None

    def close(self) -> None:
        pass


def sha256_only(digest: Digest) -> None:
    """containerd's content store addresses content by sha256 alone: refuse any other algorithm
    (400 DIGEST_INVALID) before anything is written."""
    if digest.algorithm != "sha256":
        raise digest_invalid(f"containerd's content store holds sha256 content only, not {digest.algorithm}",
                             str(digest)[:150])


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(WRITE_CHUNK):
            yield chunk


class ContainerdBlobs:
    """BlobBackend over containerd's content service (see the module docstring)."""

    def __init__(self, client: ContainerdClient, guard: BlobGuard, leases: RecentLeases, content_dir: str,
                 reactor: Any = None) -> None:
        """``reactor``: where a fill waits for another writer of the same content (joined); None: never waits."""
        self._client = client
        self._reactor = reactor
        self.guard = guard
        self.leases = leases
        self.content_dir = content_dir

    def file_path(self, digest: Digest) -> str | None:
        """containerd's file of ``digest`` in its content folder, or None without one configured."""
        return os.path.join(self.content_dir, "blobs", digest.algorithm, digest.hex) if self.content_dir else None

    async def size(self, digest: Digest) -> int | None:
        info = await self._client.info(str(digest))
        return info.size if info is not None else None

    async def open(self, digest: Digest) -> FileBlobSource | StreamedBlobSource | None:
        info = await self._client.info(str(digest))
        if info is None:
            return None
        path = self.file_path(digest)
        if path is not None:
            try:
                file = open(path, "rb")   # one open and fstat: as cheap as the filesystem store's
            except OSError:
                pass   # not on this machine, or not ours to read: through the content service
            else:
                if os.fstat(file.fileno()).st_size == info.size:
                    return FileBlobSource(file, info.size)
                file.close()
        return StreamedBlobSource(self._client, digest, info.size)

    async def read(self, digest: Digest, limit: int) -> bytes | None:
        info = await self._client.info(str(digest))
        if info is None:
            return None
        try:
            return await self._client.read(str(digest), 0, min(info.size, limit)) if info.size else b""
        except NotFound:
            return None

    async def put(self, digest: Digest, data: bytes) -> None:
        sha256_only(digest)
        self.guard.claim([digest])
        lease = await self.leases.current()
        await self._client.write(f"registryd-put-{uuid.uuid4().hex}", [data], len(data), str(digest), lease)

    async def commit_file(self, path: str, digest: Digest) -> None:
        """Write a verified local file into containerd (read in the client's thread), then remove it."""
        sha256_only(digest)
        self.guard.claim([digest])
        lease = await self.leases.current()
        size = os.stat(path).st_size
        try:
            if self._reactor is not None and await written_by_another(self._client, self._reactor, digest):
                await self._client.add_to_lease(lease, str(digest))   # no byte written twice
                return
            await self._client.write(f"registryd-file-{uuid.uuid4().hex}", _file_chunks(path), size,
                                     str(digest), lease)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    async def delete(self, digest: Digest) -> bool:
        return await self._client.delete_content(str(digest))

