"""Connection and body-memory limits counted per node, over its worker processes.

``ConnectionLimits`` and ``BodyBudget`` (registryd.web.limits) count what
one process holds. The workers of a node share one file of counters instead,
``<data_dir>/run/limits``, mapped into every worker: a row per worker, which
only that worker writes (so no lock: each count has one writer), and which
every worker sums to judge a limit. A row holds the worker's open
connections, the bytes of request bodies it holds in memory, the blob
bodies it sends and upload bodies it receives (registryd.web.upload_pace),
and its open connections per client, in buckets by a hash of the client's address (two
clients whose addresses land in one bucket, 1 in 65,536, share a count).

A worker zeroes its row when it starts: a worker that died took its
connections and bodies with it. Two workers admitting at the same moment
may each see room for one more, so a limit can be passed by at most one
connection (or body) per other worker.
"""
from __future__ import annotations

import zlib

from registryd.shared_cells import PAGE_CELLS, map_cells, zero_cells
from registryd.web.limits import BodyBudget, ConnectionLimits, RateLimitedLog, unavailable_busy

#: Buckets of per-client connection counts in each worker's row.
CLIENT_BUCKETS = 65536
_CONNECTIONS = 0
_BODY_BYTES = 1
#: The first of the two slots of registryd.web.upload_pace.NodeTraffic (blob bodies being sent,
#: upload bodies being received).
TRAFFIC_SLOT = 2
_FIRST_BUCKET = TRAFFIC_SLOT + 2
#: A row is whole pages, so a starting worker zeroes its row without bringing it into memory.
_ROW = -(-(_FIRST_BUCKET + CLIENT_BUCKETS) // PAGE_CELLS) * PAGE_CELLS


class NodeCounters:
    """The node's shared counters: this worker's row to write, every row to read."""

    def __init__(self, path: str, index: int, count: int) -> None:
        self.index = index
        self.count = count
        self._cells = map_cells(path, count * _ROW)
        zero_cells(self._cells, index * _ROW, _ROW)   # what a dead worker left

    def add(self, slot: int, amount: int) -> None:
        self._cells[self.index * _ROW + slot] += amount

    def total(self, slot: int) -> int:
        return sum(self._cells[worker * _ROW + slot] for worker in range(self.count))

    def own(self, slot: int) -> int:
        return int(self._cells[self.index * _ROW + slot])


def client_bucket(key: str) -> int:
    """The counter slot of a client key (the same in every process: not ``hash()``)."""
    return _FIRST_BUCKET + zlib.crc32(key.encode()) % CLIENT_BUCKETS


class NodeConnectionLimits(ConnectionLimits):
    """[server] max_connections and max_connections_per_client for the whole node."""

    def __init__(self, counters: NodeCounters, total: int, per_client: int, warn: RateLimitedLog) -> None:
        super().__init__(total, per_client, warn)
        self._counters = counters

    def open(self, peer: str) -> bool:
        node = self._counters.total(_CONNECTIONS)
        if node >= self.total_limit:
            self._warn.warn("max_connections", "{total} connections open on the node, the [server] "
                            "max_connections limit: refusing new ones (latest from {client})", total=node,
                            client=peer)
            return False
        self.total += 1
        self._counters.add(_CONNECTIONS, 1)
        return True

    def close(self) -> None:
        if self.total > 0:
            self.total -= 1
            self._counters.add(_CONNECTIONS, -1)

    def identify(self, peer: str) -> str | None:
        key = super().identify(peer)
        if key is None:
            return None
        bucket = client_bucket(key)
        held = self._counters.total(bucket)
        if held >= self.per_client_limit:
            self.by_client[key] -= 1
            if self.by_client[key] <= 0:
                del self.by_client[key]
            self._warn.warn("max_connections_per_client",
                            "{client} has {count} connections open on the node, the [server] "
                            "max_connections_per_client limit: refusing more", client=key, count=held)
            return None
        self._counters.add(bucket, 1)
        return key

    def forget(self, key: str) -> None:
        super().forget(key)
        self._counters.add(client_bucket(key), -1)


class NodeBodyBudget(BodyBudget):
    """[server] max_pending_body_bytes for the whole node."""

    def __init__(self, counters: NodeCounters, limit: int, warn: RateLimitedLog) -> None:
        super().__init__(limit, warn)
        self._counters = counters

    def reserve(self, amount: int) -> None:
        if self._counters.total(_BODY_BYTES) + amount > self.limit:
            self._warn.warn("max_pending_body_bytes",
                            "request bodies in memory on the node reached [server] max_pending_body_bytes "
                            "({limit} bytes): refusing more with 503", limit=self.limit)
            raise unavailable_busy("the registry is receiving too many request bodies at once; retry shortly")
        self.held += amount
        self._counters.add(_BODY_BYTES, amount)

    def release(self, amount: int) -> None:
        amount = min(amount, self.held)
        self.held -= amount
        self._counters.add(_BODY_BYTES, -amount)
