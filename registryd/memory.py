"""Give the C heap back once start-up is over.

Start-up allocates and frees a lot (parsing the config, compiling routes
and templates, importing modules); glibc keeps the freed pages, so a
process idles megabytes above what it uses. ``malloc_trim`` returns them,
once, when the reactor has started (a worker's idle RSS is a target of
issue 15). Elsewhere than glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import gc
from typing import Any, Callable

_trim: Callable[[int], Any] | None = None
try:
    # The symbols the interpreter is linked with: the C library's among them.
    _trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
except OSError:
    pass


def release_free_memory() -> bool:
    """Collect garbage and return the free pages of the C heap; True if the C library could."""
    gc.collect()
    if _trim is None:
        return False
    _trim(0)
    return True


def release_once_running(reactor: Any) -> None:
    """Release free memory once the reactor runs (start-up's garbage is garbage by then)."""
    reactor.callWhenRunning(release_free_memory)
