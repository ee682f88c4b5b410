"""Blob upload sessions: ``uploads/<id>/data`` plus ``uploads/<id>/state.json``.

Bytes are written straight into the session's data file as they arrive and
hashed on the way, so the commit is one rename. A chunk is acknowledged
only once the data file is fsynced, so a session survives a restart (or a
crash) between two chunks; ``state.json`` names the repository, written once.
While the server runs, the acknowledged size is kept in memory and bytes of
a chunk that was cut off are dropped by the next write; after a restart the
file's size is the session's size (a tail cut off just before a crash can
only be the client's own bytes in order, and the digest is checked at the
end in any case).

Several worker processes serve one data directory, and a session's chunks
may land on any of them: what one process remembers of a session is used
only while the data file still has the size it acknowledged (another
process's chunk since then makes it read the session from disk again, and
the commit hashes the file), and a writer holds an exclusive ``flock`` on
the data file, so two processes never append to one session at once (the
kernel drops the lock of a process that dies).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from typing import Any

import attrs

from registryd.digest import Digest
from registryd.errors import blob_upload_unknown, digest_invalid, range_invalid
from registryd.storage.interface import BlobBackend
from registryd.storage.files import write_atomic, write_fully
from registryd.threads import BlockingPool, InlinePool

_ID = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_ALGORITHM = "sha256"
_HASH_BLOCK = 1024 * 1024


@attrs.define(eq=False)
class Upload:
    """One upload session; ``hasher`` covers exactly the first ``size`` bytes."""

    id: str
    repo: str
    directory: str
    size: int = 0
    started: float = 0.0
    hasher: Any = None
    busy: bool = False

    @property
    def data_path(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def state_path(self) -> str:
        return os.path.join(self.directory, "state.json")

    def location(self) -> str:
        return f"/v2/{self.repo}/blobs/uploads/{self.id}"


class SpooledBody:
    """What an upload writer of either driver does with each chunk of a body: spool it to
    its file, hash it (when it has a hasher) and count it."""

    fd: int
    hasher: Any
    start: int
    end: int

    def write(self, data: bytes) -> None:
        write_fully(self.fd, data)
        if self.hasher is not None:
            self.hasher.update(data)
        self.end += len(data)

    @property
    def written(self) -> int:
        return self.end - self.start


@attrs.define(eq=False)
class UploadWriter(SpooledBody):
    """Receives one request body into a session, from its acknowledged end.

    Hashes into a copy of the session hasher so that a body that is cut off
    leaves the session exactly as it was acknowledged.
    """

    upload: Upload
    fd: int
    hasher: Any
    start: int
    end: int
    limit: int | None = None
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def abandon(self) -> None:
        """The body never completed: forget it, keep the session as it was."""
        if not self.closed:
            try:
                os.ftruncate(self.fd, self.start)
            except OSError:
                pass  # the next writer truncates again
        self.close()
        self.upload.busy = False


class UploadStore:
    """Creates, resumes, commits and reaps upload sessions."""

    def __init__(self, root: str, tmp_dir: str, blobs: BlobBackend, pool: BlockingPool | InlinePool) -> None:
        self.root = root
        self._tmp = tmp_dir
        self._blobs = blobs
        self._pool = pool
        self._sessions: dict[str, Upload] = {}

    async def create(self, repo: str) -> Upload:
        """Start a session (cheap enough for the reactor: a mkdir, a small file)."""
        upload_id = uuid.uuid4().hex
        directory = os.path.join(self.root, upload_id)
        os.mkdir(directory)
        upload = Upload(upload_id, repo, directory, 0, time.time())
        try:
            open(upload.data_path, "wb").close()
            self._save_state(upload)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)  # a full disk must not leave a half session
            raise
        self._sessions[upload_id] = upload
        return upload

    def known(self, repo: str, upload_id: str) -> Upload | None:
        """The session ``upload_id`` of ``repo``, from memory or from disk (a small read)."""
        if not _ID.match(upload_id):
            return None
        upload = self._sessions.get(upload_id)
        if upload is not None and not upload.busy and not self._unchanged(upload):
            upload = None      # another process wrote to it (or removed it) since
        if upload is None:
            upload = self._load(upload_id)
        if upload is None or upload.repo != repo:
            return None
        return upload

    async def get(self, repo: str, upload_id: str) -> Upload:
        upload = self.known(repo, upload_id)
        if upload is None:
            raise blob_upload_unknown(upload_id[:64])
        return upload

    @staticmethod
    def _unchanged(upload: Upload) -> bool:
        """Is the data file still what this process acknowledged? (One stat.)"""
        try:
            return os.stat(upload.data_path).st_size == upload.size
        except OSError:
            return False

    def _load(self, upload_id: str) -> Upload | None:
        self._sessions.pop(upload_id, None)
        directory = os.path.join(self.root, upload_id)
        try:
            with open(os.path.join(directory, "state.json"), "rb") as f:
                state = json.load(f)
            size = os.stat(os.path.join(directory, "data")).st_size
            upload = Upload(upload_id, state["repo"], directory, size, float(state["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._sessions[upload_id] = upload
        return upload

    def _save_state(self, upload: Upload) -> None:
        # Not fsynced: a session lost in a crash is restarted by its client.
        state = {"repo": upload.repo, "started": upload.started}
        write_atomic(self._tmp, upload.state_path, json.dumps(state).encode(), durable=False)

    def open_writer(self, upload: Upload, start: int | None, algorithm: str | None,
                    limit: int | None = None) -> UploadWriter:
        """Prepare to append a body at the acknowledged end of the session.

        ``start`` is where the client says its chunk begins (Content-Range);
        anything else than the current end is refused with 416.
        """
        if upload.busy or (start is not None and start != upload.size):
            raise range_invalid(upload.size, upload.location())
        fd = os.open(upload.data_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # Another process is writing a chunk of this session: as busy here.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise range_invalid(upload.size, upload.location()) from None
        try:
            on_disk = os.fstat(fd).st_size
            if on_disk > upload.size:
                # Another process appended to the session since this one looked: its end counts.
                upload.size, upload.hasher = on_disk, None
                if start is not None and start != on_disk:
                    raise range_invalid(upload.size, upload.location())
            # Drop whatever a cut-off body left behind the acknowledged end.
            os.ftruncate(fd, upload.size)
            os.lseek(fd, upload.size, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        hasher = None
        if upload.hasher is not None and (algorithm is None or upload.hasher.name == algorithm):
            hasher = upload.hasher.copy()
        elif upload.size == 0:
            hasher = Digest(algorithm or DEFAULT_ALGORITHM, "").hasher()
        upload.busy = True
        return UploadWriter(upload, fd, hasher, upload.size, upload.size, limit)

    async def acknowledge(self, writer: UploadWriter) -> None:
        """Make the chunk durable, then count it (202 may be sent after this)."""
        upload = writer.upload
        try:
            await self._pool.run(os.fsync, writer.fd)
            writer.close()
            upload.size, upload.hasher = writer.end, writer.hasher
        finally:
            writer.close()
            upload.busy = False

    async def commit(self, writer: UploadWriter, digest: Digest) -> None:
        """Verify the whole session against ``digest`` and move it into the blob store.

        On a mismatch the session is removed and nothing is stored.
        """
        upload = writer.upload
        try:
            writer.close()
            hasher = writer.hasher
            if hasher is None or hasher.name != digest.algorithm:
                hasher = await self._pool.run(_hash_file, upload.data_path, digest.algorithm)
            actual = hasher.hexdigest()
            if actual != digest.hex:
                await self.cancel(upload)
                raise digest_invalid("provided digest did not match uploaded content", str(digest))
            await self._blobs.commit_file(upload.data_path, digest)
            await self.cancel(upload)
        finally:
            upload.busy = False

    async def cancel(self, upload: Upload) -> None:
        self._sessions.pop(upload.id, None)
        await self._pool.run(shutil.rmtree, upload.directory, True)

    async def reap(self, expiry: float) -> int:
        """Remove sessions untouched for ``expiry`` seconds; returns how many."""
        busy = {u.id for u in self._sessions.values() if u.busy}
        removed = await self._pool.run(self._reap_blocking, expiry, busy)
        for upload_id in removed:
            self._sessions.pop(upload_id, None)
        return len(removed)

    def _reap_blocking(self, expiry: float, busy: set[str]) -> list[str]:
        cutoff = time.time() - expiry
        removed = []
        for entry in os.scandir(self.root):
            if entry.name in busy or not entry.is_dir():
                continue
            try:
                touched = max(os.stat(os.path.join(entry.path, name)).st_mtime
                              for name in ("state.json", "data") if os.path.exists(os.path.join(entry.path, name)))
            except (OSError, ValueError):
                touched = 0
            if touched < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        return removed


def _hash_file(path: str, algorithm: str) -> Any:
    hasher = Digest(algorithm, "").hasher()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher
