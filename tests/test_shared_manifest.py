"""once_per_node (registryd.mirror.shared_manifest): two workers' fetches of one manifest, in one
process (flock claims conflict between open files as between processes), on a fake clock."""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from registryd.mirror.shared_manifest import POLL, fetch_prefix, once_per_node


class Worker:
    """One worker's view: its upstream fetches, and what the store holds."""

    def __init__(self, store: dict[str, float | None], name: str) -> None:
        self.store = store
        self.name = name
        self.fetches: list[Deferred[str]] = []

    def fetch(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.fetches.append(d)
        return d

    async def stored_since(self, since: float) -> str | None:
        when = self.store.get("when")
        return "stored" if when is not None and when >= since else None


def _run(prefix: str, clock: Clock, worker: Worker, wait_limit: float = 10.0) -> Deferred[str]:
    return Deferred.fromCoroutine(once_per_node(prefix, clock, clock.seconds, worker.fetch, worker.stored_since,
                                                wait_limit))


def test_the_second_worker_serves_what_the_first_fetched(tmp_path: Any) -> None:
    clock, store = Clock(), {}
    prefix = fetch_prefix(str(tmp_path), ("upstream.test", "lib/app", "v1", ""))
    first, second = Worker(store, "0"), Worker(store, "1")
    a, b = _run(prefix, clock, first), _run(prefix, clock, second)
    clock.advance(POLL * 5)
    assert (len(first.fetches), len(second.fetches)) == (1, 0)
    store["when"] = clock.seconds()
    first.fetches[0].callback("fetched")
    clock.advance(POLL)
    assert a.result == "fetched" and b.result == "stored"
    assert second.fetches == []


@pytest.mark.parametrize("store", [{}, {"when": 0.0}], ids=["nothing in the store", "an old copy in the store"])
def test_after_a_failed_fetch_the_waiting_worker_asks_itself(tmp_path: Any, store: dict[str, Any]) -> None:
    """An old copy (confirmed at 0, before the waiter asked at 100) is not taken for the other
    worker's fetch either."""
    clock = Clock()
    clock.advance(100)
    prefix = fetch_prefix(str(tmp_path), ("upstream.test", "lib/app", "v1", ""))
    first, second = Worker(store, "0"), Worker(store, "1")
    a, b = _run(prefix, clock, first), _run(prefix, clock, second)
    clock.advance(POLL)
    first.fetches[0].errback(RuntimeError("upstream away"))
    a.addErrback(lambda f: f.trap(RuntimeError))
    clock.advance(POLL)
    assert len(second.fetches) == 1
    second.fetches[0].callback("fetched")
    assert b.result == "fetched"


def test_a_stuck_fetch_holds_the_others_only_wait_limit_seconds(tmp_path: Any) -> None:
    clock, store = Clock(), {}
    prefix = fetch_prefix(str(tmp_path), ("upstream.test", "lib/app", "v1", ""))
    first, second = Worker(store, "0"), Worker(store, "1")
    _run(prefix, clock, first)
    b = _run(prefix, clock, second, wait_limit=1.0)
    for _ in range(int(1.0 / POLL) - 2):
        clock.advance(POLL)
    assert second.fetches == []
    clock.advance(POLL * 3)
    assert len(second.fetches) == 1
    second.fetches[0].callback("fetched")
    assert b.result == "fetched"
    first.fetches[0].callback("late")
