"""One private daemon (containerd, dockerd) for a module, in a short folder of its own, written once."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, TypeVar

D = TypeVar("D", bound=Any)


@contextlib.contextmanager
def running_daemon(make: Callable[[str], D], prefix: str) -> Iterator[D]:
    """``make(directory)`` started, then stopped and its folder removed. The folder is under /tmp:
    unix socket paths are limited to 108 bytes."""
    base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    daemon = make(os.path.join(base, "0"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
