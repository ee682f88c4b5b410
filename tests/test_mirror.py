"""The pull-through cache against real upstreams (Debian's docker-registry)
and, for faults a real one won't produce on demand, the fake upstream."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from e2e.skopeo_cli import Skopeo
from fake_upstream import fake_upstream  # noqa: F401
from oci_client import Client
from registryd.config import UpstreamConfig
from support.clock import WallClock
from upstreams import SeededBlob, blob_path, manifest_path, push_blob, push_image, reference_upstream  # noqa: F401
from support.wait import sleep

NS = "upstream.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def upstream_config(up: Any, **extra: Any) -> UpstreamConfig:
    settings: dict[str, Any] = {"namespace": NS, "url": up.url}
    if getattr(up, "username", None) and up.kind in ("htpasswd", "token"):
        settings.update(username=up.username, password=up.password)
    if up.url.startswith("https"):
        settings["ca_file"] = up.ca_file
    settings.update(extra)
    return UpstreamConfig(**settings)


class Download(Protocol):
    """A raw HTTP/1.1 GET that hashes its body as it streams in."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.head = b""
        self.body = 0
        self.hasher = hashlib.sha256()
        self.first_byte_at: float | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.status = 0
        self.length: int | None = None
        self.headers: dict[str, str] = {}   # lower-case names

    def connectionMade(self) -> None:
        self.transport.write(f"GET {self.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        if self.status == 0:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, data = self.head.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                key, _, value = line.partition(":")
                self.headers[key.lower()] = value.strip()
            if "content-length" in self.headers:
                self.length = int(self.headers["content-length"])
        if data:
            if self.first_byte_at is None:
                self.first_byte_at = time.monotonic()
            self.body += len(data)
            self.hasher.update(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(None)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


async def download(host: str, path: str) -> Download:
    hostname, port = host.split(":")
    protocol = Download(path)
    await connectProtocol(TCP4ClientEndpoint(reactor, hostname, int(port)), protocol)
    await protocol.done
    return protocol


def registries_conf(skopeo: Skopeo, registry_host: str) -> None:
    """cri-o / podman style: a per-path mirror with the namespace as prefix."""
    with open(skopeo.registries_conf, "w") as f:
        f.write(f'''
[[registry]]
prefix = "{NS}"
location = "{NS}"

[[registry.mirror]]
location = "{registry_host}/{NS}"
insecure = true
''')


@pytest.mark.parametrize("kind", ["open", "htpasswd", "tls", "token"])
@pytest_twisted.ensureDeferred
async def test_skopeo_pulls_through_a_registries_conf_mirror(kind, reference_upstream, make_registry,
                                                             tmp_path) -> None:
    """cri-o's code path: /v2/upstream.test/<repo>/..., every upstream auth and TLS set-up."""
    up = reference_upstream(kind)
    image = push_image(up, "lib/app", "v1", layer_sizes=[2000, 300_000])
    if kind == "token":
        up.reset_token_count()  # count only registryd's token requests
    registry = make_registry(upstreams=(upstream_config(up),))
    skopeo = Skopeo(tmp_path / "skopeo")
    registries_conf(skopeo, registry.host)
    # upstream.test does not resolve: only the mirror can answer.
    await skopeo.run("copy", "--preserve-digests", f"docker://{NS}/lib/app:v1", f"oci:{tmp_path}/out:v1")
    index = (tmp_path / "out" / "index.json").read_text()
    assert image["digest"] in index
    for layer in image["layers"]:
        path = tmp_path / "out" / "blobs" / "sha256" / layer["digest"].split(":")[1]
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == layer["digest"]
        assert await up.acount("GET", blob_path("lib/app", layer["digest"])) == 1
    # Pulled again: every blob from the cache.
    await skopeo.run("copy", f"docker://{NS}/lib/app:v1", f"oci:{tmp_path}/again:v1")
    for layer in image["layers"]:
        assert await up.acount("GET", blob_path("lib/app", layer["digest"])) == 1
    if kind == "token":
        assert up.token_count(status=200) == 1, "the bearer token was not cached"


@pytest_twisted.ensureDeferred
async def test_three_ways_to_ask_for_a_mirror(reference_upstream, make_registry) -> None:
    """containerd ?ns=, cri-o path prefix and docker's default upstream, one instance."""
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1")
    registry = make_registry(upstreams=(upstream_config(up, default=True),))
    client = Client(registry.url)
    headers = {"Accept": OCI_MANIFEST}
    for path in (f"/v2/lib/app/manifests/v1?ns={NS}", f"/v2/{NS}/lib/app/manifests/v1", "/v2/lib/app/manifests/v1"):
        reply = await client.get(path, headers=headers)
        assert reply.status == 200, str(reply)
        assert reply.header("Docker-Content-Digest") == image["digest"]
        assert reply.body == image["manifest"]
    assert await up.acount("GET", manifest_path("lib/app", "v1")) == 1
    layer = image["layers"][0]
    reply = await client.get(f"/v2/lib/app/blobs/{layer['digest']}?ns={NS}")
    assert reply.status == 200 and reply.body == layer["data"]


@pytest_twisted.ensureDeferred
async def test_mirrored_repositories_are_read_only_and_local_ones_pushable(reference_upstream, make_registry) -> None:
    registry_blob = b"local blob"
    up = reference_upstream("open")
    registry = make_registry(upstreams=(upstream_config(up, default=True),), local_prefixes=("team",))
    client = Client(registry.url)
    digest = "sha256:" + hashlib.sha256(registry_blob).hexdigest()
    for method, path in [("POST", f"/v2/{NS}/lib/app/blobs/uploads/"),
                         ("POST", f"/v2/lib/app/blobs/uploads/?ns={NS}&digest={digest}"),
                         ("PUT", f"/v2/{NS}/lib/app/manifests/v1"),
                         ("DELETE", f"/v2/{NS}/lib/app/manifests/v1"),
                         ("DELETE", f"/v2/{NS}/lib/app/blobs/{digest}")]:
        reply = await client.request(method, path, body=registry_blob if method != "DELETE" else None)
        assert reply.status == 405, str(reply)
        assert reply.codes == ["DENIED"]
        assert "read-only" in reply.json()["errors"][0]["message"]
    # With a default upstream, names under [mirror] local_prefixes are local and pushable.
    reply = await client.post(f"/v2/team/tool/blobs/uploads/?digest={digest}", registry_blob)
    assert reply.status == 201, str(reply)
    assert (await client.get(f"/v2/team/tool/blobs/{digest}")).body == registry_blob
    assert up.count(None, ".*/team/tool/.*") == 0


@pytest_twisted.ensureDeferred
async def test_unconfigured_hosts_are_never_contacted(fake_upstream, reference_upstream, make_registry) -> None:
    """?ns= or a path prefix naming an unlisted host stays local: no connection is made."""
    up = reference_upstream("open")
    fake_upstream.add_image("lib/app", "v1")
    registry = make_registry(upstreams=(upstream_config(up),))
    client = Client(registry.url)
    for path in (f"/v2/lib/app/manifests/v1?ns={fake_upstream.host}",
                 "/v2/lib/app/manifests/v1?ns=127.0.0.1",
                 "/v2/evil.example/lib/app/manifests/v1"):
        reply = await client.get(path)
        assert reply.status in (400, 404), str(reply)
    assert fake_upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_sixteen_clients_one_upstream_fetch(reference_upstream, make_registry) -> None:
    """16 clients, one cold 256 MiB blob: fetched once, streamed to all, first byte early."""
    up = reference_upstream("open")
    blob = SeededBlob("coalesce", 256 * 1024 * 1024)
    digest = push_blob(up, "lib/big", blob)["digest"]
    registry = make_registry(upstreams=(upstream_config(up),))
    path = f"/v2/{NS}/lib/big/blobs/{digest}"
    finished_at: list[float] = []

    async def watch_fill() -> None:
        fills = registry.service.api.mirror.fills
        for _ in range(10_000):
            if fills:
                next(iter(fills.values())).on_finished(lambda: finished_at.append(time.monotonic()))
                return
            await sleep(0.001)

    watcher = defer.ensureDeferred(watch_fill())
    downloads = await defer.gatherResults([defer.ensureDeferred(download(registry.host, path)) for _ in range(16)])
    await watcher
    assert await up.acount("GET", blob_path("lib/big", digest)) == 1
    for d in downloads:
        assert (d.status, d.length, d.body, d.digest) == (200, blob.size, blob.size, digest)
    first = min(d.first_byte_at for d in downloads if d.first_byte_at is not None)
    assert finished_at and first < finished_at[0], "no client got a byte before the upstream transfer ended"
    mirror = registry.service.api.mirror
    assert mirror.fills_started == 1 and mirror.fill_waiters == 15
    # Served from cache afterwards, still with a single upstream fetch.
    again = await download(registry.host, path)
    assert again.digest == digest
    assert await up.acount("GET", blob_path("lib/big", digest)) == 1


def stored_blobs(data_dir: str) -> list[str]:
    return sorted(name for _, _, files in os.walk(os.path.join(data_dir, "blobs")) for name in files)


def leftovers(data_dir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(data_dir, "tmp")))


@pytest.mark.parametrize("fault", ["drop", "wrong_bytes", "stall", "429", "503"])
@pytest_twisted.ensureDeferred
async def test_upstream_faults_cache_nothing_and_a_retry_succeeds(fault, fake_upstream, make_registry) -> None:
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[200_000])
    layer = image["layers"][0]
    path = fake_upstream.blob_path("lib/app", layer["digest"])
    {"drop": lambda: fake_upstream.drop_after(path, 50_000),
     "wrong_bytes": lambda: fake_upstream.wrong_bytes(path),
     "stall": lambda: fake_upstream.stall_after(path, 50_000),
     "429": lambda: fake_upstream.status(path, 429, retry_after=1),
     "503": lambda: fake_upstream.status(path, 503)}[fault]()
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url, idle_timeout=1),))
    client_path = f"/v2/{NS}/lib/app/blobs/{layer['digest']}"
    broken = await download(registry.host, client_path)
    if fault in ("429", "503"):
        assert broken.status == 503
    else:
        # Whatever reached the client, it never looks like a complete body:
        # an error document if nothing was sent yet, else a cut-off body (or
        # a reset before the buffered headers left).
        assert broken.status == 503 or broken.status == 0 or (
            broken.status == 200 and broken.length == 200_000 and broken.body < 200_000), vars(broken)
    await sleep(0.1)
    assert stored_blobs(registry.data_dir) == [] and leftovers(registry.data_dir) == []
    fake_upstream.recover()
    fixed = await download(registry.host, client_path)
    assert (fixed.status, fixed.body, fixed.digest) == (200, 200_000, layer["digest"])
    assert stored_blobs(registry.data_dir) == [layer["digest"].split(":")[1]]
    assert leftovers(registry.data_dir) == []


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_does_not_cancel_the_fill(fake_upstream, make_registry) -> None:
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[400_000])
    layer = image["layers"][0]
    path = fake_upstream.blob_path("lib/app", layer["digest"])
    fake_upstream.slow(path, 20_000, tick=0.01)
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    client = Client(registry.url)
    await client.send_truncated("GET", f"/v2/{NS}/lib/app/blobs/{layer['digest']}", b"", 0)
    for _ in range(200):
        if stored_blobs(registry.data_dir):
            break
        await sleep(0.05)
    assert stored_blobs(registry.data_dir) == [layer["digest"].split(":")[1]]
    reply = await client.get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
    assert reply.body == layer["data"] if layer["data"] is not None else reply.status == 200
    assert fake_upstream.count("GET", path) == 1


