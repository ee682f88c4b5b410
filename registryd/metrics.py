"""Prometheus metrics of one registryd (its own registry, so several can run in one process)."""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

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
                                     "running", registry=r)

    def cache_totals(self) -> tuple[int, int]:
        """Mirrored reads served from cache and from upstream, over every route."""
        totals = {"hit": 0.0, "miss": 0.0}
        for family in self.cache.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[sample.labels["result"]] += sample.value
        return int(totals["hit"]), int(totals["miss"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
