"""A thread pool of our own for blocking file work (fsync, walks, re-hash).

The reactor's default pool also serves DNS look-ups; keeping disk work off
it means a slow disk never delays name resolution.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

#: Threads of the maintenance pool: whole-store passes (online gc, surveys, the status
#: page's usage walk) run there, so they never hold the threads of a request's fsync.
#: Passes are few and mostly serialised (one gc or survey at a time), hence two.
MAINTENANCE_THREADS = 2
#: The CPU priority of the threads that write and hash upload bodies: on a busy machine pushes
#: yield to pulls (bench_push_pull.py, 8 pulls saturating 2 cores: their drop during a 1 GiB push
#: went from 40-50% at nice 0 or 10 to 16-26% at 19; the push still ran at about twice the
#: reference's rate). An idle machine gives a push all it can take.
BODY_NICE = 19


class BlockingPool:
    """Runs blocking callables in dedicated threads and awaits them; with ``nice``, in threads
    of a lower CPU priority, so that work yields the CPU to the reactor's thread and the
    kernel's sends when the machine is busy."""

    def __init__(self, reactor: IReactorThreads, size: int, name: str = "registryd-io", nice: int = 0) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        self._nice = nice
        self._niced = threading.local()

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._nice:
            return await deferToThreadPool(self._reactor, self._pool, self._call, fn, *args, **kwargs)
        return await deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """In the worker thread: lower its CPU priority once (Linux renices threads one by one)."""
        if not getattr(self._niced, "done", False):
            self._niced.done = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
            except (AttributeError, OSError):
                pass
        return fn(*args, **kwargs)


class InlinePool:
    """Runs the callable at once on the calling thread: for tools and tests."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)


class PoolBusy(Exception):
    """A BoundedPool's queue is full: the caller should refuse, not wait."""


class BoundedPool(BlockingPool):
    """A BlockingPool that lets at most ``queue`` callables wait for a
    thread, best rank first; past that ``run_ranked`` raises PoolBusy at once.

    For work a client can make us do at will (password checks): a flood
    gets refusals instead of a queue that grows without bound, and work of
    a better (lower) rank -- a client address without failures -- goes
    ahead of the flood's and, when the queue is full, takes the place of
    the newest waiter of a worse rank (which gets PoolBusy).
    """

    def __init__(self, reactor: IReactorThreads, size: int, queue: int, name: str, nice: int = 0) -> None:
        super().__init__(reactor, size, name, nice)
        self._size = size
        self._queue = queue
        self._running = 0
        self._sequence = 0
        self._waiting: list[tuple[int, int, Deferred[None]]] = []

    @property
    def pending(self) -> int:
        """Callables running or waiting."""
        return self._running + len(self._waiting)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.run_ranked(0, fn, *args, **kwargs)

    async def run_ranked(self, rank: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._running >= self._size:
            await self._turn(rank)
        self._running += 1
        try:
            return await super().run(fn, *args, **kwargs)
        finally:
            self._running -= 1
            self._next()

    def _turn(self, rank: int) -> Deferred[None]:
        if len(self._waiting) >= self._queue:
            worst = max(self._waiting, key=lambda w: (w[0], w[1]))
            if worst[0] <= rank:
                raise PoolBusy(f"{self.pending} {self._pool.name} jobs are already running or waiting")
            self._waiting.remove(worst)
            worst[2].errback(PoolBusy(f"{self._pool.name}: a job of a better rank took this one's place"))
        self._sequence += 1
        entry: tuple[int, int, Deferred[None]]
        turn: Deferred[None] = Deferred(lambda d: self._waiting.remove(entry) if entry in self._waiting else None)
        entry = (rank, self._sequence, turn)
        self._waiting.append(entry)
        return turn

    def _next(self) -> None:
        if self._waiting and self._running < self._size:
            best = min(self._waiting, key=lambda w: (w[0], w[1]))
            self._waiting.remove(best)
            best[2].callback(None)
