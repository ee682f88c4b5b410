"""What a mirrored repository may serve, and to whom (issues 13 and 21).

* A blob is served in a mirrored repository only once its bytes were
  fetched from that upstream repository and verified there: a manifest that
  names a digest, or an upstream answering ``HEAD`` 200, never opens a blob
  the store holds for someone else (alice's private push).
* A running upstream transfer is joined only by clients of the same
  upstream repository: never across namespaces, repositories or users, and
  a stalled one never holds up another repository's clients.
* A client of a transfer never gets the blob's last byte before its digest
  is verified: a corrupted upstream body is always an aborted response.
* ``?ns=`` naming no configured upstream is ``404 NAME_UNKNOWN``, never
  another registry's image; ``?ns=`` naming registryd itself is no ``ns``.

Upstreams are the in-process fake (tests/fake_upstream.py): these are
faults and lies a real registry does not produce on demand.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, ResponseDone

from fake_upstream import FakeUpstream, fake_upstream  # noqa: F401  (fixture)
from oci_client import Client, digest_of
from registryd.auth.policy import parse_access_rules
from registryd.config import StorageSettings, UpstreamConfig
from registryd.digest import parse_digest
from support.wait import sleep
from test_mirror import Download, download, stored_blobs
from test_security import as_user, auth_settings, write_htpasswd, PASSWORDS

pytestmark = pytest.mark.timeout(60)

NS = "upstream.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SECRET = b"alice's private layer: " + os.urandom(4000)


def rules(*extra: dict[str, Any]) -> Any:
    return parse_access_rules([
        {"users": ["alice"], "repositories": ["team/**"], "actions": ["pull", "push"]},
        *extra,
    ])


def secured(make_registry: Any, tmp_path: Any, upstreams: tuple[UpstreamConfig, ...], *extra: dict[str, Any]) -> Any:
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), PASSWORDS)
    return make_registry(auth=auth_settings(htpasswd), access=rules(*extra), upstreams=upstreams)


def manifest_naming(fake: FakeUpstream, repo: str, layer_digest: str, layer_size: int, tag: str) -> str:
    """An image manifest in ``repo`` upstream whose layer is ``layer_digest`` (which the
    upstream need not have); its config is a blob the upstream does have."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                                                                          "diff_ids": []}}).encode()
    config_digest = fake.add_blob(repo, config)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": layer_size}],
    }).encode()
    return fake.add_manifest(repo, body, OCI_MANIFEST, tag)


def mirror_link(data_dir: str, namespace: str, repo: str, digest: str) -> str:
    algorithm, hex_digest = digest.split(":")
    return os.path.join(data_dir, "mirror", namespace, repo, "_blobs", algorithm, hex_digest)


def never_complete(d: Download, size: int) -> bool:
    """The client cannot mistake what it got for the blob: an error, or a body cut short."""
    return d.status != 200 or d.length != size or d.body < size


async def until(condition: Any, seconds: float) -> bool:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        await sleep(0.01)
    return condition()


