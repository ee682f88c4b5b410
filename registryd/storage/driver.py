"""The storage driver: a flat store of keys and bytes, beneath registryd's layout.

A data directory and an S3 bucket are both this: a key is a relative path
(``blobs/sha256/ab/ab12...``, ``repositories/team/app/_manifests/tags/v1``),
its value the bytes of one file or object. Maintenance (garbage collection,
surveys, fsck) is written once over this interface, and so runs on every
driver: ``registryd.storage.fs.driver`` (the data directory),
``registryd.storage.s3.driver`` (a bucket) and ``registryd.storage.memory``
(unit tests).

Contract shared by every driver (``tests/test_driver_contract.py`` holds
each to it):

- Keys are ``/``-separated, relative, never start or end with ``/`` and
  have no empty, ``.`` or ``..`` component.
- A reader sees a whole value or none: ``write``, ``copy`` and ``move``
  never expose a partial one, and are durable once they return.
- Times are seconds since the epoch as the store keeps them (a bucket's
  LastModified is to the second, a file's mtime finer).
- Folders are the filesystem's business: a removal takes the folders it
  empties with it, below the top two levels (``blobs/<alg>/``,
  ``trash/<run>/``), which ``tidy`` removes when empty.
- A missing key is not an error: ``stat``/``read`` return None, ``delete``
  and ``move`` return False. Failures of the store itself raise (OSError on
  disk, S3Error/S3Unavailable on S3).
- Upload sessions are built body by body through ``appendable`` (see
  Appendable), each driver its own way, with the same contract.
"""
from __future__ import annotations

import builtins
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Protocol, Sequence, TypeVar, runtime_checkable

import attrs
from twisted.internet.interfaces import IConsumer

T = TypeVar("T")


@attrs.frozen
class Entry:
    """One key of a listing or a ``stat``; ``is_prefix`` for a common prefix (with a delimiter).

    ``version`` changes whenever the value is written again (an ETag, or a
    file's inode, mtime and size); compare it only with the same driver's.
    """

    key: str
    size: int = 0
    modified: float | None = None
    version: str = ""
    is_prefix: bool = False


class TooLarge(Exception):
    """``read`` found a value larger than the caller's limit."""


def too_large(key: str, limit: int) -> TooLarge:
    return TooLarge(f"{key} is larger than {limit} bytes")


def check_key(key: str) -> None:
    """ValueError for what is not a key (absolute, empty components, ``.``/``..``): it could leave the root."""
    if key and key[0] != "/" and key[-1] != "/" and "//" not in key and "." not in key and "\0" not in key:
        return  # the common case, decided without splitting (a request's key is checked on each call)
    if not key or any(part in ("", ".", "..") for part in key.split("/")) or "\0" in key:
        raise ValueError(f"not a storage key: {key!r}")


class Pool(Protocol):
    """Where blocking work runs (registryd.threads.BlockingPool, or InlinePool)."""

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


