"""Blob upload sessions, written once over any driver: ``uploads/<id>/state`` plus the driver's data.

The session logic is here; the bytes are a driver capability,
registryd.storage.driver.Appendable, and keep each driver's fast path:

- the data directory (registryd.storage.fs.appendable): a body is written
  straight into ``uploads/<id>/data`` and fsynced, so the file's size is
  the session's, also after a restart; the commit renames it into
  ``blobs/`` (``BlobBackend.commit_file``);
- a bucket (registryd.storage.s3.appendable): a body is spooled locally,
  then its full parts go up to a multipart upload and the rest as a tail
  object; the commit completes the upload and copies it server-side;
- memory (registryd.storage.memory): a value's bytes.

What is written once, here: ids; the state document (repo, start time, a
revision new on every write, the acknowledged size and the driver's
*record* of its data, JSON); what is acknowledged (a body counts once
``acknowledge`` returns: 202 may be sent); 416 for a body that does not
start at the acknowledged end; the hasher, which covers exactly the
acknowledged bytes (each body is hashed into a copy, kept only when the
body is); digest verification before anything is stored under a digest
(with that hasher when it saw every byte, else by hashing the sealed value
again), a mismatch removing the session; cancel; the reaping of sessions
untouched for the expiry.

Where the record is the truth (``Appendable.recorded``: a bucket that
several nodes share), the state is rewritten on every acknowledged body and
any node can continue or commit a session: each re-reads the state before
it writes one and answers 416 when another node moved it meanwhile (its
revision changed); a body without Content-Range then appends wherever the
session is now. Elsewhere the state is written once and the data says how
far the session got.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Any, Callable

import attrs
from twisted.logger import Logger

from registryd.digest import Digest
from registryd.errors import blob_upload_unknown, digest_invalid, range_invalid
from registryd.storage import layout
from registryd.storage.driver import Appendable, BodySpool, Driver, SessionMoved, TooLarge
from registryd.storage.interface import BlobBackend

log = Logger()

_ID = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_ALGORITHM = "sha256"
#: A state lists at most 10000 parts of ~100 bytes each.
STATE_LIMIT = 4 * 1024 * 1024
_FIELDS = ("repo", "started", "revision", "size")


#: The state of a data directory's session written before the one upload store, and the
#: revision such a session has until its next body rewrites the state.
LEGACY_STATE = "state.json"
LEGACY_REVISION = "legacy"


def state_key(upload_id: str) -> str:
    return layout.upload_prefix(upload_id) + "state"


def new_revision() -> str:
    return uuid.uuid4().hex


@attrs.frozen
class SessionState:
    """One revision of a session as stored in its state object; ``record`` is the driver's."""

    repo: str
    started: float
    revision: str
    size: int = 0
    record: dict[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"repo": self.repo, "started": self.started, "revision": self.revision,
                           "size": self.size, **self.record}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SessionState:
        """Parse a state object; ValueError for anything that is not one."""
        try:
            raw = json.loads(data)
            return cls(str(raw["repo"]), float(raw["started"]), str(raw["revision"]), int(raw["size"]),
                       {k: v for k, v in raw.items() if k not in _FIELDS})
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"not an upload state: {e}") from None


@attrs.define(eq=False)
class Upload:
    """A session as this node last saw it; ``hasher`` covers exactly its first ``size`` bytes."""

    id: str
    state: SessionState
    size: int
    hasher: Any = None
    busy: bool = False

    @property
    def repo(self) -> str:
        return self.state.repo

    @property
    def started(self) -> float:
        return self.state.started

    @property
    def prefix(self) -> str:
        return layout.upload_prefix(self.id)

    def location(self) -> str:
        return f"/v2/{self.repo}/blobs/uploads/{self.id}"


@attrs.define(eq=False)
class UploadWriter:
    """Receives one request body into a session, hashing it into a copy of the session's hasher,
    so that a body cut off leaves the session exactly as it was acknowledged.

    ``base`` is the state the body was opened against; ``explicit`` says the
    client named ``start`` (a Content-Range), which then has to be where the
    session is, whereas a body without one appends wherever it is.
    """

    upload: Upload
    base: SessionState
    spool: BodySpool
    hasher: Any
    start: int
    end: int
    explicit: bool
    closed: bool = False

    def write(self, data: bytes) -> None:
        self.spool.write(data)
        if self.hasher is not None:
            self.hasher.update(data)
        self.end += len(data)

    @property
    def written(self) -> int:
        return self.end - self.start

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.spool.close()

    def abandon(self) -> None:
        """The body never completed: forget it, keep the session as it was acknowledged."""
        if not self.closed:
            self.closed = True
            self.spool.drop()
        self.upload.busy = False


