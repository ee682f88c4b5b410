"""The rows of a repository page: each tag shown, its digest and what its manifest and config say.

A page of 100 tags is a tag read each, then a manifest and a config read
for each digest not yet known (registryd.web.ui.images). On a data
directory the whole page is one trip to the IO pool (registryd.web.ui.offload);
elsewhere (a bucket answers each over the network) a few tags at a time.
"""
from __future__ import annotations

from typing import Any

from registryd.deferreds import bounded_gather
from registryd.digest import Digest
from registryd.storage.interface import RepositoryBackend
from registryd.web.ui.images import ImageFacts, ImageReader
from registryd.web.ui.offload import Offload

#: Tags of a page read at once where each is a round trip.
CONCURRENCY = 8


async def tag_rows(backend: RepositoryBackend, remote: str, tags: list[str], reader: ImageReader,
                   offload: Offload | None, pacer: Any) -> list[tuple[str, ImageFacts]]:
    """``(tag, facts)`` for each tag still there, in order (``pacer``: gives the reactor back
    on the path without a pool, registryd.web.ui.pacing)."""
    twin = offload.backend(backend) if offload is not None else None
    if offload is None or twin is None:
        async def row(tag: str) -> tuple[str, ImageFacts] | None:
            await pacer.step()
            digest = await backend.resolve_tag(remote, tag)
            return None if digest is None else (tag, await reader.facts(digest))

        return [found for found in await bounded_gather(tags, row, CONCURRENCY) if found is not None]

    batch = ImageReader(offload.blobs, known=reader.peek)

    async def read_all() -> list[tuple[str, Digest | None, ImageFacts | None]]:
        found: list[tuple[str, Digest | None, ImageFacts | None]] = []
        for tag in tags:
            digest = await twin.resolve_tag(remote, tag)
            found.append((tag, digest, None if digest is None else await batch.facts(digest)))
        return found

    found = await offload.run(read_all)
    reader.remember(batch.learned())       # kept by the reactor, not the thread
    return [(tag, facts) for tag, digest, facts in found if facts is not None]