@runtime_checkable
class Driver(Protocol):
    """A store of keys and bytes (see the module's docstring for the shared contract)."""

    #: "filesystem", "s3" or "memory": for messages and metrics, never for choosing an algorithm.
    name: str

    @property
    def location(self) -> str:
        """Where the content lives, for messages: a directory, ``s3://bucket/prefix``, ``memory``."""

    def list(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[Entry]:
        """Every key that starts with ``prefix``, in key order (by code point, as S3 sorts).

        ``prefix`` is a plain string prefix (``"blobs/"``, ``"trash/run1"``).
        With ``delimiter`` (only ``"/"``), keys with a ``/`` after the prefix
        are rolled up into one entry per common prefix (``is_prefix``, its
        key ending in ``/``), in the same order. A listing runs alongside
        writes: a key written or deleted during it may or may not be in it.
        """

    async def stat(self, key: str) -> Entry | None:
        """The value's entry, or None when there is none (a directory on disk is none)."""

    async def read(self, key: str, limit: int) -> bytes | None:
        """The whole value of a small key, or None if missing; TooLarge past ``limit`` bytes."""

    async def stream(self, key: str, write: Callable[[bytes], None]) -> Entry | None:
        """Feed the whole value of ``key`` to ``write``, a chunk at a time, for a value of any size
        (fsck hashes blobs so: memory stays flat); the entry of the value read, or None if missing.

        On disk the file is read, and ``write`` called, in the driver's pool.
        """

    async def write(self, key: str, data: bytes, if_absent: bool = False, durable: bool = True) -> bool:
        """Store ``data`` as ``key``, atomically and durably: readers see the old value or the new one.

        ``if_absent``: only if ``key`` does not exist, decided atomically
        (one of two racing writers wins); returns False when it existed.
        Otherwise True. ``durable`` False: still atomic, but a crash may lose
        it (no fsync on disk) — for what is made again anyway (a mirror's links).
        """

    async def touch(self, key: str, when: float) -> None:
        """Make ``key`` an empty marker dated ``when`` (a pull time): advisory, never durable.

        Where the store keeps the writer's time (disk, memory) ``stat`` then
        says ``when``; a bucket keeps its own clock (LastModified: now).
        """

    async def copy(self, src: str, dst: str) -> bool:
        """Make ``dst`` a copy of ``src`` (atomic, durable; server-side on S3); False if ``src`` is missing."""

    async def move(self, src: str, dst: str, expect: Entry | None = None,
                   unless: Callable[[], bool] | None = None, durable: bool = True) -> bool:
        """Move ``src`` to ``dst`` (replacing it), durably; False, with nothing moved, if ``src`` is missing.

        A rename on disk and in memory (atomic); a copy, then a delete of
        ``src`` on S3 (a reader may see both for a moment, never neither).
        ``expect``: move only the value that entry describes; False,
        ``src`` left in place, if it was written again since (its version
        on disk, a later LastModified on S3). ``unless`` is asked once the
        value is safe at ``dst`` and before ``src`` goes (on disk: right
        after the rename); True puts it back, and the move returns False.
        Emptied directories go. ``durable`` False: the caller can live
        with a crash undoing the move, and the folder emptied stays until
        ``tidy`` (on disk: no fsync, no rmdir; S3 is always durable).
        """

    async def delete(self, key: str) -> bool:
        """Remove ``key`` durably; False if it was missing. Emptied directories go."""

    async def delete_many(self, keys: Sequence[str], durable: bool = True) -> builtins.list[str]:
        """Remove every key (missing ones are fine); returns those the store refused one by one.

        ``durable`` False: the caller can live with a crash bringing some
        back, and the folders emptied stay until ``tidy`` (on disk: no fsync,
        no rmdir; the caller's work ends sooner).
        """

    async def tidy(self, prefix: str) -> int:
        """Remove the empty folders under ``prefix`` (a data directory's; a bucket and memory
        have none): how many went. ``prefix`` itself stays."""

    def local_path(self, key: str) -> str | None:
        """The file holding ``key``'s value (for sendfile, rename-on-commit), or None off disk."""

    def presign(self, key: str, expires: int) -> str | None:
        """A URL that GETs ``key`` for ``expires`` seconds without credentials, or None if unsupported."""

    def threaded(self) -> tuple[Driver, Pool] | None:
        """A twin of this driver whose calls block and finish before they return, and the pool to
        run it in; None when calls need the reactor (S3) or cost nothing (memory).

        A pass of many small calls (a garbage collection) runs whole in one
        worker thread over the twin: one thread hop instead of one per file.
        """

    # -- what blobs need (registryd.storage.blobs) ----------------------------

    async def send(self, key: str, consumer: IConsumer, start: int, end: int) -> bool:
        """Write bytes ``[start, end)`` of ``key``'s value into ``consumer``, within the value
        (``0 <= start < end <= size``), registered as its streaming producer: paced by its
        backpressure, and ended by its ``stopProducing`` (CancelledError). False, with nothing
        written, if ``key`` is missing.

        A bucket streams one ranged GET; the disk and memory write chunks they read.
        """

    async def put_file(self, key: str, path: str) -> None:
        """Make the local file at ``path`` the value of ``key``, atomically and durably, consuming
        it: gone once this returns (left in place if it raises).

        For content-addressed keys (a blob), whose every writer brings the same bytes, so a value
        already there may be kept instead. On disk the file is fsynced and renamed into place
        (it must be on the data directory's filesystem); a bucket keeps a value of the same size
        (no upload) or takes one PUT up to its part size, a multipart upload above it.
        """
    # -- appendable values: upload sessions (registryd.storage.uploads) ------------

    def appendable(self, spool_dir: str, pool: Pool) -> Appendable:
        """Values built body by body under a prefix of their own (see Appendable); bodies on their
        way may be spooled in ``spool_dir`` and hashed in ``pool``."""


class BodySpool(Protocol):
    """One request body on its way into an appendable value, written chunk by chunk and
    synchronously (from handleContentChunk), to a local file or the driver's memory."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None:
        """Release the spool once its body is appended, or sealed."""

    def drop(self) -> None:
        """The body never completed: forget what of it was written, and release the spool."""


class Sealed(Protocol):
    """An appendable value made whole by ``Appendable.seal``: ready to be hashed and placed."""

    @property
    def path(self) -> str | None:
        """A local file holding exactly the value (renamed into place on commit), or None."""

    @property
    def seen(self) -> bool:
        """Whether the value is what the spooled bodies said it is (so the caller's hasher covers
        it); False when a failed earlier seal left a whole value that must be hashed again."""


#: Stores a new record, the acknowledgement of a body (see Appendable.append).
Save = Callable[[dict[str, Any]], Awaitable[None]]
#: Raises if another writer moved the value since its record was read (see Appendable).
Check = Callable[[], Awaitable[None]]


class SessionMoved(Exception):
    """Another process writes a body of this appendable value now (``size`` None), or has made it
    ``size`` bytes long since the caller looked: the caller's idea of the value is stale."""

    def __init__(self, size: int | None) -> None:
        super().__init__("another process moved the value on" if size is not None else "another process writes to the value")
        self.size = size


class Appendable(Protocol):
    """A driver's way to build a value body by body: the data of upload sessions.

    A value lives under a ``prefix`` of its own (``uploads/<id>/``), where
    the caller keeps its state too. Between two bodies it is described by a
    *record*, a small JSON object the caller stores with its state and
    hands back: where the value is in several pieces that several nodes
    continue (a bucket's multipart upload and tail), the record is the truth
    (``recorded``), rewritten through ``save`` on every body, ``check``ed
    before anything is made final. Where the value is one local file, the
    record is ``{}`` and the file's size is the value's, also after a
    restart. A body is spooled (``spool``), then ``append``ed, durably, or
    sealed with the value (``seal``), then hashed and ``place``d at its key.
    """

    #: True: the record says what the value holds and is rewritten on every append (several nodes);
    #: False: the value describes itself (``measure``) and ``save`` is never called.
    recorded: bool

    async def measure(self, prefix: str, record: dict[str, Any], size: int) -> int:
        """The value's acknowledged size: ``size`` (as stored with the record) once checked against
        ``record`` (ValueError if they disagree) where it is recorded, else the value's own (0 if none)."""

    def spool(self, prefix: str, size: int) -> BodySpool:
        """Where the next body goes, after the first ``size`` bytes (anything beyond, a body cut off,
        is dropped); cheap enough for the reactor. SessionMoved where the value shows at once that
        another process writes to it, or has made it longer than ``size``."""

    def size_now(self, prefix: str) -> int | None:
        """The value's size where the driver can tell at once (a local file: one stat), else None:
        how a worker process sees that another one moved a session on."""

    async def append(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                     save: Save, check: Check) -> None:
        """Make the ``length`` spooled bytes part of the value, durably; where recorded, ``save``
        the new record (its store is the acknowledgement), then drop what only the old one named."""

    async def seal(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                   check: Check) -> Sealed:
        """The value with the ``length`` spooled bytes after it, whole (``check`` is called
        before anything is made final)."""

    async def hash(self, sealed: Sealed, hasher: Any) -> Any:
        """Feed the whole sealed value to ``hasher`` (read back: a file, an object); returns it."""

    async def place(self, sealed: Sealed, key: str) -> None:
        """Store a sealed value that has no local ``path`` as ``key`` (a server-side copy, a PUT)."""

    async def remove(self, prefix: str, record: dict[str, Any] | None, last: str) -> None:
        """Remove the value and every key under ``prefix``, ``last`` at the very end; safe to run
        twice at once (every step accepts "already gone")."""

    async def reap_strays(self, prefix: str, cutoff: float, skip: set[str],
                          record_of: Callable[[str], Awaitable[dict[str, Any] | None]]) -> int:
        """Remove what values keep beside their keys (a bucket's multipart uploads) under ``prefix``,
        begun before ``cutoff``, whose record (``record_of`` its folder's name) does not name it,
        except in the folders ``skip`` names; how many went."""


def finish(work: Coroutine[Any, Any, T]) -> T:
    """The result of ``work``, which must complete without waiting (over a driver's threaded twin).

    For a pass running whole in a worker thread, or a command without a
    reactor. Work that waits is cancelled, and RuntimeError raised.
    """
    from twisted.internet.defer import ensureDeferred
    from twisted.python.failure import Failure

    outcome: list[Any] = []
    running = ensureDeferred(work)
    running.addBoth(outcome.append)
    if not outcome:
        running.cancel()
        raise RuntimeError("the work waited on the reactor: run it over a driver whose calls block")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]
