"""Keeps garbage collection inside the server from deleting a blob in use.

A collection judges a blob unused from a walk of the store that takes time;
meanwhile the server may commit an upload of that blob, link it into a
repository or accept a manifest that names it. Every such path *claims* the
digest before it looks at or writes the blob. The collector
(registryd.upkeep.collector) only reads the claims, with no lock held
across any I/O: before it moves a blob to the trash, once the blob is
there (before the original goes), and when it judges what to put back. A
claim after the last look finds the blob gone (an upload writes it again;
a manifest naming it is refused as MANIFEST_BLOB_UNKNOWN).

The claims are kept in memory, so they only speak for this process, unless
the guard ``share``s a ClaimTable (registryd.storage.claim_table) with the
other worker processes of its node; the collector's second mark protects
what other processes and nodes commit.
The mirror cache's eviction on a data directory deletes the blobs it freed
the same way: into the trash, a look at the claims, then the purge.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from registryd.digest import Digest
from registryd.storage.claim_table import ClaimTable

# Claims older than this are forgotten; collections use shorter windows.
_KEEP_CLAIMS = 7 * 24 * 3600.0
_PRUNE_EVERY = 100_000


class BlobGuard:
    """Digest claims with their times; the lock guards the table only, never any I/O."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._claims: dict[Digest, float] = {}
        self._since_prune = 0
        self._shared: ClaimTable | None = None

    def share(self, table: ClaimTable) -> None:
        """Claim in, and read the claims of, every process that shares ``table`` too."""
        self._shared = table

    def claim(self, digests: Iterable[Digest]) -> None:
        """Mark ``digests`` as in use now (call before touching the blobs)."""
        with self._lock:
            now = self._clock()
            for digest in digests:
                self._claims[digest] = now
                self._since_prune += 1
                if self._shared is not None:
                    self._shared.claim(digest, now)
            if self._since_prune >= _PRUNE_EVERY:
                self._forget_before(now - _KEEP_CLAIMS)

    def last_claim(self, digest: Digest) -> float | None:
        with self._lock:
            mine = self._claims.get(digest)
        shared = self._shared.last_claim(digest) if self._shared is not None else None
        return mine if shared is None else shared if mine is None else max(mine, shared)

    def claimed_since(self, digest: Digest, since: float) -> bool:
        """Was ``digest`` claimed at or after ``since``? (A look, not a lock: see the module.)"""
        claim = self.last_claim(digest)
        return claim is not None and claim >= since

    def _forget_before(self, cutoff: float) -> None:
        self._claims = {d: t for d, t in self._claims.items() if t >= cutoff}
        self._since_prune = 0
