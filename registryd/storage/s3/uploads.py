"""Upload sessions kept in the bucket, so that any node can continue and commit them.

A body arrives into a local spool file (one per request body; ``write`` is
called synchronously from ``handleContentChunk``), hashed on the way into a
copy of the session hasher. Acknowledging it makes it durable in the bucket:
S3 parts but the last must be at least 5 MiB, so the pending bytes are the
previous tail plus the body; every full ``part_size`` of them goes up as a
part of the multipart upload of ``uploads/<id>/data-<rev>``, and the rest (less
than a part) as the new tail object. The state object is written last: it is
what makes the body acknowledged, and 202 may be sent after it.

The previous tail is fetched back into the spool for that: each spool file
starts with a sparse hole of ``part_size`` bytes, the body is written after
it and the tail lands just before it, so tail and body are one file region
and parts go up from the file as they are. This re-upload (less than one
part per body) is the only data that crosses twice; the blob itself is never
downloaded and uploaded again. The commit uploads the rest as the last part,
completes the upload and server-side copies it to the blob key; a session
that never filled a part is all in the spool at commit (tail and final body)
and is put once, straight at the blob key, after it was verified locally.

The digest is checked with this node's hasher when it saw every byte (it did
every chunk, or the session was empty), else by streaming the completed
object through a hasher. Concurrent bodies for one session on two nodes are
a client bug: each node re-reads the state before it writes it and answers
416 when another node moved it meanwhile. A race inside that window can
leave a session whose parts no longer match its state, which fails the
commit (CompleteMultipartUpload checks every part's ETag, and the digest is
checked) but never stores a blob under a digest it does not have: every
multipart upload targets a key of its own (``data-<rev>``, chosen when it is
created), so the object a commit completed, verified and copies can only be
the one its own part list made, whatever other nodes complete meanwhile.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any, Callable

import attrs
from twisted.logger import Logger

from registryd.digest import Digest
from registryd.errors import blob_upload_unknown, digest_invalid, range_invalid
from registryd.storage.guard import BlobGuard
from registryd.storage import layout
from registryd.storage.s3.bodies import FileRegion
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.documents import Part
from registryd.storage.s3.errors import S3Error, S3Unavailable
from registryd.storage.s3.settings import MAX_PART_SIZE, MIN_PART_SIZE, MiB
from registryd.storage.s3.upload_state import (
    STATE_LIMIT,
    FileSink,
    HashSink,
    S3Upload,
    S3UploadWriter,
    SessionState,
    Tail,
    data_key,
    hash_region,
    new_revision,
    state_key,
    tail_key,
)
from registryd.threads import BlockingPool, InlinePool

log = Logger()

_ID = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_ALGORITHM = "sha256"


class S3UploadStore:
    """UploadBackend on an S3 bucket shared by several nodes (see the module docstring)."""

    def __init__(self, client: S3Client, guard: BlobGuard, spool_dir: str, part_size: int = 16 * MiB, *,
                 pool: BlockingPool | InlinePool | None = None, clock: Callable[[], float] = time.time) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE}, not {part_size}")
        self._client = client
        self._guard = guard
        self._spool_dir = spool_dir
        self._part_size = part_size
        self._pool = pool or InlinePool()
        self._clock = clock
        self._sessions: dict[str, S3Upload] = {}

    def known(self, repo: str, upload_id: str) -> S3Upload | None:
        """The session if this node touched it (no I/O); its size may lag another node's."""
        upload = self._sessions.get(upload_id)
        return upload if upload is not None and upload.repo == repo else None

    async def create(self, repo: str) -> S3Upload:
        upload_id = uuid.uuid4().hex
        state = SessionState(repo, self._clock(), new_revision())
        await self._client.put_object(state_key(upload_id), state.to_json(), if_none_match=True,
                                      content_type="application/json")
        upload = self._sessions[upload_id] = S3Upload(upload_id, state)
        return upload

    async def get(self, repo: str, upload_id: str) -> S3Upload:
        """The session as the bucket has it, or BLOB_UPLOAD_UNKNOWN."""
        if not _ID.match(upload_id):
            raise blob_upload_unknown(upload_id[:64])
        state = await self._read_state(upload_id)
        if state is None or state.repo != repo:
            if state is None:
                self._sessions.pop(upload_id, None)  # finished or cancelled on another node
            raise blob_upload_unknown(upload_id)
        return self._remember(upload_id, state)

    def _remember(self, upload_id: str, state: SessionState) -> S3Upload:
        upload = self._sessions.get(upload_id)
        if upload is None:
            upload = self._sessions[upload_id] = S3Upload(upload_id, state)
        elif upload.state.revision != state.revision:
            # Another node moved it: our hasher no longer covers the session.
            upload.state, upload.hasher = state, None
        return upload

    async def _read_state(self, upload_id: str) -> SessionState | None:
        data = await self._client.get_small(state_key(upload_id), STATE_LIMIT)
        if data is None:
            return None
        try:
            return SessionState.from_json(data)
        except ValueError as e:
            log.warn("upload {upload_id}: unreadable state: {error}", upload_id=upload_id, error=str(e))
            return None

    def open_writer(self, upload: S3Upload, start: int | None, algorithm: str | None,
                    limit: int | None = None) -> S3UploadWriter:
        """Spool the next body. A ``start`` below the size this node knows is refused
        at once (sessions only grow); one above it may be right when another node
        acknowledged since, so the bucket decides at ``acknowledge``."""
        if upload.busy or (start is not None and start < upload.size):
            raise range_invalid(upload.size, upload.location())
        hasher = None
        if start is None or start == upload.size:
            if upload.hasher is not None and (algorithm is None or upload.hasher.name == algorithm):
                hasher = upload.hasher.copy()
            elif upload.size == 0:
                hasher = Digest(algorithm or DEFAULT_ALGORITHM, "").hasher()
        path = os.path.join(self._spool_dir, f"{upload.id}-{uuid.uuid4().hex}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            # Made on first need: a store opened only to read (an admin command) leaves no folder.
            os.makedirs(self._spool_dir, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            # A sparse hole: the file has its final layout (tail room, body) from the start.
            os.ftruncate(fd, self._part_size)
            os.lseek(fd, self._part_size, os.SEEK_SET)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        upload.busy = True
        begin = upload.size if start is None else start
        return S3UploadWriter(upload, upload.state, path, fd, self._part_size, hasher, begin, begin,
                              start is not None, limit)

    async def acknowledge(self, writer: S3UploadWriter) -> None:
        """Parts and tail first, the state object last; 202 may be sent after this."""
        upload = writer.upload
        try:
            state, hasher = await self._current(writer)
            if writer.written:
                offset, length = await self._pending(writer, state)
                multipart, key, parts, offset, length = await self._store_parts(
                    upload.id, state, writer.path, offset, length, final=False)
                revision = new_revision()
                tail = Tail(tail_key(upload.id, revision), length) if length else None
                if tail is not None:
                    await self._client.put_object(tail.key, FileRegion(writer.path, offset, length))
                new = attrs.evolve(state, revision=revision, size=state.size + writer.written,
                                   multipart=multipart, parts=tuple(parts), tail=tail, data=key)
                await self._check_unmoved(upload, state)
                await self._client.put_object(state_key(upload.id), new.to_json(), content_type="application/json")
                if state.tail is not None:
                    await self._delete_quietly(state.tail.key)
                state = new
            upload.state, upload.hasher = state, hasher
        finally:
            writer.close()
            upload.busy = False

    async def commit(self, writer: S3UploadWriter, digest: Digest) -> None:
        """Store the final body, verify the whole session and copy it to its blob key.

        On a mismatch everything of the session is removed and nothing is stored.
        """
        upload = writer.upload
        try:
            state, hasher = await self._current(writer)
            if hasher is not None and hasher.name != digest.algorithm:
                hasher = None
            if await self._completed_before(upload.id, state, writer):
                # An earlier try of this commit completed the upload, then the store failed:
                # the object is whole in the bucket; verify and copy it as it is.
                await self._verify_and_copy(upload.id, state.data_key(upload.id), None, digest,
                                            state.size + writer.written)
                await self._remove(upload.id, None)
                return
            offset, length = await self._pending(writer, state)
            multipart, key, parts, offset, length = await self._store_parts(upload.id, state, writer.path,
                                                                            offset, length, final=True)
            await self._check_unmoved(upload, state)
            if multipart is None:
                # Never filled a part: the whole blob is tail + body, here in the spool.
                if hasher is None:
                    hasher = await self._pool.run(hash_region, writer.path, offset, length, digest.hasher())
                await self._verify(upload.id, hasher, digest)
                self._guard.claim([digest])
                await self._client.put_object(layout.blob_key(digest), FileRegion(writer.path, offset, length))
            else:
                assert key is not None
                await self._client.complete_multipart(key, multipart, parts)
                await self._verify_and_copy(upload.id, key, hasher, digest, state.size + writer.written)
            await self._remove(upload.id, None)
        finally:
            writer.close()
            upload.busy = False

    async def _completed_before(self, upload_id: str, state: SessionState, writer: S3UploadWriter) -> bool:
        """Did a failed try of this commit already complete the multipart upload into its object?

        Then the upload is gone (no part can be added), and the object holds
        the session and this same final body, if it has their size.
        """
        if state.multipart is None:
            return False
        info = await self._client.head_object(state.data_key(upload_id))
        return info is not None and info.size == state.size + writer.written

    async def _verify_and_copy(self, upload_id: str, key: str, hasher: Any, digest: Digest, size: int) -> None:
        """Check the completed object against ``digest`` (streaming it through a hasher
        unless ``hasher`` saw every byte), then copy it to the blob key."""
        if hasher is None:
            sink = HashSink(digest.hasher())
            await self._client.get_object(key, sink)
            hasher = sink.hasher
        await self._verify(upload_id, hasher, digest)
        self._guard.claim([digest])
        await self._client.copy_large(key, layout.blob_key(digest), size)

    async def _current(self, writer: S3UploadWriter) -> tuple[SessionState, Any]:
        """The session's state in the bucket, and the hasher still valid for it (or None).

        A body without Content-Range is moved to wherever the session is now.
        """
        upload = writer.upload
        state = await self._read_state(upload.id)
        if state is None or state.repo != upload.repo:
            self._sessions.pop(upload.id, None)
            raise blob_upload_unknown(upload.id)
        hasher = writer.hasher
        if state.revision != writer.base.revision:
            hasher = None
            self._remember(upload.id, state)
        if writer.start != state.size:
            if writer.explicit:
                raise range_invalid(state.size, upload.location())
            writer.start, writer.end = state.size, state.size + writer.written
        return state, hasher

    async def _check_unmoved(self, upload: S3Upload, base: SessionState) -> None:
        """416 if another node acknowledged a body since ``base`` was read."""
        state = await self._read_state(upload.id)
        if state is None:
            self._sessions.pop(upload.id, None)
            raise blob_upload_unknown(upload.id)
        if state.revision != base.revision:
            self._remember(upload.id, state)
            raise range_invalid(state.size, upload.location())

    async def _pending(self, writer: S3UploadWriter, state: SessionState) -> tuple[int, int]:
        """Fetch the tail into the hole before the body; the region (offset, length) of both."""
        if state.tail is None:
            return writer.hole, writer.written
        offset = writer.hole - state.tail.size
        sink = FileSink(writer.fd, offset)
        try:
            await self._client.get_object(state.tail.key, sink)
        except S3Error as e:
            if e.code != "NoSuchKey":
                raise
            await self._check_unmoved(writer.upload, state)  # another node replaced it
            raise
        if sink.offset != writer.hole:
            raise S3Unavailable(f"S3 GET {state.tail.key}: {sink.offset - offset} bytes, not {state.tail.size}")
        return offset, state.tail.size + writer.written

    async def _store_parts(self, upload_id: str, state: SessionState, path: str, offset: int, length: int,
                           final: bool) -> tuple[str | None, str | None, list[Part], int, int]:
        """Upload the full parts of the region; on ``final``, the rest too, as the last part.

        Without a multipart upload and less than a part, nothing is sent. Returns
        the multipart upload id and the key it targets, all parts, and the region
        left over.
        """
        multipart, parts = state.multipart, list(state.parts)
        if multipart is None and length < self._part_size:
            return None, None, parts, offset, length
        if multipart is None:
            # Made on first need, at a key of its own; one orphaned by a failure
            # here is aborted by reap.
            key = data_key(upload_id, new_revision())
            multipart = await self._client.create_multipart(key)
        else:
            key = state.data_key(upload_id)
        while length >= self._part_size or (final and length > 0):
            size = min(self._part_size, length)
            number = len(parts) + 1
            etag = await self._client.upload_part(key, multipart, number, path, offset, size)
            parts.append(Part(number, etag, size))
            offset, length = offset + size, length - size
        return multipart, key, parts, offset, length

    async def _verify(self, upload_id: str, hasher: Any, digest: Digest) -> None:
        if hasher.hexdigest() != digest.hex:
            await self._remove(upload_id, None)
            raise digest_invalid("provided digest did not match uploaded content", str(digest))

    async def cancel(self, upload: S3Upload) -> None:
        state = await self._read_state(upload.id)
        await self._remove(upload.id, state or upload.state)

    async def _remove(self, upload_id: str, state: SessionState | None) -> None:
        """Abort the session's multipart uploads, delete its objects, the state last.

        Safe to run twice at once (two nodes reaping): every step accepts "already gone".
        """
        self._sessions.pop(upload_id, None)
        prefix = layout.upload_prefix(upload_id)
        if state is not None and state.multipart is not None:
            await self._client.abort_multipart(state.data_key(upload_id), state.multipart)
        async for orphan in self._client.list_multipart_uploads(prefix):
            await self._client.abort_multipart(orphan.key, orphan.upload_id)
        keys = [entry.key async for entry in self._client.list_objects(prefix)]
        others = [key for key in keys if key != state_key(upload_id)]
        failures = await self._client.delete_objects(others) if others else []
        if failures:
            raise S3Error(500, failures[0].code, failures[0].message, failures[0].key, "DeleteObjects")
        await self._client.delete_object(state_key(upload_id))

    async def _delete_quietly(self, key: str) -> None:
        try:
            await self._client.delete_object(key)
        except (S3Error, S3Unavailable) as e:
            # It is under the session's prefix: the commit, cancel or reap removes it.
            log.warn("could not delete {key}: {error}", key=key, error=str(e))

    async def reap(self, expiry: float) -> int:
        """Remove sessions untouched for ``expiry`` seconds and multipart uploads no
        state refers to; returns how many of both went.

        A session's age is its newest object's LastModified (the state, unless a
        body is being acknowledged right now). Sessions busy on this node are
        skipped; another node's busy ones are at worst as old as their last chunk.
        """
        cutoff = self._clock() - expiry
        before = set(self._sessions)
        busy = {upload.id for upload in self._sessions.values() if upload.busy}
        newest: dict[str, float] = {}
        async for entry in self._client.list_objects(layout.UPLOADS):
            upload_id = layout.session_of(entry.key)
            if upload_id is not None:
                newest[upload_id] = max(newest.get(upload_id, 0.0), entry.last_modified or 0.0)
        expired = {upload_id for upload_id, when in newest.items() if when < cutoff and upload_id not in busy}
        for upload_id in sorted(expired):
            await self._remove(upload_id, None)
        orphans = 0
        async for multipart in self._client.list_multipart_uploads(layout.UPLOADS):
            upload_id = layout.session_of(multipart.key)
            if upload_id in expired or upload_id in busy or (multipart.initiated or 0.0) >= cutoff:
                continue
            if upload_id in newest:
                state = await self._read_state(upload_id)
                if state is not None and state.multipart == multipart.upload_id:
                    continue
            if await self._client.abort_multipart(multipart.key, multipart.upload_id):
                orphans += 1
        for upload_id in before - newest.keys():
            upload = self._sessions.get(upload_id)
            if upload is not None and not upload.busy:
                del self._sessions[upload_id]  # committed, cancelled or reaped elsewhere
        return len(expired) + orphans
