"""How late the reactor runs a timer: the wait every request shares when
something blocks the reactor's thread (a write to a throttled disk, a long
computation). Exported as the histogram ``registryd_reactor_lag_seconds``.

A timer due every ``interval`` seconds notes how long after its due time it
ran; one call and one observation per tick, so it costs next to nothing.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import Histogram

#: Seconds between two measurements.
INTERVAL = 0.1
#: Buckets from a millisecond (a healthy reactor) to seconds (a blocked one).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ReactorLag:
    """Measures the reactor's lateness into ``histogram`` while started."""

    def __init__(self, clock: Any, histogram: Histogram, interval: float = INTERVAL) -> None:
        self._clock = clock
        self._histogram = histogram
        self._interval = interval
        self._due = 0.0
        self._call: Any = None

    def start(self) -> None:
        if self._call is None:
            self._schedule()

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _schedule(self) -> None:
        self._due = self._clock.seconds() + self._interval
        self._call = self._clock.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        self._histogram.observe(max(0.0, self._clock.seconds() - self._due))
        self._schedule()
