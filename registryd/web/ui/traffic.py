"""The mirror's traffic over the last day, per upstream, in a bounded ring kept in memory.

Fed once per finished request (RegistrySite.log) with what the access log
already knows: the upstream a mirrored request went to, whether the cache
answered it (``hit``, or ``stale``: a tag past its TTL served while the
upstream is down) or the upstream did (``miss``), and the bytes sent.
Bytes sent on a miss were fetched from the upstream as they were sent;
bytes sent on a hit are what the cache saved. A ring of fixed buckets per
upstream bounds memory whatever the traffic; nothing survives a restart.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import attrs

DAY = 24 * 3600.0
#: 96 buckets of 15 minutes: one day.
BUCKET_SECONDS = 900.0
BUCKETS = int(DAY // BUCKET_SECONDS)


@attrs.define
class Counts:
    hits: int = 0
    misses: int = 0
    bytes_cached: int = 0       # sent from the cache
    bytes_upstream: int = 0     # sent while fetched from the upstream

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.requests if self.requests else None

    def add(self, other: Counts) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.bytes_cached += other.bytes_cached
        self.bytes_upstream += other.bytes_upstream

    def document(self) -> dict[str, Any]:
        return {"requests": self.requests, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hit_rate, "bytes_from_cache": self.bytes_cached,
                "bytes_from_upstream": self.bytes_upstream}


class Traffic:
    """Hits, misses and bytes per upstream: since start, and per bucket over the last day."""

    def __init__(self, namespaces: Iterable[str], clock: Callable[[], float],
                 bucket_seconds: float = BUCKET_SECONDS, buckets: int = BUCKETS) -> None:
        self._clock = clock
        self.bucket_seconds = bucket_seconds
        self.buckets = buckets
        self.namespaces = tuple(namespaces)
        self.totals: dict[str, Counts] = {ns: Counts() for ns in self.namespaces}
        self._rings: dict[str, collections.deque[tuple[int, Counts]]] = {
            ns: collections.deque(maxlen=buckets) for ns in self.namespaces}

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def observe(self, upstream: str | None, cache: str | None, sent: int) -> None:
        """One finished mirrored request; anything else is ignored."""
        if upstream is None or cache is None or upstream not in self.totals:
            return
        counts = Counts()
        if cache == "miss":
            counts.misses, counts.bytes_upstream = 1, sent
        else:
            counts.hits, counts.bytes_cached = 1, sent
        self.totals[upstream].add(counts)
        ring = self._rings[upstream]
        slot = int(self._clock() // self.bucket_seconds)
        if not ring or ring[-1][0] != slot:
            ring.append((slot, Counts()))
        ring[-1][1].add(counts)

    def series(self, upstream: str | None) -> list[tuple[float, Counts]]:
        """One entry per bucket of the last day, oldest first (empty buckets as zeros);
        ``upstream`` None: every upstream added up."""
        now_slot = int(self._clock() // self.bucket_seconds)
        first = now_slot - self.buckets + 1
        merged: dict[int, Counts] = {}
        for ns in ([upstream] if upstream is not None else self.namespaces):
            for slot, counts in self._rings.get(ns, ()):
                if slot >= first:
                    merged.setdefault(slot, Counts()).add(counts)
        return [(slot * self.bucket_seconds, merged.get(slot, Counts())) for slot in range(first, now_slot + 1)]

    # --- a node's workers: each one's counts written down, read back and added up -----------

    def document(self) -> dict[str, Any]:
        """The counts as plain JSON (registryd.web.ui.node_view: what a worker writes for the others)."""
        return {ns: {"totals": _row(self.totals[ns]), "ring": [[slot, *_row(c)] for slot, c in self._rings[ns]]}
                for ns in self.namespaces}

    def add_document(self, document: Any) -> None:
        """Add counts written by ``document`` (another worker's); anything malformed raises ValueError."""
        if not isinstance(document, dict):
            raise ValueError("traffic is not an object")
        for ns in self.namespaces:
            part = document.get(ns)
            if part is None:
                continue
            try:
                totals = _counts(part["totals"])
                ring = [(_int(row[0]), _counts(row[1:])) for row in part["ring"]]
            except (KeyError, TypeError, IndexError) as e:
                raise ValueError(f"malformed traffic of {ns}: {e!r}") from None
            self.totals[ns].add(totals)
            self._merge_ring(ns, ring)

    def add(self, other: Traffic) -> None:
        """Add another Traffic's counts (copied: ``other`` is left as it is)."""
        for ns in self.namespaces:
            if ns in other.totals:
                self.totals[ns].add(other.totals[ns])
                self._merge_ring(ns, list(other._rings[ns]))

    def _merge_ring(self, ns: str, entries: list[tuple[int, Counts]]) -> None:
        slots: dict[int, Counts] = {}
        for slot, counts in [*self._rings[ns], *entries]:
            slots.setdefault(slot, Counts()).add(counts)
        self._rings[ns] = collections.deque(sorted(slots.items())[-self.buckets:], maxlen=self.buckets)


def _row(counts: Counts) -> list[int]:
    return [counts.hits, counts.misses, counts.bytes_cached, counts.bytes_upstream]


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _counts(row: Any) -> Counts:
    if not isinstance(row, list) or len(row) != 4:
        raise ValueError(f"not a row of counts: {row!r}")
    return Counts(*(_int(value) for value in row))
