"""BoundedPool: password checks get their own threads and a bounded, ranked queue."""
from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred

from registryd.threads import BoundedPool, PoolBusy

pytestmark = pytest.mark.timeout(30)


@pytest_twisted.ensureDeferred
async def test_queue_is_bounded_ranked_and_better_ranks_take_worse_places() -> None:
    pool = BoundedPool(reactor, 1, 2, name="test-auth", nice=5)
    pool.start()
    gate = threading.Event()
    order: list[str] = []

    def job(name: str) -> str:
        if name == "first":
            gate.wait(10)
        order.append(name)
        return name

    try:
        first = ensureDeferred(pool.run_ranked(0, job, "first"))
        flood1 = ensureDeferred(pool.run_ranked(1, job, "flood1"))
        flood2 = ensureDeferred(pool.run_ranked(1, job, "flood2"))
        assert pool.pending == 3
        with pytest.raises(PoolBusy):
            await pool.run_ranked(1, job, "flood3")          # the queue is full
        clean = ensureDeferred(pool.run_ranked(0, job, "clean"))   # takes flood2's place
        outcome: list[Any] = []
        flood2.addErrback(lambda f: outcome.append(f.trap(PoolBusy)))
        assert outcome == [PoolBusy]
        gate.set()
        assert await first == "first"
        assert await clean == "clean"
        assert await flood1 == "flood1"
        assert order == ["first", "clean", "flood1"]
        assert pool.pending == 0
        # a cancelled waiter leaves the queue
        gate.clear()
        blocker = ensureDeferred(pool.run(job, "first"))
        waiter: Deferred[str] = ensureDeferred(pool.run(job, "cancelled"))
        waiter.cancel()
        waiter.addErrback(lambda f: None)
        assert pool.pending == 1
        gate.set()
        await blocker
    finally:
        gate.set()
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_a_niced_pool_runs_its_work_at_a_lower_cpu_priority_and_the_io_pool_does_not() -> None:
    """Upload bodies are written and hashed in the service's body pool (nice 10): a push yields
    the CPU to pulls; request I/O stays at the process's own priority."""
    import os

    from registryd.config import Config
    from registryd.service import RegistryService
    from registryd.threads import BODY_NICE

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    own = os.getpriority(os.PRIO_PROCESS, 0)
    service = RegistryService(Config(data_dir="/nonexistent-never-started"), reactor)
    assert service.api.body_pool is service.body_pool
    service.body_pool.start()
    service.pool.start()
    try:
        assert await service.body_pool.run(priority) == min(own + BODY_NICE, 19)
        assert await service.pool.run(priority) == own
    finally:
        service.body_pool.stop()
        service.pool.stop()
