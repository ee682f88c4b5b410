"""What an upload session is, in the bucket and in a node's memory, and its body writer.

A session is ``uploads/<id>/state`` (JSON, rewritten on every acknowledged
body: it *is* the acknowledgement), the multipart upload that targets
``uploads/<id>/data`` and at most one tail object. Any node can load it;
the ``revision`` (new on every write) tells a node whether what it holds in
memory, its hasher above all, still describes the bucket.

Tails are named after the revision that wrote them, so a body that fails
half-way, or a racing node, never overwrites the tail the current state
points at; the previous tail is deleted once the new state is written.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import attrs

from registryd.storage.uploads import SpooledBody
from registryd.storage import layout
from registryd.storage.sink import Sink
from registryd.storage.s3.documents import Part

#: A state lists at most 10000 parts of ~100 bytes each.
STATE_LIMIT = 4 * 1024 * 1024


def state_key(upload_id: str) -> str:
    return layout.upload_prefix(upload_id) + "state"


def data_key(upload_id: str, revision: str | None = None) -> str:
    """The key a multipart upload of the session targets (and the object it completes into).

    Each multipart upload gets a key of its own (``data-<revision>``): an
    object completed there was written by that one upload and nothing else,
    so a commit that verified it copies exactly what it verified. Sessions
    from before had one shared ``data`` key (``revision`` None).
    """
    suffix = "data" if revision is None else f"data-{revision}"
    return layout.upload_prefix(upload_id) + suffix


def tail_key(upload_id: str, revision: str) -> str:
    return layout.upload_prefix(upload_id) + f"tail-{revision}"


def new_revision() -> str:
    return uuid.uuid4().hex


@attrs.frozen
class Tail:
    """The acknowledged bytes after the last full part (fewer than a part)."""

    key: str
    size: int


@attrs.frozen
class SessionState:
    """One revision of a session as stored in its state object."""

    repo: str
    started: float
    revision: str
    size: int = 0
    multipart: str | None = None
    parts: tuple[Part, ...] = ()
    tail: Tail | None = None
    data: str | None = None         # the key ``multipart`` targets (None: the legacy ``data``)

    def data_key(self, upload_id: str) -> str:
        return self.data if self.data is not None else data_key(upload_id)

    def to_json(self) -> bytes:
        return json.dumps({
            "repo": self.repo, "started": self.started, "revision": self.revision, "size": self.size,
            "multipart": self.multipart, "data": self.data,
            "parts": [{"number": p.number, "etag": p.etag, "size": p.size} for p in self.parts],
            "tail": None if self.tail is None else {"key": self.tail.key, "size": self.tail.size},
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SessionState:
        """Parse a state object; ValueError for anything that is not one."""
        try:
            raw = json.loads(data)
            parts = tuple(Part(int(p["number"]), str(p["etag"]), int(p["size"])) for p in raw["parts"])
            tail = raw["tail"]
            state = cls(str(raw["repo"]), float(raw["started"]), str(raw["revision"]), int(raw["size"]),
                        None if raw["multipart"] is None else str(raw["multipart"]), parts,
                        None if tail is None else Tail(str(tail["key"]), int(tail["size"])),
                        None if raw.get("data") is None else str(raw["data"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"not an upload state: {e}") from None
        tail_size = 0 if state.tail is None else state.tail.size
        if sum(p.size for p in state.parts) + tail_size != state.size:
            raise ValueError("upload state: parts and tail do not add up to its size")
        return state


@attrs.define(eq=False)
class S3Upload:
    """A session as this node last saw it; ``hasher`` covers exactly ``state.size`` bytes."""

    id: str
    state: SessionState
    hasher: Any = None
    busy: bool = False

    @property
    def repo(self) -> str:
        return self.state.repo

    @property
    def size(self) -> int:
        return self.state.size

    @property
    def started(self) -> float:
        return self.state.started

    def location(self) -> str:
        return f"/v2/{self.repo}/blobs/uploads/{self.id}"


@attrs.define(eq=False)
class S3UploadWriter(SpooledBody):
    """Spools one request body after a ``hole`` of one part (room for the tail).

    ``base`` is the state the body was opened against; ``explicit`` says the
    client named ``start`` (a Content-Range), which then has to be the size
    in the bucket, whereas a body without one appends wherever the session is.
    """

    upload: S3Upload
    base: SessionState
    path: str
    fd: int
    hole: int
    hasher: Any
    start: int
    end: int
    explicit: bool
    limit: int | None = None
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def abandon(self) -> None:
        """The body never completed: drop the spool, the session stays as acknowledged."""
        self.close()
        self.upload.busy = False


class FileSink(Sink):
    """Writes a download into an open file from ``offset`` (``pwrite``: one chunk, no buffering)."""

    def __init__(self, fd: int, offset: int) -> None:
        super().__init__()
        self._fd = fd
        self.offset = offset

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self.offset)
            self.offset += written
            view = view[written:]


class HashSink(Sink):
    """Hashes a download as it arrives (verification of an object nobody here saw whole)."""

    def __init__(self, hasher: Any) -> None:
        super().__init__()
        self.hasher = hasher
        self.received = 0

    def write(self, data: bytes) -> None:
        self.hasher.update(data)
        self.received += len(data)


def hash_region(path: str, offset: int, length: int, hasher: Any, block: int = 1024 * 1024) -> Any:
    """Feed ``length`` bytes of ``path`` from ``offset`` to ``hasher`` (blocking: run it in the pool)."""
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            data = f.read(min(block, length))
            if not data:
                raise ValueError(f"{path} ended {length} bytes early")
            hasher.update(data)
            length -= len(data)
    return hasher
