"""A thread pool of our own for blocking file work (fsync, walks, re-hash).

The reactor's default pool also serves DNS look-ups; keeping disk work off
it means a slow disk never delays name resolution.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class BlockingPool:
    """Runs blocking callables in dedicated threads and awaits them."""

    def __init__(self, reactor: IReactorThreads, size: int, name: str = "registryd-io") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)


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
    """A BlockingPool that holds at most ``queue`` callables waiting for a
    thread; past that ``run`` raises PoolBusy at once.

    For work a client can make us do at will (password checks): a flood
    then gets refusals instead of a queue that grows without bound.
    """

    def __init__(self, reactor: IReactorThreads, size: int, queue: int, name: str) -> None:
        super().__init__(reactor, size, name)
        self._capacity = size + queue
        self.pending = 0

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.pending >= self._capacity:
            raise PoolBusy(f"{self.pending} {self._pool.name} jobs are already running or waiting")
        self.pending += 1
        try:
            return await super().run(fn, *args, **kwargs)
        finally:
            self.pending -= 1
