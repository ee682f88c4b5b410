"""End-to-end: Debian's containerd 1.6 pulls through registryd as a mirror.

containerd is pointed at registryd the documented way, with a
``hosts.toml`` for the registry it mirrors (``upstream.test``); containerd
then asks the mirror for ``/v2/lib/app/...?ns=upstream.test`` and registryd
routes by that ``ns`` to the configured upstream, here Debian's
docker-registry. ``upstream.test`` itself never resolves: only the mirror
can have served the image.

The in-process registryd runs on the test's reactor, so the daemon and
every ``ctr`` call run in threads (see ``containerd_daemon``). A missing
containerd is a failure, not a skip.
"""
from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted

from registryd.config import UpstreamConfig
from upstreams import blob_path, manifest_path, reference_upstream  # noqa: F401  (fixture)

from .containerd_daemon import (  # noqa: F401  (fixtures)
    make_containerd, push_unpackable_image, request_tap,
)

pytestmark = pytest.mark.timeout(90)

HOSTS_TOML = """\
server = "https://upstream.test"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
"""


def write_hosts_dir(directory: Any, namespace: str, mirror: str) -> str:
    """A containerd hosts directory: ``DIR/<namespace>/hosts.toml``."""
    path = os.path.join(str(directory), namespace)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "hosts.toml"), "w") as f:
        f.write(HOSTS_TOML.format(mirror=mirror))
    return str(directory)


def repo_requests(requests: list[tuple[str, str]], repo: str) -> list[tuple[str, str, dict[str, list[str]]]]:
    """(method, path, query) of the requests for ``repo`` (``/v2/`` pings excluded)."""
    found = []
    for method, target in requests:
        parts = urlsplit(target)
        if parts.path.startswith(f"/v2/{repo}/"):
            found.append((method, parts.path, parse_qs(parts.query)))
    return found


@pytest_twisted.ensureDeferred
async def test_containerd_pulls_through_hosts_toml_mirror(
        reference_upstream: Any, make_registry: Any, make_containerd: Any, request_tap: Any,
        tmp_path: Any) -> None:
    up = reference_upstream("open")
    image = push_unpackable_image(up, "lib/app", "v1", marker="registryd-containerd-e2e")
    blobs = [image["config"]["digest"], image["layers"][0]["digest"]]

    registry = make_registry(upstreams=(UpstreamConfig(namespace="upstream.test", url=up.url),))
    tap = request_tap(registry.host)          # records exactly what containerd sent
    hosts_dir = write_hosts_dir(tmp_path / "hosts.d", "upstream.test", tap.url)
    daemon = await make_containerd()
    ref = "upstream.test/lib/app:v1"

    # -- first pull: registryd fetches from the upstream ---------------------
    await daemon.ctr("images", "pull", "--hosts-dir", hosts_dir, "--snapshotter", "native", ref)

    listing = await daemon.ctr("images", "ls")
    assert daemon.image_digests(listing.stdout).get(ref) == image["digest"], listing.stdout
    check = await daemon.ctr("images", "check")
    assert re.search(rf"^{re.escape(ref)}\s.*\bcomplete \(2/2\).*\btrue\s*$", check.stdout, re.M), check.stdout
    # Unpacked, not just fetched: the layer's file is in a native snapshot.
    assert daemon.native_snapshot_file("etc/registryd-e2e") == [image["marker"]]

    first = repo_requests(tap.requests, "lib/app")
    assert first, f"containerd sent nothing for lib/app to the mirror: {tap.requests}"
    assert all(query.get("ns") == ["upstream.test"] for _, _, query in first), first
    fetched = {path.rsplit("/", 1)[1] for method, path, _ in first if method == "GET" and "/blobs/" in path}
    assert fetched == set(blobs), first

    for digest in blobs:
        assert await up.acount("GET", blob_path("lib/app", digest)) == 1, digest
    assert await up.acount(None, manifest_path("lib/app", "v1"), status=200) >= 1

    # -- second pull into a fresh namespace: served from registryd's cache ---
    # The daemon isolates content per namespace, so every blob is fetched again.
    seen = len(tap.requests)
    await daemon.ctr("images", "pull", "--hosts-dir", hosts_dir, "--snapshotter", "native", ref,
                     namespace="second")
    listing = await daemon.ctr("images", "ls", namespace="second")
    assert daemon.image_digests(listing.stdout).get(ref) == image["digest"], listing.stdout

    second = repo_requests(tap.requests[seen:], "lib/app")
    assert all(query.get("ns") == ["upstream.test"] for _, _, query in second), second
    refetched = {path.rsplit("/", 1)[1] for method, path, _ in second if method == "GET" and "/blobs/" in path}
    assert refetched == set(blobs), second
    for digest in blobs:
        assert await up.acount("GET", blob_path("lib/app", digest)) == 1, digest


@pytest_twisted.ensureDeferred
async def test_containerd_pull_of_an_unconfigured_registry_gets_nothing(
        reference_upstream: Any, make_registry: Any, make_containerd: Any, request_tap: Any,
        tmp_path: Any) -> None:
    """A hosts.toml for quay.test points at registryd, which mirrors only upstream.test (its
    default upstream, which has someorg/tools:v1): containerd's ``?ns=quay.test`` requests are
    404 NAME_UNKNOWN, so the pull fails; it never receives upstream.test's image."""
    up = reference_upstream("open")
    push_unpackable_image(up, "someorg/tools", "v1", marker="not-quay")
    registry = make_registry(upstreams=(UpstreamConfig(namespace="upstream.test", url=up.url, default=True),))
    tap = request_tap(registry.host)
    hosts_dir = write_hosts_dir(tmp_path / "hosts.d", "quay.test", tap.url)
    with open(os.path.join(hosts_dir, "quay.test", "hosts.toml")) as f:
        text = f.read().replace("https://upstream.test", "https://quay.test")
    with open(os.path.join(hosts_dir, "quay.test", "hosts.toml"), "w") as f:
        f.write(text)
    daemon = await make_containerd()

    pulled = await daemon.ctr("images", "pull", "--hosts-dir", hosts_dir, "--snapshotter", "native",
                              "quay.test/someorg/tools:v1", check=False)
    assert pulled.returncode != 0, pulled.stdout
    asked = repo_requests(tap.requests, "someorg/tools")
    assert asked, f"containerd sent nothing for someorg/tools to the mirror: {tap.requests}"
    assert all(query.get("ns") == ["quay.test"] for _, _, query in asked), asked
    # containerd's log line for the mirror's answer (it then tries quay.test itself, which is unreachable).
    assert "response was http.StatusNotFound" in pulled.stderr, pulled.stderr
    for method in ("GET", "HEAD"):
        assert await up.acount(method, manifest_path("someorg/tools", "v1")) == 0
    listing = await daemon.ctr("images", "ls")
    assert "quay.test/someorg/tools:v1" not in listing.stdout
