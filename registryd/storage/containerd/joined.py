"""Content another writer is ingesting into containerd right now: wait for it instead of writing it twice.

When the node's containerd pulls an image through registryd (registryd as
its mirror, the kubelet or ``ctr images pull``), both write each blob into
the same content store: containerd's pull through its own ingest
(``layer-sha256:<hex>``, opened before it asks registryd for the blob), and
registryd's fill once the blob is verified. Every byte through the content
service's Write costs containerd CPU (it is what a fill waited for: a pull
into containerd through registryd took twice as long as through a
filesystem store). So before a fill writes a blob, registryd looks for an
active ingest whose ref names the blob's digest: while one moves, the
other writer is about to commit the same bytes, and registryd waits for
the content to appear, then only adds it to its lease. An ingest that
stands still for ``stall`` seconds (a pull that gave up) is not waited for.
"""
from __future__ import annotations

from typing import Any

from twisted.internet.task import deferLater

from registryd.digest import Digest
from registryd.storage.containerd.client import ContainerdClient

#: Seconds between two looks at the other writer's ingest.
POLL = 0.1
#: Seconds the other writer's ingest may stand still before registryd writes the content itself.
STALL = 5.0


async def written_by_another(client: ContainerdClient, reactor: Any, digest: Digest,
                             poll: float | None = None, stall: float | None = None) -> bool:
    """True once containerd holds ``digest`` (already, or written by another writer whose ingest of
    it was active); False at once when it has neither, or once that ingest stood still ``stall``
    seconds or went without the content: then the caller writes it."""
    poll = POLL if poll is None else poll
    stall = STALL if stall is None else stall
    last_offset: int | None = None
    moved_at = reactor.seconds()
    while True:
        if await client.info(str(digest)) is not None:
            return True
        active = [status for status in await client.statuses([f"ref~={digest.hex}"]) if digest.hex in status.ref]
        if not active:
            # Committed between the two calls, or aborted: containerd's info says which.
            return await client.info(str(digest)) is not None
        offset = max(int(status.offset) for status in active)
        if offset != last_offset:
            last_offset, moved_at = offset, reactor.seconds()
        elif reactor.seconds() - moved_at >= stall:
            return False
        await deferLater(reactor, poll, lambda: None)
