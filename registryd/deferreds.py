"""Small Deferred helpers used at the Twisted boundary."""
from __future__ import annotations

from typing import Any, Coroutine, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")
log = Logger()


def shielded(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    """Run ``coroutine`` to the end even if the awaiting handler is cancelled.

    Klein cancels a handler when its client disconnects; a commit that has
    begun must still finish so the store never stops half-way.
    """
    inner = Deferred.fromCoroutine(coroutine)
    outer: Deferred[T] = Deferred(lambda d: None)

    def settle(result: Any) -> None:
        if not outer.called:
            outer.callback(result)
        elif isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("shielded work failed after its requester went away", result)

    inner.addBoth(settle)
    return outer