# --- issue 13 item 1: only fetched blobs are served ------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_manifest_naming_a_private_blob_does_not_open_it(fake_upstream, make_registry, tmp_path) -> None:
    registry = secured(make_registry, tmp_path, (UpstreamConfig(namespace=NS, url=fake_upstream.url),),
                       {"users": ["anonymous", "*"], "repositories": [f"{NS}/**"], "actions": ["pull"]})
    secret = await as_user(registry.url, "alice").push_blob("team/secret", SECRET)
    anonymous = Client(registry.url)
    assert (await anonymous.get(f"/v2/team/secret/blobs/{secret}")).status == 401
    manifest_naming(fake_upstream, "lib/x", secret, len(SECRET), "latest")

    reply = await anonymous.get(f"/v2/{NS}/lib/x/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200, str(reply)
    for path in (f"/v2/{NS}/lib/x/blobs/{secret}", f"/v2/lib/x/blobs/{secret}?ns={NS}"):
        for method in ("GET", "HEAD"):
            reply = await anonymous.request(method, path, check=method == "GET")
            assert reply.status == 404 and (method == "HEAD" or reply.codes == ["BLOB_UNKNOWN"]), str(reply)
            assert SECRET not in reply.body
    # The upstream was asked for the bytes, and said it has none.
    assert fake_upstream.count("GET", fake_upstream.blob_path("lib/x", secret)) == 2
    assert not os.path.exists(mirror_link(registry.data_dir, NS, "lib/x", secret))
    # Alice's blob is untouched.
    assert (await as_user(registry.url, "alice").get(f"/v2/team/secret/blobs/{secret}")).body == SECRET


@pytest_twisted.ensureDeferred
async def test_an_upstream_head_does_not_open_a_private_blob(fake_upstream, make_registry, tmp_path) -> None:
    """An upstream that answers HEAD 200 for a digest (and sends other bytes on GET)."""
    registry = secured(make_registry, tmp_path, (UpstreamConfig(namespace=NS, url=fake_upstream.url),),
                       {"users": ["anonymous", "*"], "repositories": [f"{NS}/**"], "actions": ["pull"]})
    secret = await as_user(registry.url, "alice").push_blob("team/secret", SECRET)
    lie = b"not alice's bytes"
    fake_upstream.blobs[("lib/x", secret)] = lie
    anonymous = Client(registry.url)
    path = f"/v2/{NS}/lib/x/blobs/{secret}"

    head = await anonymous.head(path)
    assert head.status == 200 and head.header("Content-Length") == str(len(lie)), str(head)
    assert not os.path.exists(mirror_link(registry.data_dir, NS, "lib/x", secret))
    for _ in range(2):
        got = await download(registry.host, path)
        assert got.digest != secret and never_complete(got, len(lie)), vars(got)
    assert fake_upstream.count("GET", fake_upstream.blob_path("lib/x", secret)) == 2
    assert not os.path.exists(mirror_link(registry.data_dir, NS, "lib/x", secret))
    assert (await as_user(registry.url, "alice").get(f"/v2/team/secret/blobs/{secret}")).body == SECRET


@pytest_twisted.ensureDeferred
async def test_a_stored_blob_is_fetched_and_verified_before_a_mirror_serves_it(fake_upstream, make_registry) -> None:
    """The store has the bytes (a local push), the upstream repository has them too:
    one full upstream GET, then the mirrored repository serves them from the cache."""
    data = os.urandom(50_000)
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    client = Client(registry.url)
    digest = await client.push_blob("team/app", data)
    fake_upstream.add_blob("lib/app", data)
    upstream_path = fake_upstream.blob_path("lib/app", digest)
    for _ in range(2):
        reply = await client.get(f"/v2/{NS}/lib/app/blobs/{digest}")
        assert reply.status == 200 and reply.body == data
    assert fake_upstream.count("GET", upstream_path) == 1
    await until(lambda: not registry.service.api.mirror.fills, 5)
    assert os.path.exists(mirror_link(registry.data_dir, NS, "lib/app", digest))
    assert stored_blobs(registry.data_dir) == [digest.split(":")[1]]


# --- issue 13 item 2: a fill is joined only through its own upstream repository ------------

@pytest_twisted.ensureDeferred
async def test_a_private_fill_is_not_joined_from_another_namespace(fake_upstream, make_registry, tmp_path) -> None:
    other = FakeUpstream(reactor).start()
    try:
        data = os.urandom(200_000)
        digest = fake_upstream.add_blob("private/app", data)
        private_path = fake_upstream.blob_path("private/app", digest)
        fake_upstream.stall_after(private_path, 50_000)
        registry = secured(make_registry, tmp_path, (
            UpstreamConfig(namespace="private.test", url=fake_upstream.url),
            UpstreamConfig(namespace="other.test", url=other.url)),
            {"users": ["alice"], "repositories": ["private.test/**"], "actions": ["pull"]},
            {"users": ["anonymous", "*"], "repositories": ["other.test/**"], "actions": ["pull"]})
        alice = as_user(registry.url, "alice")
        alices = defer.ensureDeferred(alice.get(f"/v2/private.test/private/app/blobs/{digest}"))
        await fake_upstream.wait_for("GET", private_path)

        anonymous = defer.ensureDeferred(download(registry.host, f"/v2/other.test/lib/nothing/blobs/{digest}"))
        answered_during_the_stall = await until(lambda: anonymous.called, 3)
        fake_upstream.release_stalled(private_path)
        got = await anonymous
        assert answered_during_the_stall, "anonymous waited on alice's transfer"
        assert got.status == 404 and got.digest != digest, vars(got)
        assert other.count("GET", other.blob_path("lib/nothing", digest)) == 1
        reply = await alices
        assert reply.status == 200 and reply.body == data
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_a_stalled_fill_does_not_hold_up_another_repository(fake_upstream, make_registry) -> None:
    """lib/a's transfer stalls; lib/b's clients get the same digest from their own transfer,
    and both transfers commit the one blob; each repository's clients share one fetch."""
    data = os.urandom(300_000)
    digest = fake_upstream.add_blob("lib/a", data)
    fake_upstream.add_blob("lib/b", data)
    path_a, path_b = (fake_upstream.blob_path(repo, digest) for repo in ("lib/a", "lib/b"))
    fake_upstream.stall_after(path_a, 1000)
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url, idle_timeout=20),))
    stalled = [defer.ensureDeferred(download(registry.host, f"/v2/{NS}/lib/a/blobs/{digest}")) for _ in range(3)]
    await fake_upstream.wait_for("GET", path_a)
    others = defer.gatherResults([defer.ensureDeferred(download(registry.host, f"/v2/{NS}/lib/b/blobs/{digest}"))
                                  for _ in range(3)])
    served_during_the_stall = await until(lambda: others.called, 5)
    assert not any(d.called for d in stalled)
    fake_upstream.release_stalled(path_a)
    assert served_during_the_stall, "lib/b's clients waited on lib/a's stalled transfer"
    for got in [*await others, *await defer.gatherResults(stalled)]:
        assert (got.status, got.body, got.digest) == (200, len(data), digest)
    assert (fake_upstream.count("GET", path_a), fake_upstream.count("GET", path_b)) == (1, 1)
    await until(lambda: not registry.service.api.mirror.fills, 5)
    assert stored_blobs(registry.data_dir) == [digest.split(":")[1]]
    for repo in ("lib/a", "lib/b"):
        assert os.path.exists(mirror_link(registry.data_dir, NS, repo, digest))


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: Any) -> Any:
    """Each driver; for s3 a fresh bucket on the session's Ceph."""
    if request.param == "filesystem":
        yield StorageSettings()
        return
    bucket = pytest_twisted.blockon(defer.Deferred.fromCoroutine(request.getfixturevalue("ceph_s3").new_bucket()))
    yield StorageSettings("s3", s3=bucket.settings)
    pytest_twisted.blockon(defer.Deferred.fromCoroutine(bucket.close()))


