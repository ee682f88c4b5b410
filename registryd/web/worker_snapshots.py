"""The status and mirror pages of a node of workers: each worker's view, written down for the others.

Every few seconds a worker writes what its pages know from memory
(registryd.web.ui.node_view: traffic, pulls, recent errors, fills running,
upstream health) to ``<data_dir>/run/views/worker-<index>.json``: a few KiB
to a few tens, written to a temporary file and renamed, so a reader sees
the old document or the new one, never half of one. A page view reads the
other workers' documents (in the IO pool), keeps those of live workers (its
pid still runs, and it was written within a few intervals: a worker that
is gone, or a leftover of an earlier run, counts no more) and adds them to
its own live view. The reactor only copies the view and adds views up.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from registryd.threads import BlockingPool
from registryd.web.ui.node_view import NodeView, document, from_document, merge
from registryd.web.ui.traffic import Traffic

log = Logger()

#: Seconds between two writes of a worker's view; a page shows the others' this late at most.
INTERVAL = 2.0
#: A document older than this many intervals is a worker that no longer writes.
STALE_INTERVALS = 5
#: Larger is not a document a worker wrote (its view is bounded far below this).
MAX_BYTES = 4 * 1024 * 1024
_PREFIX, _SUFFIX = "worker-", ".json"


def _write(path: str, found: dict[str, Any]) -> None:
    """Atomically: a reader opens the previous document or this one."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(found, f, separators=(",", ":"))
    os.replace(temporary, path)


def _alive(pid: Any) -> bool:
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_others(directory: str, own: int, now: float, stale: float, like: Traffic) -> list[NodeView]:
    """The views of the other live workers (in the IO pool)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    views = []
    for name in sorted(names):
        index = name[len(_PREFIX):-len(_SUFFIX)]
        if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX) and index.isdigit()) or int(index) == own:
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            continue
        try:
            if len(data) > MAX_BYTES:
                raise ValueError("too large")
            found = json.loads(data)
            if not isinstance(found, dict):
                raise ValueError("not an object")
            at: Any = found.get("at")
            if type(at) not in (int, float) or not now - stale <= at <= now + stale or not _alive(found.get("pid")):
                continue    # a worker that is gone
            views.append(from_document(found, like))
        except ValueError as e:
            log.warn("ignoring the worker view {path}: {error}", path=path, error=str(e))
    return views


class WorkerSnapshots:
    """Writes this worker's view every ``interval`` and gives the node's view to a page."""

    def __init__(self, directory: str, index: int, pool: BlockingPool, reactor: Any,
                 local: Callable[[], NodeView], interval: float = INTERVAL) -> None:
        self.directory = directory
        self.index = index
        self.path = os.path.join(directory, f"{_PREFIX}{index}{_SUFFIX}")
        self._pool = pool
        self._reactor = reactor
        self._local = local
        self.interval = interval
        self._failing = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.write())

    async def write(self) -> None:
        """Write this worker's view now (copied here, on the reactor; serialised in the pool)."""
        found = document(self._local(), os.getpid(), self._reactor.seconds())
        try:
            await self._pool.run(_write, self.path, found)
        except Exception as e:
            # Never stops the loop: the next interval tries again; said once per outage.
            if not self._failing:
                log.warn("writing this worker's view for the status pages failed: {error}", error=str(e))
            self._failing = True
        else:
            self._failing = False

    async def view(self) -> NodeView:
        """This worker's live view (copied here) and every other live worker's, added up in the pool."""
        own = self._local()
        now = self._reactor.seconds()
        return await self._pool.run(_node_view, document(own, os.getpid(), now), self.directory, self.index, now,
                                    self.interval * STALE_INTERVALS, own.traffic)


def _node_view(own: dict[str, Any], directory: str, index: int, now: float, stale: float,
               like: Traffic) -> NodeView:
    """The node's view, from this worker's copy and the other live workers' documents (in the IO pool)."""
    return merge(from_document(own, like), read_others(directory, index, now, stale, like))
