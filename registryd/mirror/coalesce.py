"""One job per key, however many callers ask for it at once.

Callers wait on their own Deferred: cancelling one (Klein does when a
client disconnects) removes that waiter only, never the shared job.
"""
from __future__ import annotations

from typing import Any, Callable, Coroutine, Generic, Hashable, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Runs ``start()`` once per key until it finishes; shares its result."""

    def __init__(self) -> None:
        self._jobs: dict[Hashable, list[Deferred[T]]] = {}
        self.joined = 0  # waiters that found a job already running
        self.started = 0  # jobs started

    def running(self) -> int:
        return len(self._jobs)

    def run(self, key: Hashable, start: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        waiter: Deferred[T] = Deferred(lambda d: self._forget(key, d))
        waiters = self._jobs.get(key)
        if waiters is not None:
            self.joined += 1
            waiters.append(waiter)
            return waiter
        self._jobs[key] = [waiter]
        self.started += 1
        Deferred.fromCoroutine(start()).addBoth(self._finished, key)
        return waiter

    def _forget(self, key: Hashable, waiter: Deferred[T]) -> None:
        waiters = self._jobs.get(key)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)

    def _finished(self, result: T | Failure, key: Hashable) -> None:
        waiters = [w for w in self._jobs.pop(key, []) if not w.called]
        if not waiters and isinstance(result, Failure):
            # Everyone who asked has gone; the failure must still be seen.
            log.warn("{key} failed with nobody waiting: {error}", key=key, error=result.getErrorMessage())
        for waiter in waiters:
            waiter.callback(result)