@pytest_twisted.ensureDeferred
async def test_two_repositories_commit_one_digest_at_once(fake_upstream, make_registry, storage) -> None:
    """Two fills of one digest (two upstream repositories) end in the same turn: both
    commit the one blob into the shared store at once, and both repositories serve it."""
    data = os.urandom(200_000)
    repos = ("lib/a", "lib/b")
    for repo in repos:
        digest = fake_upstream.add_blob(repo, data)
        fake_upstream.stall_after(fake_upstream.blob_path(repo, digest), 100_000)
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),), storage=storage)
    pulls = [defer.ensureDeferred(download(registry.host, f"/v2/{NS}/{repo}/blobs/{digest}")) for repo in repos]
    for repo in repos:
        assert await until(lambda: fake_upstream.count("GET", fake_upstream.blob_path(repo, digest)) == 1, 5), repo
    mirror = registry.service.api.mirror
    assert await until(lambda: len(mirror.fills) == 2 and all(f.written == 100_000 for f in mirror.fills.values()),
                       5), mirror.fills
    assert fake_upstream.release_stalled() == 2
    for got in await defer.gatherResults(pulls):
        assert (got.status, got.body, got.digest) == (200, len(data), digest)
    assert not mirror.fills
    store = registry.service.store
    assert await store.blobs.size(parse_digest(digest)) == len(data)
    for repo in repos:
        assert await mirror.mirrors[NS].repositories.has_blob(repo, parse_digest(digest))
        reply = await Client(registry.url).get(f"/v2/{NS}/{repo}/blobs/{digest}")
        assert reply.status == 200 and reply.body == data
        assert fake_upstream.count("GET", fake_upstream.blob_path(repo, digest)) == 1


