"""One upstream fetch per blob for every worker process of a node.

Within one process, clients of one fill share a BlobFill. Across the
workers of a node ([server] workers), the fill's files under
``tmp/fills/<key>`` are the shared state:

* ``.lock``: the process that fetches holds an exclusive ``flock`` on it
  for the whole transfer (the claim). The kernel drops the lock of a
  process that dies, which is how the others notice a worker killed
  mid-fill.
* ``.meta``: written (atomically) once the upstream answered: the
  transfer's id and size. ``.<id>.part``: the partial file itself.
* ``.end``: ``verified`` once the digest matched (every byte may go to
  clients), then ``stored`` or ``failed`` (with the reason).

A process that cannot take the lock follows the fill (``RemoteFill``): it
tails the partial file with short polls and serves its clients from it
exactly as the fetching process does, the blob's last byte held back until
``.end`` says ``verified``. If the lock comes free with neither ``stored``
nor ``verified`` written, the fetching process died: the followers' clients
are cut off (never a body that looks complete) and their next request
starts the fill again. A follower whose clients have not been sent anything
yet takes the claim itself instead.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import uuid
from typing import Any, Iterable

from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from registryd.deferreds import Shared
from registryd.digest import Digest
from registryd.mirror.fill import BlobFill, FillFailed

log = Logger()

FOLDER = "fills"
#: How often a follower looks at the partial file and the markers.
POLL = 0.02
#: How long a finished fill's end marker stays for followers that poll late.
END_KEPT = 60.0


def claim_prefix(tmp_dir: str, folder: str, key: Iterable[str]) -> str:
    """Where the files of one node-wide claim on ``key`` live, in ``tmp/<folder>/`` (created if need be)."""
    path = os.path.join(tmp_dir, folder)
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, hashlib.sha256("\0".join(key).encode()).hexdigest()[:40])


def fill_prefix(tmp_dir: str, namespace: str, remote: str, digest: Digest) -> str:
    """Where one fill's shared files live (created if need be)."""
    return claim_prefix(tmp_dir, FOLDER, (namespace, remote, str(digest)))


def _write(path: str, document: dict[str, Any]) -> None:
    """A small marker, replaced atomically (not fsynced: it only matters while the node runs)."""
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "w") as f:
        json.dump(document, f)
    os.rename(temporary, path)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            document = json.load(f)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class FillClaim:
    """This process fetches the blob for the whole node (it holds the ``.lock``)."""

    def __init__(self, prefix: str, fd: int, reactor: Any) -> None:
        self.prefix = prefix
        self._fd: int | None = fd
        self._reactor = reactor
        self.id = uuid.uuid4().hex
        self.part_path = f"{prefix}.{self.id}.part"

    @classmethod
    def take(cls, prefix: str, reactor: Any) -> FillClaim | None:
        """The claim, or None if another process holds it."""
        lock = prefix + ".lock"
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return cls(prefix, fd, reactor)
            os.close(fd)    # the last holder removed that file as we locked it: take the new one

    def prepare(self) -> None:
        """Remove what an earlier transfer left (a dead process's partial file and markers)."""
        for path in glob.glob(glob.escape(self.prefix) + ".*.part"):
            _unlink(path)
        _unlink(self.prefix + ".meta")
        _unlink(self.prefix + ".end")

    def started(self, size: int | None) -> None:
        _write(self.prefix + ".meta", {"id": self.id, "size": size, "part": self.part_path})

    def verified(self) -> None:
        _write(self.prefix + ".end", {"id": self.id, "state": "verified"})

    def finished(self, error: str | None) -> None:
        """Say how it ended, then let go of the claim."""
        if self._fd is None:
            return
        state = {"id": self.id, "state": "stored" if error is None else "failed", "error": error}
        _write(self.prefix + ".end", state)
        self._reactor.callLater(END_KEPT, self._forget_end)
        self.release()

    def release(self) -> None:
        """Let go of the claim (removing the lock file while it is still ours)."""
        if self._fd is None:
            return
        _unlink(self.prefix + ".meta")
        _unlink(self.prefix + ".lock")
        os.close(self._fd)
        self._fd = None

    def _forget_end(self) -> None:
        end = _read(self.prefix + ".end")
        if end is not None and end.get("id") == self.id:
            _unlink(self.prefix + ".end")


def _alive(lock_fd: int) -> bool:
    """Does a process still hold the claim whose lock file ``lock_fd`` is?"""
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lock_fd, fcntl.LOCK_UN)
    return False


