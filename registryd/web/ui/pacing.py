"""Long loops of cheap store calls give the reactor back now and then.

On a data directory a small read or a stat answers at once, without a trip
to the IO pool, so a loop of a few hundred of them (a page of tags) would
run on the reactor from start to end. ``Pacer.step`` hands the reactor
back once ``slice_seconds`` have passed since the last time, so other
requests wait at most that long.
"""
from __future__ import annotations

import time
from typing import Any

from twisted.internet.task import deferLater

SLICE_SECONDS = 0.01


class Pacer:
    def __init__(self, reactor: Any, slice_seconds: float = SLICE_SECONDS) -> None:
        self._reactor = reactor
        self._slice = slice_seconds
        self._since = time.monotonic()

    async def step(self) -> None:
        if time.monotonic() - self._since >= self._slice:
            await deferLater(self._reactor, 0, lambda: None)
            self._since = time.monotonic()