# --- issue 21 item 1: the tail waits for the digest check -----------------------------------

def fetch_blocking(host: str, path: str) -> tuple[int, int | None, int]:
    """(status, Content-Length, body bytes) of a GET read by a plain socket, as curl reads:
    in its own thread, so it takes bytes the moment they arrive, not when the reactor lets it."""
    hostname, port = host.split(":")
    with socket.create_connection((hostname, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        received = b""
        try:
            while chunk := s.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    if not head:
        return 0, None, 0
    lines = head.decode("latin-1").split("\r\n")
    lengths = [int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:")]
    return int(lines[0].split()[1]), (lengths[0] if lengths else None), len(body)


@pytest.mark.parametrize("size", [3000, 140_000, 300_000, 1_000_000])
@pytest_twisted.ensureDeferred
async def test_a_corrupted_upstream_body_never_reaches_a_client_complete(fake_upstream, make_registry,
                                                                         size) -> None:
    """The upstream flips the last byte and keeps the length; of 30 pulls, none may get
    status 200 and the whole Content-Length (a complete, wrong body)."""
    data = os.urandom(size)
    digest = fake_upstream.add_blob("lib/app", data)
    fake_upstream.wrong_bytes(fake_upstream.blob_path("lib/app", digest))
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url),))
    results = []
    for _ in range(30):
        results.append(await deferToThread(fetch_blocking, registry.host, f"/v2/{NS}/lib/app/blobs/{digest}"))
    complete = [r for r in results if r == (200, size, size)]
    assert complete == [], f"{len(complete)} of 30 clients got a whole body of wrong bytes: {results}"
    assert stored_blobs(registry.data_dir) == []


class Stream(Protocol):
    """A response body as a client library sees it: bytes so far, and whether it ended whole."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.complete: bool | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.complete = reason.check(ResponseDone) is not None
        self.done.callback(None)


async def stream(url: str) -> tuple[Any, Stream]:
    response = await Agent(reactor).request(b"GET", url.encode())
    body = Stream()
    response.deliverBody(body)
    return response, body


@pytest.mark.parametrize("upstream_ends", ["verified", "stalled"])
@pytest_twisted.ensureDeferred
async def test_the_last_byte_waits_until_the_digest_is_verified(fake_upstream, make_registry,
                                                                upstream_ends) -> None:
    """The upstream sends every byte of a body of unknown length (chunked), then holds back
    its end: clients, one of them arriving only after all the bytes were in (the hot path),
    get all but the last byte. It comes once the body ended and its digest matched; if the
    upstream stalls instead, each client's response is cut short without it."""
    data = os.urandom(100_000)
    digest = fake_upstream.add_blob("lib/app", data)
    path = fake_upstream.blob_path("lib/app", digest)
    fake_upstream.stall_after(path, len(data), chunked=True)
    idle_timeout = 30 if upstream_ends == "verified" else 2     # "stalled": the fill gives up after 2 s
    registry = make_registry(upstreams=(UpstreamConfig(namespace=NS, url=fake_upstream.url,
                                                       idle_timeout=idle_timeout),))
    url = f"{registry.url}/v2/{NS}/lib/app/blobs/{digest}"
    clients = [await stream(url)]
    await fake_upstream.wait_for("GET", path)
    fill = next(iter(registry.service.api.mirror.fills.values()))
    assert await until(lambda: fill.written == len(data), 3)
    clients.append(await stream(url))
    # The late client is sent everything there is at once: all but the last byte.
    late = clients[1][1]
    assert await until(lambda: len(late.data) == len(data) - 1, 3), len(late.data)
    await sleep(0.2)
    assert [(len(body.data) < len(data), body.complete) for _, body in clients] == [(True, None)] * 2
    assert len(late.data) == len(data) - 1
    if upstream_ends == "verified":
        fake_upstream.release_stalled(path)
    for response, body in clients:
        await body.done
        assert response.code == 200
        if upstream_ends == "verified":
            assert body.complete and bytes(body.data) == data
        else:
            assert not body.complete and len(body.data) < len(data) and data.startswith(body.data)
    assert fake_upstream.count("GET", path) == 1
    await until(lambda: not registry.service.api.mirror.fills, 5)
    assert stored_blobs(registry.data_dir) == ([digest.split(":")[1]] if upstream_ends == "verified" else [])


