"""The blobs of a store, in one listing of ``blobs/`` over its driver: each with its size and time.

The one blob listing: the GC's mark and sweep, the survey, fsck and every
store's ``blob_sizes``, ``blob_usage`` and ``mirror_folders`` read the store
through these.
"""
from __future__ import annotations

from typing import Sequence

import attrs

from registryd.digest import Digest
from registryd.storage.driver import Driver, Entry, finish
from registryd.storage.layout import BLOBS, MIRROR
from registryd.storage.scan import digest_or_none


@attrs.frozen
class BlobEntry:
    digest: Digest
    key: str
    size: int
    last_modified: float | None
    version: str = ""

    @property
    def entry(self) -> Entry:
        """As listed: what a move of exactly this value expects."""
        return Entry(self.key, self.size, self.last_modified, self.version)


def blob_digest(parts: Sequence[str]) -> Digest | None:
    """``<alg>/<2 hex>/<hex>`` as under ``blobs/``, or None."""
    if len(parts) != 3:
        return None
    digest = digest_or_none(parts[0], parts[2])
    return digest if digest is not None and digest.hex[:2] == parts[1] else None


async def list_blobs(driver: Driver, unexpected: list[Entry] | None = None) -> dict[Digest, BlobEntry]:
    """Every value under ``blobs/`` that is named by its digest.

    Anything else is fsck's business: it goes to ``unexpected`` when given.
    """
    found: dict[Digest, BlobEntry] = {}
    async for entry in driver.list(BLOBS):
        digest = blob_digest(entry.key[len(BLOBS):].split("/"))
        if digest is not None:
            found[digest] = BlobEntry(digest, entry.key, entry.size, entry.modified, entry.version)
        elif unexpected is not None:
            unexpected.append(entry)
    return found


async def blob_usage(driver: Driver) -> tuple[int, int]:
    """Bytes and values under ``blobs/``; on a driver with a blocking twin, one walk in one trip
    to its pool."""

    async def count(over: Driver) -> tuple[int, int]:
        total = values = 0
        async for entry in over.list(BLOBS):
            total += entry.size
            values += 1
        return total, values

    threaded = driver.threaded()
    if threaded is None:
        return await count(driver)
    twin, pool = threaded
    return await pool.run(lambda: finish(count(twin)))


async def mirror_folders(driver: Driver) -> list[str]:
    """The upstream folders under ``mirror/`` (a namespace with ``:`` as ``_``), sorted."""
    found = [entry.key[len(MIRROR):].rstrip("/")
             async for entry in driver.list(MIRROR, delimiter="/") if entry.is_prefix]
    return sorted(folder for folder in found if folder)
