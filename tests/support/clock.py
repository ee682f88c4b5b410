"""Clocks a test moves instead of sleeping.

Product code that schedules work takes an ``IReactorTime``: tests give it
``twisted.internet.task.Clock``. Code that compares its clock with times
written by someone else (a file's mtime, an object's LastModified) needs the
wall clock those were written on: tests give it a ``WallClock`` and move it ahead.
"""
from __future__ import annotations

import time


class WallClock:
    """``time.time()`` plus however far the test has moved it ahead: callable as
    a ``Callable[[], float]`` clock and, for ``IReactorTime`` readers, ``seconds()``."""

    def __init__(self, ahead: float = 0.0) -> None:
        self.ahead = ahead

    def __call__(self) -> float:
        return time.time() + self.ahead

    def seconds(self) -> float:
        return self()

    def advance(self, seconds: float) -> None:
        """What ``sleep(seconds)`` did to the clock, without the wait."""
        self.ahead += seconds