# --- issue 21 item 3: ?ns= of an unconfigured registry --------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_unconfigured_ns_is_name_unknown(fake_upstream, make_registry) -> None:
    """containerd asks for quay.test's someorg/tools; only a default upstream (and a local
    repository of that name) exist: 404 NAME_UNKNOWN, and nothing is asked of anyone."""
    image = fake_upstream.add_image("someorg/tools", "v1")
    registry = make_registry(upstreams=(UpstreamConfig(namespace="docker.test", url=fake_upstream.url,
                                                       default=True),), local_prefixes=("team",))
    client = Client(registry.url)
    local = await client.push_image("team/app", "v1")
    for path in ("/v2/someorg/tools/manifests/v1?ns=quay.test", f"/v2/someorg/tools/blobs/{image['config']['digest']}"
                 "?ns=quay.test", "/v2/someorg/tools/tags/list?ns=quay.test",
                 f"/v2/team/app/manifests/v1?ns=quay.test", f"/v2/team/app/blobs/{digest_of(local.blobs[0])}?ns=quay.test"):
        reply = await client.get(path, headers={"Accept": OCI_MANIFEST})
        assert (reply.status, reply.codes) == (404, ["NAME_UNKNOWN"]), str(reply)
        assert "quay.test" in reply.json()["errors"][0]["message"]
    assert fake_upstream.requests == []
    # Nor may anything be pushed for it.
    before = stored_blobs(registry.data_dir)
    reply = await client.post(f"/v2/team/app/blobs/uploads/?ns=quay.test&digest={digest_of(b'x')}", b"x")
    assert (reply.status, reply.codes) == (404, ["NAME_UNKNOWN"]), str(reply)
    assert stored_blobs(registry.data_dir) == before


@pytest_twisted.ensureDeferred
async def test_an_ns_naming_registryd_itself_is_no_ns(fake_upstream, make_registry) -> None:
    """containerd pulling from registryd as its registry sends ?ns=<its host:port>: a local
    repository is served, and a name that is not local is what it is without ns."""
    image = fake_upstream.add_image("someorg/tools", "v1")
    registry = make_registry(upstreams=(UpstreamConfig(namespace="docker.test", url=fake_upstream.url,
                                                       default=True),), local_prefixes=("team",))
    client = Client(registry.url)
    local = await client.push_image("team/app", "v1")
    reply = await client.get(f"/v2/team/app/manifests/v1?ns={registry.host}", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.header("Docker-Content-Digest") == local.digest, str(reply)
    blob = await client.get(f"/v2/team/app/blobs/{digest_of(local.blobs[0])}?ns={registry.host}")
    assert blob.status == 200 and blob.body == local.blobs[0]
    reply = await client.get(f"/v2/someorg/tools/manifests/v1?ns={registry.host}", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.header("Docker-Content-Digest") == image["digest"], str(reply)
    assert fake_upstream.count("GET", fake_upstream.manifest_path("someorg/tools", "v1")) == 1
    assert fake_upstream.count(None, fake_upstream.manifest_path("team/app", "v1")) == 0
