"""Unit tests of registryd.deferreds: shared work with independent waiters, and bounded gathers.

All on a task.Clock: no reactor, no sleeping.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from registryd import deferreds
from registryd.deferreds import Coalescer, Shared, bounded_each, bounded_gather, shielded


def outcome(d: Deferred[Any]) -> list[Any]:
    """What ``d`` has fired with so far: [] or [result or Failure] (the failure is consumed)."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def cancellable_work(log: list[str]) -> Deferred[str]:
    return Deferred(lambda d: log.append("work cancelled"))


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What registryd.deferreds logs (kept off the global log, where a failure fails the test)."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(deferreds, "log", Logger(observer=events.append))
    return events


# -- Shared -------------------------------------------------------------------------------------

def test_cancelling_one_waiter_ends_only_its_wait() -> None:
    log: list[str] = []
    work = cancellable_work(log)
    shared = Shared(work)
    first, second, third = shared.wait(), shared.wait(), shared.wait()
    second.cancel()
    assert log == []
    got = [outcome(first), outcome(second), outcome(third)]
    work.callback("done")
    assert got[0] == ["done"] and got[2] == ["done"]
    assert got[1][0].check(CancelledError)
    assert shared.done and log == []


def test_cancelling_every_waiter_leaves_the_work_running_and_its_failure_reported() -> None:
    log: list[str] = []
    orphaned: list[Failure] = []
    work = cancellable_work(log)
    shared = Shared(work, orphaned.append)
    waiters = [shared.wait(), shared.wait()]
    for waiter in waiters:
        waiter.cancel()
        outcome(waiter)
    assert log == []
    work.errback(ValueError("disk full"))
    assert [f.value.args for f in orphaned] == [("disk full",)]


def test_a_failure_reaches_every_waiter_and_is_not_reported_as_orphaned() -> None:
    orphaned: list[Failure] = []
    work: Deferred[str] = Deferred()
    shared = Shared(work, orphaned.append)
    got = [outcome(shared.wait()) for _ in range(3)]
    work.errback(ValueError("no such blob"))
    assert [seen[0].value.args for seen in got] == [("no such blob",)] * 3
    assert orphaned == []


def test_a_waiter_after_the_end_gets_the_result_at_once() -> None:
    work: Deferred[str] = Deferred()
    shared = Shared(work)
    assert not shared.done
    work.callback("done")
    assert outcome(shared.wait()) == ["done"]
    assert outcome(shared.wait()) == ["done"]


def test_a_failure_at_once_is_kept_for_the_first_waiter_not_reported() -> None:
    async def fails() -> str:
        raise ValueError("refused at once")

    orphaned: list[Failure] = []
    shared = Shared(fails(), orphaned.append)
    assert shared.done and orphaned == []
    (failure,) = outcome(shared.wait())
    assert failure.value.args == ("refused at once",)


def test_an_orphaned_failure_is_logged_by_default_but_a_cancellation_is_not(logged: list[dict[str, Any]]) -> None:
    for error in (CancelledError(), ValueError("boom")):
        work: Deferred[None] = Deferred()
        waiter = Shared(work).wait()
        waiter.cancel()
        outcome(waiter)
        work.errback(error)
    assert [event["log_failure"].value.args for event in logged] == [("boom",)]


def test_shielded_work_runs_to_its_end_after_its_waiter_is_cancelled(logged: list[dict[str, Any]]) -> None:
    clock = Clock()
    steps: list[str] = []

    async def commit() -> str:
        steps.append("begun")
        await deferLater(clock, 1.0, lambda: None)
        steps.append("finished")
        return "committed"

    waiter = shielded(commit())
    waiter.cancel()
    (failure,) = outcome(waiter)
    assert failure.check(CancelledError) and steps == ["begun"]
    clock.advance(1.0)
    assert steps == ["begun", "finished"] and logged == []


def test_shielded_work_that_fails_after_its_waiter_left_is_logged(logged: list[dict[str, Any]]) -> None:
    clock = Clock()

    async def commit() -> None:
        await deferLater(clock, 1.0, lambda: None)
        raise OSError("no space left on device")

    waiter = shielded(commit())
    waiter.cancel()
    outcome(waiter)
    clock.advance(1.0)
    assert [event["log_failure"].value.args for event in logged] == [("no space left on device",)]


