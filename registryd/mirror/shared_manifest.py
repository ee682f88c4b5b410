"""One upstream manifest fetch per tag (or digest) for every worker process of a node.

Within one process, clients asking for the same manifest at once share one
fetch (``MirrorCache.manifest_fetches``). Across the workers of a node, the
fetch is claimed as a blob fill is (registryd.mirror.shared_fill): an
exclusive ``flock`` on ``tmp/manifest-fetches/<key>.lock`` for the whole
fetch. A worker that finds it taken polls for it; once it has the claim it
looks at the cache again first, and serves what the other worker stored if
the upstream confirmed it after this worker started waiting. Only when the
other fetch failed (the upstream is away, or has no such manifest) does it
ask the upstream itself. A claim whose holder died is free at once (the
kernel drops the lock), so nobody waits on a dead worker.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet.task import deferLater

from registryd.mirror.shared_fill import FillClaim, claim_prefix

T = TypeVar("T")

FOLDER = "manifest-fetches"
#: How often a waiting worker tries the claim.
POLL = 0.02


def fetch_prefix(tmp_dir: str, key: tuple[str, ...]) -> str:
    """Where the claim of one manifest fetch lives (the folder is created if need be)."""
    return claim_prefix(tmp_dir, FOLDER, key)


async def once_per_node(prefix: str, reactor: Any, clock: Callable[[], float], fetch: Callable[[], Awaitable[T]],
                        stored_since: Callable[[float], Awaitable[T | None]], wait_limit: float) -> T:
    """``fetch()`` under the node's claim at ``prefix``; a worker that had to wait for another
    one's fetch first asks ``stored_since(when this call began)`` for what that one stored.

    After ``wait_limit`` seconds of waiting it fetches without the claim (a stuck holder
    must not stop every worker's pulls).
    """
    asked = clock()
    waited = False
    deadline = reactor.seconds() + wait_limit
    while True:
        claim = FillClaim.take(prefix, reactor)
        if claim is not None:
            try:
                if waited:
                    found = await stored_since(asked)
                    if found is not None:
                        return found
                return await fetch()
            finally:
                claim.release()
        waited = True
        if reactor.seconds() >= deadline:
            return await fetch()
        await deferLater(reactor, POLL, lambda: None)
