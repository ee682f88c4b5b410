"""Last-pull times of manifests, for ``registryd ls``, ``prune --unused-for`` and eviction.

A pull writes a marker's mtime in the IO pool without waiting for it, and at
most once a second per manifest, so a hot tag costs no write per request.
The times are advisory: they are never fsynced, and a crash may lose the
last second of them.
"""
from __future__ import annotations

import time
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from registryd.digest import Digest
from registryd.storage.interface import RepositoryBackend
from registryd.storage.outage import outage_reason

log = Logger()

_MAX_REMEMBERED = 100_000


class PullRecorder:
    def __init__(self, clock: Callable[[], float] = time.time, interval: float = 1.0) -> None:
        self._clock = clock
        self._interval = interval
        self._written: dict[tuple[int, str, Digest], float] = {}

    def record(self, repositories: RepositoryBackend, name: str, digest: Digest) -> None:
        now = self._clock()
        key = (id(repositories), name, digest)
        last = self._written.get(key)
        if last is not None and now - last < self._interval:
            return
        if len(self._written) >= _MAX_REMEMBERED:
            self._written.clear()
        self._written[key] = now
        def failed(failure: Failure) -> None:
            reason = outage_reason(failure.value)
            if reason is None:
                log.failure("recording a pull of {name}@{digest} failed", failure, name=name, digest=str(digest))
            else:   # advisory: a pull time lost to an outage is not worth a traceback
                log.warn("recording a pull of {name}@{digest} failed: {reason}", name=name, digest=str(digest),
                         reason=reason)
        Deferred.fromCoroutine(repositories.record_pull(name, digest, now)).addErrback(failed)
