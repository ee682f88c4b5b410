"""The Deferred helpers used at the Twisted boundary, written once.

- ``Shared``: one piece of work, any number of waiters, each free to stop
  waiting. Klein cancels a handler when its client disconnects; that must end
  the client's wait only, never work other clients (or the store) rely on.
- ``shielded``: a coroutine run to its end whatever happens to its one waiter.
- ``Coalescer``: one ``Shared`` job per key while it runs.
- ``bounded_each`` / ``bounded_gather``: run work over many items with at
  most ``limit`` in flight, and end only once nothing is left running.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Coroutine, Generic, Hashable, Iterable, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
R = TypeVar("R")
log = Logger()

_PENDING: Any = object()


def _log_orphaned_failure(failure: Failure) -> None:
    # A cancellation has nobody to tell; anything else is a bug worth a traceback.
    if not failure.check(CancelledError):
        log.failure("shared work failed after every requester went away", failure)


class Shared(Generic[T]):
    """The result of one piece of work, for any number of waiters.

    Each ``wait()`` is a Deferred of its own: cancelling it ends that wait
    only; the work is never cancelled by a waiter and goes on for the others.
    A waiter that comes after the work ended gets its result at once. A
    failure when every waiter has gone goes to ``on_orphaned_failure`` (by
    default logged with its traceback, a cancellation not at all), so it is
    never lost; one at once, before anybody could wait, is kept for the first.
    """

    def __init__(self, work: Deferred[T] | Coroutine[Any, Any, T],
                 on_orphaned_failure: Callable[[Failure], object] = _log_orphaned_failure) -> None:
        self._waiters: list[Deferred[T]] = []
        self._outcome: T | Failure = _PENDING
        self._on_orphaned_failure = on_orphaned_failure
        self._starting = True
        running = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        running.addBoth(self._settle)
        self._starting = False

    @property
    def done(self) -> bool:
        return self._outcome is not _PENDING

    def wait(self) -> Deferred[T]:
        """A Deferred of the work's result; cancelling it cancels nothing else."""
        if self.done:
            settled: Deferred[T] = Deferred()
            settled.callback(self._outcome)
            return settled
        waiter: Deferred[T] = Deferred(self._leave)
        self._waiters.append(waiter)
        return waiter

    def _leave(self, waiter: Deferred[T]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _settle(self, result: T | Failure) -> None:
        self._outcome = result
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure) and not waiters and not self._starting:
            self._on_orphaned_failure(result)
        for waiter in waiters:
            waiter.callback(result)


def shielded(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    """Run ``coroutine`` to the end even if the awaiting handler is cancelled.

    Klein cancels a handler when its client disconnects; a commit that has
    begun must still finish so the store never stops half-way.
    """
    return Shared(coroutine).wait()


def _warn_orphaned_job(key: Hashable, failure: Failure) -> None:
    log.warn("{key} failed with nobody waiting: {error}", key=key, error=failure.getErrorMessage())


class Coalescer(Generic[T]):
    """Runs ``start()`` once per key until it finishes; every caller meanwhile
    shares its result (as a ``Shared`` waiter: cancellable on its own)."""

    def __init__(self, on_orphaned_failure: Callable[[Hashable, Failure], object] = _warn_orphaned_job) -> None:
        self._jobs: dict[Hashable, Shared[T]] = {}
        self._on_orphaned_failure = on_orphaned_failure
        self.joined = 0  # waiters that found a job already running
        self.started = 0  # jobs started

    def running(self) -> int:
        return len(self._jobs)

    def running_for(self, key: Hashable) -> bool:
        return key in self._jobs

    def run(self, key: Hashable, start: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        job = self._jobs.get(key)
        if job is not None:
            self.joined += 1
            return job.wait()
        self.started += 1
        work = Deferred.fromCoroutine(start())
        if not work.called:  # an inline thread pool ends it at once: nothing to join
            # Forgotten before its waiters hear: one that asks again starts anew.
            work.addBoth(self._forget, key)
        job = Shared(work, lambda failure: self._on_orphaned_failure(key, failure))
        if not job.done:
            self._jobs[key] = job
        return job.wait()

    def _forget(self, result: T | Failure, key: Hashable) -> T | Failure:
        del self._jobs[key]
        return result


async def bounded_each(items: Iterable[T], work: Callable[[T], Awaitable[object]], limit: int, *,
                       keep_going: bool = False) -> None:
    """``work`` on every item, at most ``limit`` at once, in the items' order.

    Workers draw from one iterator, so a generator of items is never held
    whole (memory stays flat). The first failure is raised only once every
    worker has stopped: nothing keeps running behind the caller's back (an
    abort after a failed multipart upload must come after its last part).
    After a failure no new item is begun, unless ``keep_going`` (a restore:
    every item that can still be done must be); after a cancellation, never,
    and the cancellation too is raised only once the work in flight has ended.
    """
    pending = iter(items)
    failures: list[BaseException] = []
    cancelled = False

    async def worker() -> None:
        nonlocal cancelled
        for item in pending:
            if cancelled or (failures and not keep_going):
                return
            try:
                await work(item)
            except BaseException as e:
                failures.append(e)
                cancelled = cancelled or isinstance(e, CancelledError)

    # Cancelling a DeferredList cancels each worker, and it fires only once they have all ended.
    await DeferredList([Deferred.fromCoroutine(worker()) for _ in range(max(limit, 1))], consumeErrors=True)
    if failures:
        raise failures[0]


async def bounded_gather(items: Iterable[T], work: Callable[[T], Awaitable[R]], limit: int | None, *,
                         keep_going: bool = False) -> list[R]:
    """``work``'s results over ``items`` in the items' order, at most ``limit``
    at once (None: all at once); failures as ``bounded_each``."""
    listed = list(items)
    results: list[R] = [_PENDING] * len(listed)

    async def one(entry: tuple[int, T]) -> None:
        results[entry[0]] = await work(entry[1])

    await bounded_each(enumerate(listed), one, len(listed) if limit is None else limit, keep_going=keep_going)
    return results
