"""Prometheus metrics of one registryd (its own registry, so several can run in one process).

In a worker process of a node ([server] workers), prometheus_client runs in
its multiprocess mode (the supervisor sets PROMETHEUS_MULTIPROC_DIR to
``<data_dir>/run/metrics``): every worker writes its values to files there,
and any worker's /metrics (and the status page's hit rate) adds up the
whole node's.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from registryd.listeners import MULTIPROC_ENV
from registryd.reactor_lag import BUCKETS as LAG_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_ROUTES = [
    ("base", re.compile(r"^/v2/?$")),
    ("catalog", re.compile(r"^/v2/_catalog$")),
    ("upload", re.compile(r"^/v2/.+/blobs/uploads/[^/]*$")),
    ("blob", re.compile(r"^/v2/.+/blobs/[^/]+$")),
    ("manifest", re.compile(r"^/v2/.+/manifests/[^/]+$")),
    ("tags", re.compile(r"^/v2/.+/tags/list$")),
    ("referrers", re.compile(r"^/v2/.+/referrers/[^/]+$")),
    ("health", re.compile(r"^/(healthz|readyz)$")),
    ("metrics", re.compile(r"^/metrics$")),
]


def route_of(path: str) -> str:
    """A small, fixed set of labels: never the repository name (unbounded)."""
    for label, pattern in _ROUTES:
        if pattern.match(path):
            return label
    return "other"


class Metrics:
    """The counters and gauges registryd exports at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: The folder every worker of the node writes its values to (None: one process).
        self.shared_dir = os.environ.get(MULTIPROC_ENV) or None
        self._node: CollectorRegistry | None = None
        self._own: list[Any] = []     # collectors of this process's state, not in the shared files
        self.requests = Counter("registryd_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.bytes_in = Counter("registryd_http_received_bytes", "Request body bytes received", ["route"],
                                registry=r)
        self.bytes_out = Counter("registryd_http_sent_bytes", "Response body bytes sent", ["route"], registry=r)
        self.cache = Counter("registryd_mirror_cache_requests", "Mirrored reads served from cache (hit) or "
                             "upstream (miss)", ["kind", "result"], registry=r)
        self.upstream_fetches = Counter("registryd_upstream_blob_fetches", "Blob transfers started from upstreams",
                                        ["upstream"], registry=r)
        self.coalesced = Counter("registryd_upstream_coalesced_waiters",
                                 "Requests that joined a blob transfer already running", registry=r)
        self.upstream_errors = Counter("registryd_upstream_errors", "Upstream failures (network, 5xx, 429, "
                                       "bad content)", ["upstream"], registry=r)
        self.fills_in_flight = Gauge("registryd_upstream_fills_in_flight", "Blob transfers from upstreams now "
                                     "running", registry=r, multiprocess_mode="livesum")
        self.store_bytes = Gauge("registryd_store_bytes", "Bytes of blobs in the store, by what keeps them "
                                 "(local content, only the mirror cache, nothing yet), at the last survey",
                                 ["kind"], registry=r, multiprocess_mode="livemax")
        self.store_blobs = Gauge("registryd_store_blobs", "Blobs in the store at the last survey", registry=r,
                                 multiprocess_mode="livemax")
        self.mirror_max_size = Gauge("registryd_mirror_cache_max_bytes", "The mirror cache limit "
                                     "([mirror] max_size; 0: none)", registry=r, multiprocess_mode="max")
        self.evicted_manifests = Counter("registryd_mirror_evicted_manifests", "Cached manifests evicted to "
                                         "keep the mirror cache under max_size", registry=r)
        self.evicted_blobs = Counter("registryd_mirror_evicted_blobs", "Cached blobs evicted", registry=r)
        self.evicted_bytes = Counter("registryd_mirror_evicted_bytes", "Bytes of cached blobs evicted", registry=r)
        self.gc_runs = Counter("registryd_gc_runs", "Online garbage collections, by outcome", ["outcome"],
                               registry=r)
        self.gc_removed_blobs = Counter("registryd_gc_removed_blobs", "Blobs removed by online garbage "
                                        "collection", registry=r)
        self.gc_reclaimed = Counter("registryd_gc_reclaimed_bytes", "Bytes reclaimed by online garbage "
                                    "collection", registry=r)
        self.gc_last_success = Gauge("registryd_gc_last_success_timestamp_seconds", "When the last successful "
                                     "online garbage collection ended", registry=r, multiprocess_mode="max")
        self.gc_duration = Gauge("registryd_gc_last_duration_seconds", "How long the last successful online "
                                 "garbage collection took", registry=r, multiprocess_mode="mostrecent")
        self.reactor_lag = Histogram("registryd_reactor_lag_seconds", "How late the reactor ran a timer due "
                                     "every 0.1 s: the wait of every request while its thread is busy",
                                     buckets=LAG_BUCKETS, registry=r)

    def cache_totals(self) -> tuple[int, int]:
        """Mirrored reads served from cache and from upstream, over every route
        (a stale tag, served while its upstream is down, came from the cache)."""
        totals = {"hit": 0.0, "miss": 0.0}
        families = self.cache.collect() if self.shared_dir is None else [
            family for family in self._node_registry().collect() if family.name == "registryd_mirror_cache_requests"]
        for family in families:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals["miss" if sample.labels["result"] == "miss" else "hit"] += sample.value
        return int(totals["hit"]), int(totals["miss"])

    def watch_hot_cache(self, cache: Any) -> None:
        """Export a node's S3 hot blob cache (registryd.storage.hot_cache.HotCache), read at each scrape."""
        collector = HotCacheCollector(cache)
        self.registry.register(collector)
        self._own.append(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry if self.shared_dir is None else self._node_registry())

    def _node_registry(self) -> CollectorRegistry:
        """Every worker's values, added up from the shared folder (and this process's own collectors)."""
        if self._node is None:
            self._node = CollectorRegistry()
            MultiProcessCollector(self._node, self.shared_dir)
            for collector in self._own:
                self._node.register(collector)
        return self._node


class HotCacheCollector:
    """The hot blob cache's own counters as metrics: the cache counts, this only reads."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        cache, stats = self._cache, self._cache.stats
        requests = CounterMetricFamily("registryd_s3_hot_cache_requests", "Streamed blob GETs sent from the "
                                       "local hot cache (hit) or from the bucket (miss)", labels=["result"])
        requests.add_metric(["hit"], stats.hits)
        requests.add_metric(["miss"], stats.misses)
        yield requests
        yield CounterMetricFamily("registryd_s3_hot_cache_filled_bytes", "Bytes of blobs put in the hot cache",
                                  value=stats.filled_bytes)
        yield CounterMetricFamily("registryd_s3_hot_cache_evicted_bytes", "Bytes of blobs evicted from the hot "
                                  "cache to stay under cache_size", value=stats.evicted_bytes)
        yield CounterMetricFamily("registryd_s3_hot_cache_rejected_fills", "Hot cache fills dropped because the "
                                  "body's size or digest was wrong", value=stats.rejected)
        yield GaugeMetricFamily("registryd_s3_hot_cache_bytes", "Bytes of blobs in the hot cache now",
                                value=cache.used)
        yield GaugeMetricFamily("registryd_s3_hot_cache_blobs", "Blobs in the hot cache now", value=len(cache))
        yield GaugeMetricFamily("registryd_s3_hot_cache_max_bytes", "The hot cache limit ([storage] cache_size)",
                                value=cache.capacity)