@pytest_twisted.ensureDeferred
async def test_a_stop_waits_for_running_fills_to_be_stored(fake_upstream, make_registry) -> None:
    """SIGTERM while a fill runs that no client waits for any more: it is stored before the exit."""
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[400_000])
    layer = image["layers"][0]
    path = fake_upstream.blob_path("lib/app", layer["digest"])
    # About 0.4 s: well past send_truncated's 0.2 s, so the fill is still running when it returns.
    fake_upstream.slow(path, 20_000, tick=0.02)
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    mirror = registry.service.api.mirror
    await Client(registry.url).send_truncated("GET", f"/v2/{NS}/lib/app/blobs/{layer['digest']}", b"", 0)
    for _ in range(200):
        if mirror.fills:
            break
        await sleep(0.01)
    assert mirror.fills and stored_blobs(registry.data_dir) == []
    await registry.service.stopService()
    assert stored_blobs(registry.data_dir) == [layer["digest"].split(":")[1]]
    assert fake_upstream.count("GET", path) == 1


@pytest_twisted.ensureDeferred
async def test_head_of_an_uncached_blob_does_not_download_it(reference_upstream, make_registry) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1", layer_sizes=[100_000])
    layer = image["layers"][0]
    registry = make_registry(upstreams=(upstream_config(up),))
    heads_by_push = await up.acount("HEAD", blob_path("lib/app", layer["digest"]))
    reply = await Client(registry.url).head(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
    assert reply.status == 200
    assert reply.header("Content-Length") == str(layer["size"])
    assert reply.header("Docker-Content-Digest") == layer["digest"]
    assert await up.acount("HEAD", blob_path("lib/app", layer["digest"])) == heads_by_push + 1
    assert await up.acount("GET", blob_path("lib/app", layer["digest"])) == 0
    assert stored_blobs(registry.data_dir) == []
    missing = await Client(registry.url).head(f"/v2/{NS}/lib/app/blobs/sha256:{'0' * 64}")
    assert missing.status == 404


@pytest_twisted.ensureDeferred
async def test_range_on_a_cached_blob(reference_upstream, make_registry) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1", layer_sizes=[100_000])
    layer = image["layers"][0]
    registry = make_registry(upstreams=(upstream_config(up),))
    client = Client(registry.url)
    path = f"/v2/{NS}/lib/app/blobs/{layer['digest']}"
    assert (await client.get(path)).body == layer["data"]
    reply = await client.get(path, headers={"Range": "bytes=10-19"})
    assert reply.status == 206 and reply.body == layer["data"][10:20]


@pytest_twisted.ensureDeferred
async def test_tags_are_revalidated_with_head_after_their_ttl(reference_upstream, make_registry) -> None:
    up = reference_upstream("open")
    first = push_image(up, "lib/app", "v1", seed=1)
    registry = make_registry(upstreams=(upstream_config(up, manifest_ttl=1),))
    clock = registry.service.api.mirror.clock = WallClock()
    client = Client(registry.url)
    path = f"/v2/{NS}/lib/app/manifests/v1"
    headers = {"Accept": OCI_MANIFEST}
    assert (await client.get(path, headers=headers)).header("Docker-Content-Digest") == first["digest"]
    assert (await client.get(path, headers=headers)).header("Docker-Content-Digest") == first["digest"]
    assert await up.acount("GET", manifest_path("lib/app", "v1")) == 1
    assert await up.acount("HEAD", manifest_path("lib/app", "v1")) == 0
    clock.advance(1.1)
    assert (await client.get(path, headers=headers)).header("Docker-Content-Digest") == first["digest"]
    assert await up.acount("HEAD", manifest_path("lib/app", "v1")) == 1
    assert await up.acount("GET", manifest_path("lib/app", "v1")) == 1
    second = push_image(up, "lib/app", "v1", seed=2)
    clock.advance(1.1)
    reply = await client.get(path, headers=headers)
    assert reply.header("Docker-Content-Digest") == second["digest"]
    assert reply.body == second["manifest"]
    assert await up.acount("GET", manifest_path("lib/app", "v1")) == 2
    # By digest: immutable, never asked again.
    for _ in range(2):
        reply = await client.get(f"/v2/{NS}/lib/app/manifests/{first['digest']}", headers=headers)
        assert reply.body == first["manifest"]
    assert await up.acount(None, manifest_path("lib/app", first["digest"])) == 0


@pytest_twisted.ensureDeferred
async def test_concurrent_manifest_requests_make_one_upstream_request(reference_upstream, make_registry) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1")
    registry = make_registry(upstreams=(upstream_config(up),))
    client = Client(registry.url)
    replies = await defer.gatherResults([
        defer.ensureDeferred(client.get(f"/v2/{NS}/lib/app/manifests/v1", headers={"Accept": OCI_MANIFEST}))
        for _ in range(8)])
    assert {r.header("Docker-Content-Digest") for r in replies} == {image["digest"]}
    assert await up.acount("GET", manifest_path("lib/app", "v1")) == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_accepting_different_lists_make_one_upstream_request(
        reference_upstream, make_registry) -> None:
    """docker, podman, containerd and skopeo each send an Accept list of their own: a tag they
    ask for at once is one upstream GET, served to each whose list takes the type it came as."""
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1")
    registry = make_registry(upstreams=(upstream_config(up),))
    client = Client(registry.url)
    index = "application/vnd.oci.image.index.v1+json"
    docker = "application/vnd.docker.distribution.manifest.v2+json"
    accepts = [OCI_MANIFEST, f"{OCI_MANIFEST}, {index}", f"{docker}, {OCI_MANIFEST}",
               f"{index}, {OCI_MANIFEST}, {docker}"]
    replies = await defer.gatherResults([
        defer.ensureDeferred(client.get(f"/v2/{NS}/lib/app/manifests/v1", headers={"Accept": accept}))
        for accept in accepts * 2])
    assert {(r.status, r.header("Docker-Content-Digest")) for r in replies} == {(200, image["digest"])}
    assert await up.acount("GET", manifest_path("lib/app", "v1")) == 1


@pytest_twisted.ensureDeferred
async def test_cached_content_is_served_while_upstream_is_down(reference_upstream, make_registry) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1", layer_sizes=[5000])
    registry = make_registry(upstreams=(upstream_config(up, manifest_ttl=1, connect_timeout=2),))
    clock = registry.service.api.mirror.clock = WallClock()
    client = Client(registry.url)
    headers = {"Accept": OCI_MANIFEST}
    layer = image["layers"][0]
    assert (await client.get(f"/v2/{NS}/lib/app/manifests/v1", headers=headers)).status == 200
    assert (await client.get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")).body == layer["data"]
    up.stop()
    clock.advance(1.1)
    stale = await client.get(f"/v2/{NS}/lib/app/manifests/v1", headers=headers)
    assert stale.status == 200 and stale.body == image["manifest"]
    assert (await client.get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")).body == layer["data"]
    assert (await client.get(f"/v2/{NS}/lib/app/tags/list")).json()["tags"] == ["v1"]
    uncached = await client.get(f"/v2/{NS}/lib/other/manifests/v1", headers=headers)
    assert uncached.status == 503


@pytest.mark.parametrize("where", ["global", "upstream"])
@pytest_twisted.ensureDeferred
async def test_offline_mode_never_contacts_upstream(where, fake_upstream, make_registry, tmp_path) -> None:
    image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[5000])
    layer = image["layers"][0]
    data_dir = str(tmp_path / "shared-data")
    online = make_registry(data_dir=data_dir, upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    client = Client(online.url)
    headers = {"Accept": OCI_MANIFEST}
    assert (await client.get(f"/v2/{NS}/lib/app/manifests/v1", headers=headers)).status == 200
    assert (await client.get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")).status == 200
    await online.service.stopService()
    seen = len(fake_upstream.requests)
    if where == "global":
        offline = make_registry(data_dir=data_dir, offline=True,
                                upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url, manifest_ttl=1),))
    else:
        offline = make_registry(data_dir=data_dir, upstreams=(
            UpstreamConfig(namespace=NS, url=fake_upstream.url, manifest_ttl=1, offline=True),))
    offline.service.api.mirror.clock = WallClock(ahead=1.1)
    client = Client(offline.url)
    assert (await client.get(f"/v2/{NS}/lib/app/manifests/v1", headers=headers)).body == image["manifest"]
    assert (await client.get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")).body == layer["data"]
    missing = await client.get(f"/v2/{NS}/lib/other/manifests/v1", headers=headers)
    assert missing.status == 404 and "offline" in missing.json()["errors"][0]["message"]
    assert (await client.get(f"/v2/{NS}/lib/app/blobs/sha256:{'1' * 64}")).status == 404
    assert len(fake_upstream.requests) == seen


@pytest_twisted.ensureDeferred
async def test_client_accept_list_is_honoured(reference_upstream, make_registry) -> None:
    up = reference_upstream("open")
    docker = push_image(up, "lib/app", "v1", docker=True)
    registry = make_registry(upstreams=(upstream_config(up),))
    client = Client(registry.url)
    docker_type = "application/vnd.docker.distribution.manifest.v2+json"
    reply = await client.get(f"/v2/{NS}/lib/app/manifests/v1", headers={"Accept": docker_type})
    assert reply.status == 200 and reply.header("Content-Type") == docker_type
    assert reply.header("Docker-Content-Digest") == docker["digest"]
    upstream_request = [r for r in up.requests() if r.path == manifest_path("lib/app", "v1")]
    assert upstream_request


@pytest_twisted.ensureDeferred
async def test_wrong_credentials_are_not_cached_as_content(reference_upstream, make_registry) -> None:
    up = reference_upstream("htpasswd")
    push_image(up, "lib/app", "v1")
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=up.url, username=up.username,
                                                       password="wrong"),))
    reply = await Client(registry.url).get(f"/v2/{NS}/lib/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 404
    assert stored_blobs(registry.data_dir) == []


@pytest_twisted.ensureDeferred
async def test_manifest_by_digest_with_upstream_down_is_a_503(fake_upstream, make_registry) -> None:
    image = fake_upstream.add_image("lib/app", "v1")
    fake_upstream.status(fake_upstream.manifest_path("lib/app", image["digest"]), 503)
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    reply = await Client(registry.url).get(f"/v2/{NS}/lib/app/manifests/{image['digest']}",
                                           headers={"Accept": OCI_MANIFEST})
    assert reply.status == 503 and reply.codes == ["UNAVAILABLE"]
    fake_upstream.recover()
    reply = await Client(registry.url).get(f"/v2/{NS}/lib/app/manifests/{image['digest']}",
                                           headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.body == image["manifest"]