class UploadStore:
    """Creates, continues, commits and reaps upload sessions over ``driver`` (see the module docstring)."""

    def __init__(self, driver: Driver, data: Appendable, blobs: BlobBackend, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._driver = driver
        self._data = data
        self._blobs = blobs
        self._clock = clock
        self._sessions: dict[str, Upload] = {}

    def known(self, repo: str, upload_id: str) -> Upload | None:
        """The session if this node has it in memory (no I/O); where the state is recorded,
        its size may lag another node's."""
        upload = self._sessions.get(upload_id)
        if upload is None or upload.repo != repo:
            return None
        if not upload.busy and self._data.size_now(upload.prefix) not in (None, upload.size):
            # Another worker process of this node appended to it (or finished it) since.
            del self._sessions[upload_id]
            return None
        return upload

    def open_here(self, repo: str, upload_id: str) -> bool:
        if self.known(repo, upload_id) is not None:
            return True
        path = self._driver.local_path(state_key(upload_id)) if _ID.match(upload_id) else None
        return path is not None and os.path.exists(path)

    async def create(self, repo: str) -> Upload:
        upload_id = uuid.uuid4().hex
        state = SessionState(repo, self._clock(), new_revision())
        # Not durable on disk: a session lost in a crash is restarted by its client.
        await self._driver.write(state_key(upload_id), state.to_json(), if_absent=True, durable=False)
        upload = self._sessions[upload_id] = Upload(upload_id, state, 0)
        return upload

    async def get(self, repo: str, upload_id: str) -> Upload:
        """The session as the store has it, or BLOB_UPLOAD_UNKNOWN."""
        if not _ID.match(upload_id):
            raise blob_upload_unknown(upload_id[:64])
        state = await self._read_state(upload_id)
        if state is None or state.repo != repo:
            if state is None:
                self._sessions.pop(upload_id, None)  # finished or cancelled (on another node)
            raise blob_upload_unknown(upload_id)
        upload = await self._remember(upload_id, state)
        if upload is None:
            raise blob_upload_unknown(upload_id)
        return upload

    async def _remember(self, upload_id: str, state: SessionState) -> Upload | None:
        upload = self._sessions.get(upload_id)
        if upload is not None and upload.state.revision == state.revision and (
                upload.busy or self._data.size_now(upload.prefix) in (None, upload.size)):
            return upload
        try:
            size = await self._data.measure(layout.upload_prefix(upload_id), state.record, state.size)
        except ValueError as e:
            log.warn("upload {upload_id}: unreadable state: {error}", upload_id=upload_id, error=str(e))
            return None
        if upload is None:
            upload = self._sessions[upload_id] = Upload(upload_id, state, size)
        else:
            # Another node moved it: our hasher no longer covers the session.
            upload.state, upload.size, upload.hasher = state, size, None
        return upload

    async def _read_state(self, upload_id: str) -> SessionState | None:
        try:
            data = await self._driver.read(state_key(upload_id), STATE_LIMIT)
            if data is None:
                return await self._read_legacy_state(upload_id)
            return SessionState.from_json(data)
        except (ValueError, TooLarge) as e:
            log.warn("upload {upload_id}: unreadable state: {error}", upload_id=upload_id, error=str(e))
            return None

    async def _read_legacy_state(self, upload_id: str) -> SessionState | None:
        """A data directory's session from before the one upload store (``state.json``:
        repo and start time; the data file's size is the session's), so an upgrade's restart
        keeps the sessions it acknowledged."""
        data = await self._driver.read(layout.upload_prefix(upload_id) + LEGACY_STATE, STATE_LIMIT)
        if data is None:
            return None
        try:
            raw = json.loads(data)
            return SessionState(str(raw["repo"]), float(raw["started"]), LEGACY_REVISION)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            log.warn("upload {upload_id}: unreadable state: {error}", upload_id=upload_id, error=str(e))
            return None

    def open_writer(self, upload: Upload, start: int | None, algorithm: str | None) -> UploadWriter:
        """Prepare to append a body at the acknowledged end of the session.

        ``start`` is where the client says its body begins (Content-Range):
        anything else than the end is refused with 416, except, where the
        state is recorded, a start beyond the end this node knows (another
        node may have acknowledged that far: the store decides at
        ``acknowledge``).
        """
        if upload.busy or (start is not None and (start < upload.size or start > upload.size
                                                  and not self._data.recorded)):
            raise range_invalid(upload.size, upload.location())
        hasher = None
        if start is None or start == upload.size:
            if upload.hasher is not None and (algorithm is None or upload.hasher.name == algorithm):
                hasher = upload.hasher.copy()
            elif upload.size == 0:
                hasher = Digest(algorithm or DEFAULT_ALGORITHM, "").hasher()
        try:
            spool = self._data.spool(upload.prefix, upload.size)
        except SessionMoved as moved:
            self._sessions.pop(upload.id, None)   # read it again next time
            raise range_invalid(upload.size if moved.size is None else moved.size, upload.location()) from None
        upload.busy = True
        begin = upload.size if start is None else start
        return UploadWriter(upload, upload.state, spool, hasher, begin, begin, start is not None)

    async def acknowledge(self, writer: UploadWriter) -> None:
        """Make the body durable, then count it (202 may be sent after this)."""
        upload = writer.upload
        try:
            state, hasher = await self._current(writer)
            saved: list[SessionState] = []

            async def save(record: dict[str, Any]) -> None:
                new = attrs.evolve(state, revision=new_revision(), size=writer.end, record=record)
                await self._check_unmoved(upload, state)
                await self._driver.write(state_key(upload.id), new.to_json())
                saved.append(new)

            await self._data.append(upload.prefix, state.record, writer.spool, writer.written, save,
                                    lambda: self._check_unmoved(upload, state))
            writer.close()
            if saved:
                upload.state = saved[-1]
            upload.size, upload.hasher = writer.end, hasher
        except SessionMoved as moved:
            raise self._moved(upload, moved) from None
        finally:
            writer.close()
            upload.busy = False

    async def commit(self, writer: UploadWriter, digest: Digest) -> None:
        """Verify the whole session against ``digest`` and store it as that blob, then remove it.

        On a mismatch everything of the session is removed and nothing is stored.
        """
        upload = writer.upload
        try:
            state, hasher = await self._current(writer)
            sealed = await self._data.seal(upload.prefix, state.record, writer.spool, writer.written,
                                           lambda: self._check_unmoved(upload, state))
            if hasher is None or hasher.name != digest.algorithm or not sealed.seen:
                hasher = await self._data.hash(sealed, digest.hasher())
            if hasher.hexdigest() != digest.hex:
                await self._remove(upload.id, None)
                raise digest_invalid("provided digest did not match uploaded content", str(digest))
            if sealed.path is not None:
                await self._blobs.commit_file(sealed.path, digest)
            else:
                self._blobs.guard.claim([digest])
                await self._data.place(sealed, layout.blob_key(digest))
            await self._remove(upload.id, None)
        except SessionMoved as moved:
            raise self._moved(upload, moved) from None
        finally:
            writer.close()
            upload.busy = False

    def _moved(self, upload: Upload, moved: SessionMoved) -> Exception:
        """416 for a body the value refused at append or seal (where the value checks its own
        size: another process moved it on); the session is read again next time."""
        self._sessions.pop(upload.id, None)
        return range_invalid(upload.size if moved.size is None else moved.size, upload.location())

    async def _current(self, writer: UploadWriter) -> tuple[SessionState, Any]:
        """The session's state in the store, and the hasher still valid for it (or None).

        Where the state is not recorded, this node's is the truth. Elsewhere
        it is read again; a body without Content-Range is moved to wherever
        the session is now.
        """
        upload = writer.upload
        if not self._data.recorded:
            return upload.state, writer.hasher
        state = await self._read_state(upload.id)
        if state is None or state.repo != upload.repo:
            self._sessions.pop(upload.id, None)
            raise blob_upload_unknown(upload.id)
        hasher = writer.hasher
        if state.revision != writer.base.revision:
            hasher = None
            await self._remember(upload.id, state)
        if writer.start != state.size:
            if writer.explicit:
                raise range_invalid(state.size, upload.location())
            writer.start, writer.end = state.size, state.size + writer.written
        return state, hasher

    async def _check_unmoved(self, upload: Upload, base: SessionState) -> None:
        """416 if another node acknowledged a body since ``base`` was read."""
        state = await self._read_state(upload.id)
        if state is None:
            self._sessions.pop(upload.id, None)
            raise blob_upload_unknown(upload.id)
        if state.revision != base.revision:
            await self._remember(upload.id, state)
            raise range_invalid(state.size, upload.location())

    async def cancel(self, upload: Upload) -> None:
        state = await self._read_state(upload.id) if self._data.recorded else None
        await self._remove(upload.id, (state or upload.state).record)

    async def _remove(self, upload_id: str, record: dict[str, Any] | None) -> None:
        self._sessions.pop(upload_id, None)
        await self._data.remove(layout.upload_prefix(upload_id), record, state_key(upload_id))

    async def reap(self, expiry: float) -> int:
        """Remove sessions untouched for ``expiry`` seconds, and what the driver keeps of
        sessions beside their keys that no state names; returns how many of both went.

        A session's age is its newest key's (the data's, or the state's).
        Sessions busy on this node are skipped; another node's busy ones are
        at worst as old as their last body.
        """
        cutoff = self._clock() - expiry
        before = set(self._sessions)
        busy = {upload.id for upload in self._sessions.values() if upload.busy}
        newest: dict[str, float] = {}
        async for entry in self._driver.list(layout.UPLOADS):
            upload_id = layout.session_of(entry.key)
            if upload_id is not None:
                newest[upload_id] = max(newest.get(upload_id, 0.0), entry.modified or 0.0)
        expired = {upload_id for upload_id, when in newest.items() if when < cutoff and upload_id not in busy}
        for upload_id in sorted(expired):
            await self._remove(upload_id, None)

        async def record_of(upload_id: str) -> dict[str, Any] | None:
            if upload_id not in newest:
                return None
            state = await self._read_state(upload_id)
            return None if state is None else state.record

        strays = await self._data.reap_strays(layout.UPLOADS, cutoff, expired | busy, record_of)
        await self._driver.tidy(layout.UPLOADS)  # folders a crash left empty (on disk)
        for upload_id in before - newest.keys():
            upload = self._sessions.get(upload_id)
            if upload is not None and not upload.busy:
                del self._sessions[upload_id]  # committed, cancelled or reaped elsewhere
        return len(expired) + strays