# -- Coalescer ----------------------------------------------------------------------------------

def test_coalescer_runs_one_job_and_survives_a_cancelled_waiter() -> None:
    started: list[Deferred[str]] = []

    async def job() -> str:
        d: Deferred[str] = Deferred()
        started.append(d)
        return await d

    coalescer: Coalescer[str] = Coalescer()
    first = coalescer.run("k", job)
    second = coalescer.run("k", job)
    third = coalescer.run("k", job)
    assert len(started) == 1 and coalescer.joined == 2 and coalescer.running_for("k")
    second.cancel()
    results: list[object] = []
    first.addBoth(results.append)
    third.addBoth(results.append)
    second.addErrback(lambda f: results.append(f.type))
    started[0].callback("done")
    assert results == [CancelledError, "done", "done"]
    assert coalescer.running() == 0
    coalescer.run("k", job)
    assert len(started) == 2


def test_coalescer_forgets_a_job_before_its_waiters_hear() -> None:
    started: list[Deferred[str]] = []

    async def job() -> str:
        d: Deferred[str] = Deferred()
        started.append(d)
        return await d

    coalescer: Coalescer[str] = Coalescer()
    asked_again: list[Deferred[str]] = []
    coalescer.run("k", job).addCallback(lambda _: asked_again.append(coalescer.run("k", job)))
    started[0].callback("old")
    assert len(started) == 2 and coalescer.joined == 0 and coalescer.started == 2
    assert outcome(asked_again[0]) == []


def test_coalescer_keeps_no_job_that_ended_at_once() -> None:
    async def inline() -> str:
        return "cached"

    coalescer: Coalescer[str] = Coalescer()
    assert outcome(coalescer.run("k", inline)) == ["cached"]
    assert coalescer.running() == 0 and not coalescer.running_for("k")
    assert outcome(coalescer.run("k", inline)) == ["cached"] and coalescer.started == 2


def test_coalescer_reports_a_failure_nobody_waits_for_with_its_key() -> None:
    started: list[Deferred[str]] = []

    async def job() -> str:
        d: Deferred[str] = Deferred()
        started.append(d)
        return await d

    reported: list[tuple[object, str]] = []
    coalescer: Coalescer[str] = Coalescer(lambda key, failure: reported.append((key, failure.getErrorMessage())))
    waiter = coalescer.run(("hub", "library/alpine"), job)
    waiter.cancel()
    outcome(waiter)
    started[0].errback(ConnectionError("upstream went away"))
    assert reported == [(("hub", "library/alpine"), "upstream went away")]


# -- bounded_each / bounded_gather -------------------------------------------------------------

class Work:
    """Items that take ``seconds[item]`` on a Clock; records what runs at once."""

    def __init__(self, clock: Clock, seconds: dict[int, float], fail: tuple[int, ...] = ()) -> None:
        self.clock, self.seconds, self.fail = clock, seconds, fail
        self.running: set[int] = set()
        self.most = 0
        self.begun: list[int] = []
        self.ended: list[int] = []

    async def __call__(self, item: int) -> str:
        self.begun.append(item)
        self.running.add(item)
        self.most = max(self.most, len(self.running))
        try:
            await deferLater(self.clock, self.seconds[item], lambda: None)
        finally:
            self.running.discard(item)
            self.ended.append(item)
        if item in self.fail:
            raise ValueError(f"item {item} failed")
        return f"result {item}"


def test_bounded_gather_holds_the_bound_and_keeps_the_items_order() -> None:
    clock = Clock()
    work = Work(clock, {i: 10.0 - i for i in range(10)})
    gathered = outcome(Deferred.fromCoroutine(bounded_gather(range(10), work, 3)))
    clock.pump([1.0] * 30)
    assert gathered == [[f"result {i}" for i in range(10)]]
    assert work.most == 3 and work.begun == list(range(10)) and work.ended != list(range(10))


def test_bounded_gather_without_a_bound_runs_everything_at_once() -> None:
    clock = Clock()
    work = Work(clock, {i: 1.0 for i in range(20)})
    gathered = outcome(Deferred.fromCoroutine(bounded_gather(range(20), work, None)))
    assert work.most == 20
    clock.advance(1.0)
    assert gathered == [[f"result {i}" for i in range(20)]]


