"""End-to-end: Debian's dockerd 20.10 pulls through registryd as its registry mirror.

dockerd uses ``registry-mirrors`` for Docker Hub images only, and asks the
mirror for ``/v2/library/app/...`` with no hint of the registry; registryd
sends such names to its default upstream. Here that upstream is named
``docker.io`` but is Debian's docker-registry on loopback: the test never
touches the internet, and a dockerd that falls back to the real Hub fails at
once (see ``docker_daemon``).

The in-process registryd runs on the test's reactor, so dockerd and every
``docker`` call run in threads. A missing docker.io is a failure, not a skip.
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted

from registryd.config import UpstreamConfig
from upstreams import blob_path, reference_upstream  # noqa: F401  (fixture)

from .containerd_daemon import push_unpackable_image, request_tap  # noqa: F401  (fixture)
from .docker_daemon import make_dockerd  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(90)


@pytest_twisted.ensureDeferred
async def test_dockerd_pulls_through_registry_mirror(
        reference_upstream: Any, make_registry: Any, make_dockerd: Any, request_tap: Any) -> None:
    up = reference_upstream("open")
    image = push_unpackable_image(up, "library/app", "v1", marker="registryd-dockerd-e2e", docker=True)
    config_digest = image["config"]["digest"]
    blobs = [config_digest, image["layers"][0]["digest"]]

    registry = make_registry(upstreams=(UpstreamConfig(namespace="docker.io", url=up.url, default=True),))
    tap = request_tap(registry.host)          # records exactly what dockerd sent
    daemon = await make_dockerd(mirrors=[tap.url])

    pulled = await daemon.docker("pull", "app:v1")
    assert f"Digest: {image['digest']}" in pulled.stdout, pulled.stdout

    inspected = await daemon.docker("image", "inspect", "app:v1")
    info = json.loads(inspected.stdout)[0]
    assert info["Id"] == config_digest
    assert info["RepoDigests"] == [f"app@{image['digest']}"]
    assert info["RootFS"]["Layers"] == [image["layers"][0]["diff_id"]]
    # Extracted, not just downloaded: the layer's file is on disk.
    assert daemon.vfs_file("etc/registryd-e2e") == [image["marker"]]

    sent = []
    for method, target in tap.requests:
        parts = urlsplit(target)
        if parts.path.startswith("/v2/library/app/"):
            sent.append((method, parts.path))
            assert "ns" not in parse_qs(parts.query), target
    assert sent, f"dockerd sent nothing for library/app to the mirror: {tap.requests}"
    fetched = {path.rsplit("/", 1)[1] for method, path in sent if method == "GET" and "/blobs/" in path}
    assert fetched == set(blobs), sent

    for digest in blobs:
        assert await up.acount("GET", blob_path("library/app", digest)) == 1, digest

    # -- after ``docker rmi`` the layers are gone: pulled again, from the cache
    await daemon.docker("rmi", "app:v1")
    assert daemon.vfs_file("etc/registryd-e2e") == []
    seen = len(tap.requests)
    pulled = await daemon.docker("pull", "app:v1")
    assert f"Digest: {image['digest']}" in pulled.stdout, pulled.stdout
    again = {urlsplit(target).path.rsplit("/", 1)[1] for method, target in tap.requests[seen:]
             if method == "GET" and urlsplit(target).path.startswith("/v2/library/app/blobs/")}
    assert again == set(blobs), tap.requests[seen:]
    assert daemon.vfs_file("etc/registryd-e2e") == [image["marker"]]
    for digest in blobs:
        assert await up.acount("GET", blob_path("library/app", digest)) == 1, digest
