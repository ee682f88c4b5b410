"""Separate thread pools, and the reactor-lag histogram.

* A whole-store pass (gc, a survey, the status page's usage walk) runs in the
  maintenance pool: while it holds every thread there, an upload still
  commits (its fsync is in the request I/O pool). Password checks have their
  own pool too (tests/test_auth_flood.py::test_a_login_flood_does_not_slow_a_push).
* ``registryd_reactor_lag_seconds`` counts how late the reactor ran its timer.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, Histogram
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock, deferLater

from oci_client import Client, digest_of
from registryd.reactor_lag import BUCKETS, ReactorLag
from test_observability import samples, value

pytestmark = pytest.mark.timeout(30)


@pytest_twisted.ensureDeferred
async def test_a_long_maintenance_pass_does_not_hold_up_an_upload_commit(make_registry: Any) -> None:
    registry = make_registry(io_threads=2)
    threaded = registry.service.store.objects.threaded()
    assert threaded is not None
    _, pool = threaded          # where a gc or a survey runs whole
    gate = threading.Event()
    # More passes than any pool here has threads: each holds its thread until the gate opens.
    passes = [ensureDeferred(pool.run(gate.wait, 20)) for _ in range(4)]
    try:
        data = b"committed while maintenance runs"
        upload = ensureDeferred(Client(registry.url).post(f"/v2/p/app/blobs/uploads/?digest={digest_of(data)}",
                                                          data))
        upload.addTimeout(5, reactor)
        reply = await upload
        assert reply.status == 201, str(reply)
        assert not any(p.called for p in passes)     # the passes are still running
    finally:
        gate.set()
        await gatherResults(passes)


def test_reactor_lag_is_how_late_the_timer_ran() -> None:
    clock = Clock()
    histogram = Histogram("lag", "test", buckets=BUCKETS, registry=CollectorRegistry())
    lag = ReactorLag(clock, histogram, interval=0.1)
    lag.start()
    clock.advance(0.1)                 # on time
    clock.advance(0.1 + 0.3)           # 0.3 s late
    lag.stop()
    assert not clock.getDelayedCalls()
    found = {(s.name, s.labels.get("le")): s.value for s in histogram.collect()[0].samples}
    assert found["lag_count", None] == 2
    assert found["lag_bucket", "0.001"] == 1
    assert found["lag_bucket", "0.25"] == 1 and found["lag_bucket", "0.5"] == 2
    assert found["lag_sum", None] == pytest.approx(0.3)


@pytest_twisted.ensureDeferred
async def test_reactor_lag_histogram_on_metrics(registry: Any) -> None:
    time.sleep(0.3)                    # the reactor's thread is busy: the timer runs late
    await deferLater(reactor, 0.15, lambda: None)
    reply = await Client(registry.url).get("/metrics")
    found = samples(reply.body.decode())
    count = value(found, "registryd_reactor_lag_seconds_count")
    assert count >= 1
    late = count - value(found, "registryd_reactor_lag_seconds_bucket", le="0.1")
    assert late >= 1, "the blocked reactor was not seen"