def test_bounded_gather_of_nothing_is_empty() -> None:
    work = Work(Clock(), {})
    assert outcome(Deferred.fromCoroutine(bounded_gather([], work, 4))) == [[]]
    assert outcome(Deferred.fromCoroutine(bounded_gather([], work, None))) == [[]]


def test_the_first_failure_is_raised_once_the_work_in_flight_has_ended_and_nothing_new_begins() -> None:
    clock = Clock()
    # Item 1 fails at t=1 while 0 and 2 still run (until t=5); 3.. are never begun.
    work = Work(clock, {0: 5.0, 1: 1.0, 2: 5.0, 3: 1.0, 4: 1.0, 5: 0.5}, fail=(1, 5))
    gathered = outcome(Deferred.fromCoroutine(bounded_gather(range(6), work, 3)))
    clock.advance(1.0)
    assert gathered == [] and work.running == {0, 2}
    clock.advance(4.0)
    (failure,) = gathered
    assert failure.value.args == ("item 1 failed",)
    assert work.begun == [0, 1, 2] and work.running == set()


def test_keep_going_tries_every_item_and_raises_the_first_failure() -> None:
    clock = Clock()
    work = Work(clock, {0: 5.0, 1: 1.0, 2: 2.0, 3: 1.0, 4: 1.0}, fail=(1, 3))
    ended = outcome(Deferred.fromCoroutine(bounded_each(range(5), work, 2, keep_going=True)))
    clock.pump([1.0] * 10)
    (failure,) = ended
    assert failure.value.args == ("item 1 failed",)
    assert sorted(work.ended) == [0, 1, 2, 3, 4]


def test_bounded_each_draws_items_only_as_a_worker_frees() -> None:
    clock = Clock()
    work = Work(clock, {i: 1.0 for i in range(100)})
    drawn: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            drawn.append(i)
            yield i

    ended = outcome(Deferred.fromCoroutine(bounded_each(items(), work, 4)))
    assert drawn == [0, 1, 2, 3]
    clock.advance(1.0)
    assert drawn == list(range(8))
    clock.pump([1.0] * 30)
    assert ended == [None] and work.most == 4


def test_cancelling_a_bounded_gather_cancels_the_work_in_flight() -> None:
    clock = Clock()
    work = Work(clock, {i: 10.0 for i in range(6)})
    gathered = Deferred.fromCoroutine(bounded_gather(range(6), work, 2))
    gathered.cancel()
    (failure,) = outcome(gathered)
    assert failure.check(CancelledError)
    assert work.begun == [0, 1] and work.running == set() and clock.getDelayedCalls() == []


def test_cancelling_stops_even_a_gather_that_keeps_going() -> None:
    clock = Clock()
    work = Work(clock, {i: 10.0 for i in range(6)})
    ended = Deferred.fromCoroutine(bounded_each(range(6), work, 2, keep_going=True))
    ended.cancel()
    (failure,) = outcome(ended)
    assert failure.check(CancelledError)
    assert work.begun == [0, 1] and work.running == set() and clock.getDelayedCalls() == []


def test_a_cancellation_is_raised_once_the_work_in_flight_has_cleaned_up() -> None:
    clock = Clock()
    begun: list[int] = []
    cleaned: list[int] = []

    async def careful(item: int) -> None:
        begun.append(item)
        try:
            await deferLater(clock, 10.0, lambda: None)
        except CancelledError:
            await deferLater(clock, 1.0, lambda: None)   # an abort, say
            cleaned.append(item)
            raise

    ended = Deferred.fromCoroutine(bounded_each(range(6), careful, 2, keep_going=True))
    ended.cancel()
    seen = outcome(ended)
    assert seen == [] and cleaned == []
    clock.advance(1.0)
    assert seen[0].check(CancelledError) and cleaned == [0, 1] and begun == [0, 1]


def test_work_that_answers_at_once_does_not_deepen_the_stack() -> None:
    async def at_once(item: int) -> int:
        return item

    assert outcome(Deferred.fromCoroutine(bounded_gather(range(50_000), at_once, 2))) == [list(range(50_000))]