class RemoteFill(BlobFill):
    """A fill another worker process runs, followed here through its files.

    ``retry`` is set (instead of ``start_error``) when the claim came free
    before the transfer began: the caller then tries to take it.
    """

    def __init__(self, digest: Digest, prefix: str, reactor: Any, idle_timeout: float) -> None:
        super().__init__(digest, os.path.dirname(prefix), reactor, idle_timeout, _no_commit)
        self.prefix = prefix
        self.path = prefix + ".none"     # no such file: until the transfer is found
        self.retry = False
        self._lock_fd: int | None = None
        self._part_fd: int | None = None
        self._id: str | None = None
        self._poll = LoopingCall(self._tick)
        self._poll.clock = reactor
        self.started = Shared(self._follow())

    async def _follow(self) -> None:
        try:
            self._lock_fd = os.open(self.prefix + ".lock", os.O_RDONLY)
        except FileNotFoundError:
            self.retry = True
            return
        while not self._look_for_transfer():
            await deferLater(self._reactor, POLL, lambda: None)
        if self.retry or self.finished:
            self._close_files()
            return
        self._poll.start(POLL, now=False).addErrback(
            lambda f: log.failure("following the fill of {digest} failed", f, digest=str(self.digest)))

    def _look_for_transfer(self) -> bool:
        """One look for the transfer's start: True once there is an answer."""
        meta = _read(self.prefix + ".meta")
        if meta is not None:
            self._id = str(meta.get("id"))
            size = meta.get("size")
            self.size = size if isinstance(size, int) else None
            try:
                part = str(meta.get("part"))
                self._part_fd = os.open(part, os.O_RDONLY)
                # The same file, even once moved into the store or removed (by name without /proc).
                self.path = f"/proc/self/fd/{self._part_fd}" if os.path.isdir("/proc/self/fd") else part
            except FileNotFoundError:
                self._read_end()    # ended already: stored, failed, or its process died
                if not self.finished:
                    assert self._lock_fd is not None
                    if self.verified and _alive(self._lock_fd):
                        return False    # being moved into the store: its end comes next
                    self.retry = True
            return True
        assert self._lock_fd is not None
        if not _alive(self._lock_fd):
            # Free, and no transfer began: it failed to start, or its process died first.
            self.retry = True
            return True
        return False

    def _tick(self) -> None:
        if self._part_fd is not None:
            self.written = os.fstat(self._part_fd).st_size
        self._read_end()
        if not self.finished and not self.verified and self._lock_fd is not None and not _alive(self._lock_fd):
            self._read_end()     # it may have written its end just before letting go
            if not self.finished:
                self.fail(FillFailed("the worker process fetching it stopped"))
        elif self.verified and not self.finished and self._lock_fd is not None and not _alive(self._lock_fd):
            self._read_end()
            if not self.finished:
                # Verified bytes, but not stored: they may all go to the clients; it is fetched again later.
                self.fail(FillFailed("the worker process storing it stopped"))
        if self.finished:
            self._close_files()
            if self._poll.running:
                self._poll.stop()
        else:
            self._wake()

    def _read_end(self) -> None:
        end = _read(self.prefix + ".end")
        if end is None or end.get("id") != self._id:
            return
        if self._part_fd is not None:
            self.written = os.fstat(self._part_fd).st_size
        state = end.get("state")
        if state in ("verified", "stored"):
            if not self.verified:
                self.verified = True
                self._wake()
        if state == "stored" and not self.finished:
            self.done = True
            self._finish()
        elif state == "failed":
            self.fail(FillFailed(str(end.get("error") or "the transfer failed")))

    def fail(self, error: FillFailed) -> None:
        """Failed in the process that fetched it: tell this process's clients (its files are not ours)."""
        if self.finished:
            return
        self.error = error
        self._finish()

    def _close_files(self) -> None:
        # Clients that come now find no file: served from the store, or told of the failure.
        self.path = self.prefix + ".none"
        for name in ("_lock_fd", "_part_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


async def _no_commit(path: str, digest: Digest) -> None:
    raise AssertionError("a followed fill is stored by the process that fetches it")


def sweep_abandoned(tmp_dir: str, older_than: float, now: float) -> int:
    """Remove the files of fills whose worker died and whose blob nobody asked for since
    (blocking: for the IO pool); returns how many. Run by the worker that runs the timers.

    A dead worker's partial file stays until the next request for its blob takes the claim;
    this takes it instead, once the files are ``older_than`` seconds old.
    """
    folder = os.path.join(tmp_dir, FOLDER)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if not name.endswith(".lock"):
            continue
        prefix = os.path.join(folder, name[:-len(".lock")])
        try:
            if now - os.stat(prefix + ".lock").st_mtime < older_than:
                continue
        except FileNotFoundError:
            continue
        claim = FillClaim.take(prefix, None)
        if claim is None:
            continue    # a live transfer
        parts = glob.glob(glob.escape(prefix) + ".*.part")
        claim.prepare()
        _unlink(prefix + ".end")
        claim.release()
        removed += len(parts)
    return removed
