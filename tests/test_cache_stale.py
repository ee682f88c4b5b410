"""The access log names a stale tag served while its upstream is down as what it is."""
from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.logger import globalLogPublisher

from oci_client import OCI_MANIFEST, Client
from registryd.config import UpstreamConfig
from support.clock import WallClock
from test_mirror import NS
from upstreams import push_image, reference_upstream  # noqa: F401


@pytest_twisted.ensureDeferred
async def test_a_stale_tag_is_logged_as_stale(reference_upstream: Any, make_registry: Any) -> None:
    up = reference_upstream("open")
    push_image(up, "lib/app", "v1")
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=up.url, manifest_ttl=1,
                                                       connect_timeout=2),))
    clock = registry.service.api.mirror.clock = WallClock()
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("access") and "/manifests/" in event.get("path", ""):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        client = Client(registry.url)
        path = f"/v2/{NS}/lib/app/manifests/v1"
        assert (await client.get(path, headers={"Accept": OCI_MANIFEST})).status == 200    # fetched
        assert (await client.get(path, headers={"Accept": OCI_MANIFEST})).status == 200    # within the TTL
        up.stop()
        clock.advance(1.1)
        assert (await client.get(path, headers={"Accept": OCI_MANIFEST})).status == 200    # stale
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [e["cache"] for e in events] == ["miss", "hit", "stale"]
    assert " cache=stale upstream=" in events[-1]["cache_note"]
    # The status page and /metrics count it as served from the cache.
    assert registry.service.api.metrics.cache_totals() == (2, 1)
    assert (await client.get("/")).status == 200
