"""Blob claims every worker process of a node sees (registryd.storage.guard).

A collection runs in one worker process, while uploads, mounts and manifest
pushes claim their blobs in every worker: a claim kept in one process's
memory would not stop a collection in another. The table is a file under
``<data_dir>/run/`` mapped into every worker: each digest hashes to one
slot holding the time (milliseconds) of the latest claim of any digest in
that slot. Two digests sharing a slot only make one of them look claimed
when it was not, which keeps a blob one collection longer, never the
reverse. A claim is one 8-byte store into shared memory: no lock, no I/O.
"""
from __future__ import annotations

import math

from registryd.digest import Digest
from registryd.shared_cells import map_cells

#: 2**18 slots of 8 bytes: a 2 MiB file; claims within one [gc] delay fill few of them.
SLOTS = 1 << 18


class ClaimTable:
    """Claim times shared through a memory-mapped file."""

    def __init__(self, path: str) -> None:
        self._slots = map_cells(path, SLOTS, 0o644)

    @staticmethod
    def _slot(digest: Digest) -> int:
        return int(digest.hex[:16], 16) % SLOTS if len(digest.hex) >= 16 else hash(digest.hex) % SLOTS

    def claim(self, digest: Digest, when: float) -> None:
        slot, value = self._slot(digest), math.ceil(when * 1000)
        if self._slots[slot] < value:
            self._slots[slot] = value

    def last_claim(self, digest: Digest) -> float | None:
        value = self._slots[self._slot(digest)]
        return value / 1000 if value else None
