"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from registryd.units import human_size

class Progress:
    """Counts items and bytes done out of a known total; redraws at most 10 times a second."""

    WIDTH = 24

    def __init__(self, label: str, items: int, size: int, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.label = label
        self.items = items
        self.size = size
        self.items_done = 0
        self.size_done = 0
        self._drawn = 0.0
        self._shown = False

    def advance(self, size: int = 0, items: int = 0) -> None:
        self.size_done += size
        self.items_done += items
        if self.enabled and time.monotonic() - self._drawn >= 0.1:
            self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        if self.size:
            fraction = min(1.0, self.size_done / self.size)
        else:
            fraction = min(1.0, self.items_done / self.items) if self.items else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sizes = f", {human_size(self.size_done)}/{human_size(self.size)}" if self.size else ""
        self.stream.write(f"\r{self.label} [{bar}] {fraction * 100:3.0f}%  {self.items_done}/{self.items}"
                          f"{sizes}\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the bar, so what follows starts on a clean line."""
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
