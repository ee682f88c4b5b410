"""Sanity tests for the upstream fixtures the pull-through cache tests use.

Plain HTTP clients only, no registryd: docker-registry in its four set-ups
(blocking http.client, it is another process), the token server, and the
in-process fake upstream (asynchronously, it shares the reactor).
"""
from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
import tracemalloc
import urllib.parse
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from fake_upstream import FakeUpstream, fake_upstream  # noqa: F401  (fixture)
from token_server import b64url_decode, decode_jwt
from upstreams import (  # noqa: F401  (fixtures)
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
    SeededBlob,
    blob_path,
    client_for,
    manifest_path,
    push_blob,
    push_image,
    push_index,
    reference_upstream,
    seeded_bytes,
    sha256_digest,
)

pytestmark = pytest.mark.timeout(60)

ACCEPT = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}


def pull(client: RegistryClient, repo: str, image: dict[str, Any]) -> None:
    """Read an image back by tag and by digest and check every byte."""
    scope = f"repository:{repo}:pull"
    for reference in (image["tag"], image["digest"]):
        got = client.expect(200, "GET", f"/v2/{repo}/manifests/{reference}", headers=ACCEPT, scope=scope)
        assert got.body == image["manifest"]
        assert got.header("Content-Type") == image["media_type"]
        assert got.header("Docker-Content-Digest") == image["digest"]
    for blob in image["layers"] + [image["config"]]:
        got = client.expect(200, "GET", f"/v2/{repo}/blobs/{blob['digest']}", scope=scope)
        assert sha256_digest(got.body) == blob["digest"]
        assert len(got.body) == blob["size"]
        if blob["data"] is not None:
            assert got.body == blob["data"]


# -- docker-registry ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["open", "htpasswd", "tls", "token"])
def test_push_and_pull_back(reference_upstream: Any, kind: str) -> None:
    up = reference_upstream(kind)
    assert up.url == f"{'https' if kind == 'tls' else 'http'}://{up.host}"
    assert up.host.startswith("127.0.0.1:") and up.port != 5000
    image = push_image(up, "lib/app", "v1", layer_sizes=[300, 2 << 20])
    assert image["layers"][0]["data"] is not None and image["layers"][1]["data"] is None   # > 1 MiB
    pull(client_for(up), "lib/app", image)


def test_count_counts_served_requests(reference_upstream: Any) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1", layer_sizes=[5000])
    layer = image["layers"][0]["digest"]
    client = client_for(up)
    assert up.count("GET", blob_path("lib/app", layer)) == 0
    for _ in range(3):
        client.expect(200, "GET", f"/v2/lib/app/blobs/{layer}")
    client.expect(200, "HEAD", f"/v2/lib/app/blobs/{layer}")
    client.expect(404, "GET", "/v2/lib/app/manifests/nope")
    assert up.count("GET", blob_path("lib/app", layer)) == 3
    assert up.count("GET", blob_path("lib/app", layer), status=200) == 3
    assert up.count(None, blob_path("lib/app", layer), status=200) == 4
    assert up.count("GET", manifest_path("lib/app", "nope"), status=404) == 1
    assert up.count("GET", r"/v2/lib/app/blobs/.*") == 3
    served = [e for e in up.requests() if e.method == "GET" and e.path.endswith(layer)]
    assert [e.size for e in served] == [5000] * 3


def test_htpasswd_refuses_wrong_password(reference_upstream: Any) -> None:
    up = reference_upstream("htpasswd")
    anonymous = RegistryClient(up.url)
    response = anonymous.request("GET", "/v2/")
    assert response.status == 401
    assert response.header("WWW-Authenticate") == 'Basic realm="upstream-test"'
    assert RegistryClient(up.url, up.username, "wrong").request("GET", "/v2/").status == 401
    assert client_for(up).request("GET", "/v2/").status == 200


def test_tls_needs_the_test_ca(reference_upstream: Any) -> None:
    up = reference_upstream("tls")
    with pytest.raises(ssl.SSLCertVerificationError):
        RegistryClient(up.url).request("GET", "/v2/")   # system trust store only
    assert client_for(up).request("GET", "/v2/").status == 200
    by_name = RegistryClient(f"https://localhost:{up.port}", ca_file=up.ca_file)
    assert by_name.request("GET", "/v2/").status == 200
    with open(up.ca_file, "rb") as f:
        assert x509.load_pem_x509_certificate(f.read()).extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca


def test_token_flow(reference_upstream: Any) -> None:
    up = reference_upstream("token")
    assert up.token_realm == up.token_server + "/token"
    challenge = RegistryClient(up.url).send("GET", "/v2/lib/app/manifests/v1")
    assert challenge.status == 401
    assert challenge.header("WWW-Authenticate") == (
        f'Bearer realm="{up.token_realm}",service="{up.token_service}",'
        'scope="repository:lib/app:pull"')

    client = client_for(up)
    image = push_image(up, "lib/app", "v1", client=client)
    # One token for the whole push: the client cached it per scope.
    assert up.token_count() == 1
    assert up.token_requests()[0] == {"method": "GET", "user": "alice", "status": 200,
                                      "scopes": ["repository:lib/app:pull,push"],
                                      "service": up.token_service}

    token = client.tokens["repository:lib/app:pull,push"]
    header, claims = decode_jwt(token)
    assert header["alg"] == "RS256" and header["typ"] == "JWT" and header["kid"]
    assert claims["iss"] == up.token_issuer and claims["aud"] == up.token_service
    assert claims["sub"] == "alice" and claims["jti"]
    assert claims["nbf"] <= time.time() < claims["exp"] and claims["iat"] == claims["nbf"]
    assert claims["access"] == [{"type": "repository", "name": "lib/app", "actions": ["pull", "push"]}]
    document = client.token_responses[0]
    assert document["token"] == document["access_token"] and document["expires_in"] == 300
    assert document["issued_at"].endswith("Z")
    # The signature checks out with the x5c leaf, which the test CA issued.
    leaf = x509.load_der_x509_certificate(base64.b64decode(header["x5c"][0]))
    signing_input, _, signature = token.rpartition(".")
    public_key = leaf.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(b64url_decode(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    with open(up.ca_file, "rb") as f:
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(f.read()))

    # Anonymous users get pull, and only pull (Docker Hub's policy).
    anonymous = RegistryClient(up.url)
    pull(anonymous, "lib/app", image)
    assert anonymous.request("POST", "/v2/lib/app/blobs/uploads/", b"",
                             scope="repository:lib/app:pull,push").status == 401
    assert decode_jwt(anonymous.tokens["repository:lib/app:pull,push"])[1]["access"][0]["actions"] == ["pull"]

    wrong = RegistryClient(up.url, up.username, "wrong")
    with pytest.raises(AssertionError, match="token server answered 401"):
        wrong.request("GET", "/v2/lib/app/manifests/v1")
    assert up.token_count(status=401) == 1

    up.set_token_policy(allow_anonymous=False)
    with pytest.raises(AssertionError, match="token server answered 401"):
        RegistryClient(up.url).request("GET", "/v2/lib/app/manifests/v1")
    assert client_for(up).request("GET", "/v2/lib/app/manifests/v1", headers=ACCEPT).status == 200

    # The registry really checks the token: an expired one (beyond the 60 s
    # leeway) is refused.
    up.set_token_policy(expires_in=-120)
    expired = client_for(up)
    assert expired.request("GET", "/v2/lib/app/manifests/v1", headers=ACCEPT).status == 401
    up.set_token_policy(expires_in=300, fail_status=503)
    with pytest.raises(AssertionError, match="token server answered 503"):
        client_for(up).request("GET", "/v2/lib/app/manifests/v1")
    up.reset_token_count()
    assert up.token_count() == 0


def test_token_kind_can_refuse_anonymous_from_the_start(reference_upstream: Any) -> None:
    up = reference_upstream("token", allow_anonymous=False, tls=True)
    assert up.url.startswith("https://")
    with pytest.raises(AssertionError, match="token server answered 401"):
        RegistryClient(up.url, ca_file=up.ca_file).request("GET", "/v2/lib/app/manifests/v1")
    push_image(up, "lib/app", "v1")
    # The OAuth2 password grant (POST, urlencoded form) works too.
    token_server = RegistryClient(up.token_server)
    form = urllib.parse.urlencode({"grant_type": "password", "service": up.token_service,
                                   "scope": "repository:lib/app:pull", "client_id": "test",
                                   "username": up.username, "password": up.password}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = token_server.send("POST", "/token", form, headers)
    assert response.status == 200
    token = response.json()["access_token"]
    assert decode_jwt(token)[1]["access"] == [{"type": "repository", "name": "lib/app", "actions": ["pull"]}]
    manifest = RegistryClient(up.url, ca_file=up.ca_file).send(
        "GET", "/v2/lib/app/manifests/v1", headers={**ACCEPT, "Authorization": f"Bearer {token}"})
    assert manifest.status == 200
    wrong = form.replace(up.password.encode(), b"nope")
    assert token_server.send("POST", "/token", wrong, headers).status == 401
    assert up.token_count(method="POST") == 2


def test_big_blob_is_streamed(reference_upstream: Any) -> None:
    up = reference_upstream("open")
    size = 64 << 20
    tracemalloc.start()
    try:
        info = push_blob(up, "lib/big", (size, "big-seed"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"push_blob held {peak} bytes"
    assert info["size"] == size and info["data"] is None and info["seed"] == "big-seed"
    assert info["digest"] == SeededBlob("big-seed", size).digest
    # Read it back in pieces and compare with the regenerated bytes.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=30)
    conn.request("GET", f"/v2/lib/big/blobs/{info['digest']}")
    response = conn.getresponse()
    assert response.status == 200 and int(response.getheader("Content-Length") or -1) == size
    h = hashlib.sha256()
    for expected in SeededBlob("big-seed", size).chunks():
        got = response.read(len(expected))
        assert got == expected
        h.update(got)
    conn.close()
    assert "sha256:" + h.hexdigest() == info["digest"]
    assert up.count("GET", blob_path("lib/big", info["digest"])) == 1


def test_seeded_data_is_deterministic() -> None:
    blob = SeededBlob(7, 3 * (1 << 20) + 5)
    assert b"".join(blob.chunks(1000)) == b"".join(blob.chunks()) == seeded_bytes(7, blob.size)
    assert blob.digest == sha256_digest(blob.data())
    assert SeededBlob(8, 100).data() != SeededBlob(7, 100).data()


def test_index_and_docker_manifests(reference_upstream: Any) -> None:
    up = reference_upstream("open")
    amd = push_image(up, "lib/multi", None, layer_sizes=[10])
    arm = push_image(up, "lib/multi", None, layer_sizes=[20], docker=True)
    index = push_index(up, "lib/multi", "latest", [amd, arm])
    client = client_for(up)
    got = client.expect(200, "GET", "/v2/lib/multi/manifests/latest", headers=ACCEPT)
    assert got.body == index["manifest"] and got.header("Docker-Content-Digest") == index["digest"]
    entries = json.loads(got.body)["manifests"]
    assert [e["digest"] for e in entries] == [amd["digest"], arm["digest"]]
    docker = client.expect(200, "GET", f"/v2/lib/multi/manifests/{arm['digest']}",
                           headers={"Accept": arm["media_type"]})
    assert docker.body == arm["manifest"]


def test_stop_and_start_keep_port_and_data(reference_upstream: Any) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1")
    up.stop()
    assert not up.running
    with pytest.raises(ConnectionRefusedError):
        RegistryClient(up.url).request("GET", "/v2/")
    up.start()
    pull(client_for(up), "lib/app", image)


@pytest_twisted.ensureDeferred
async def test_async_count_waits_on_the_reactor(reference_upstream: Any) -> None:
    up = reference_upstream("open")
    image = push_image(up, "lib/app", "v1")
    layer = image["layers"][0]["digest"]
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(b"GET", f"{up.url}/v2/lib/app/blobs/{layer}".encode())
    body = await Body.collect(response)
    assert body.data == image["layers"][0]["data"]
    assert await up.wait_count("GET", blob_path("lib/app", layer), 1) == 1
    assert await up.acount("GET", blob_path("lib/app", layer)) == 1


# -- the fake upstream ----------------------------------------------------------

class Body(Protocol):
    """Collects a response body, remembering when each piece came."""

    def __init__(self) -> None:
        self.pieces: list[tuple[float, bytes]] = []
        self.done: Deferred[Body] = Deferred()
        self.reason: Any = None
        self.first: Deferred[None] = Deferred()

    @property
    def data(self) -> bytes:
        return b"".join(p for _, p in self.pieces)

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append((time.monotonic(), data))
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.done.callback(self)

    @classmethod
    def start(cls, response: Any) -> Body:
        body = cls()
        response.deliverBody(body)
        return body

    @classmethod
    async def collect(cls, response: Any) -> Body:
        return await cls.start(response).done


async def get(url: str, method: bytes = b"GET", headers: dict[bytes, list[bytes]] | None = None) -> Any:
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    return await agent.request(method, url.encode(), Headers(headers or {}))


@pytest_twisted.ensureDeferred
async def test_fake_serves_manifests_and_blobs(fake_upstream: FakeUpstream) -> None:
    fake = fake_upstream
    assert fake.url == f"http://{fake.host}" and fake.host.startswith("127.0.0.1:")
    image = fake.add_image("lib/app", "v1", layer_sizes=[1000])
    layer = image["layers"][0]

    response = await get(f"{fake.url}/v2/")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"Docker-Distribution-API-Version") == [b"registry/2.0"]
    await Body.collect(response)

    for reference in ("v1", image["digest"]):
        response = await get(f"{fake.url}/v2/lib/app/manifests/{reference}")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"Content-Type") == [image["media_type"].encode()]
        assert response.headers.getRawHeaders(b"Docker-Content-Digest") == [image["digest"].encode()]
        assert (await Body.collect(response)).data == image["manifest"]

    path = fake.blob_path("lib/app", layer["digest"])
    response = await get(fake.url + path)
    assert response.code == 200 and response.length == 1000
    assert response.headers.getRawHeaders(b"Docker-Content-Digest") == [layer["digest"].encode()]
    assert (await Body.collect(response)).data == layer["data"]

    response = await get(fake.url + path, b"HEAD")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"Content-Length") == [b"1000"]
    await Body.collect(response)

    response = await get(fake.url + path, headers={b"Range": [b"bytes=100-"]})
    assert response.code == 206
    assert response.headers.getRawHeaders(b"Content-Range") == [b"bytes 100-999/1000"]
    assert (await Body.collect(response)).data == layer["data"][100:]

    response = await get(f"{fake.url}/v2/lib/app/tags/list")
    assert json.loads((await Body.collect(response)).data) == {"name": "lib/app", "tags": ["v1"]}

    for missing, code in (("/v2/lib/app/manifests/v2", "MANIFEST_UNKNOWN"),
                          ("/v2/lib/app/blobs/sha256:" + "0" * 64, "BLOB_UNKNOWN")):
        response = await get(fake.url + missing)
        assert response.code == 404
        assert json.loads((await Body.collect(response)).data)["errors"][0]["code"] == code

    assert fake.count("GET", path) == 2 and fake.count("HEAD", path) == 1 and fake.count(None, path) == 3
    assert [r.headers.get("range") for r in fake.requests if r.path == path] == [None, None, "bytes=100-"]


@pytest_twisted.ensureDeferred
async def test_fake_drop_after(fake_upstream: FakeUpstream) -> None:
    fake = fake_upstream
    digest = fake.add_blob("lib/app", seeded_bytes(1, 200_000))
    path = fake.blob_path("lib/app", digest)
    fake.drop_after(path, 70_000, times=1)

    response = await get(fake.url + path)
    assert response.length == 200_000
    body = await Body.collect(response)
    assert len(body.data) == 70_000 and body.data == seeded_bytes(1, 200_000)[:70_000]
    assert not body.reason.check(ResponseDone)

    response = await get(fake.url + path)      # times=1: recovered by itself
    body = await Body.collect(response)
    assert body.reason.check(ResponseDone) and sha256_digest(body.data) == digest
    assert fake.count("GET", path) == 2


@pytest_twisted.ensureDeferred
async def test_fake_wrong_bytes_and_recover(fake_upstream: FakeUpstream) -> None:
    fake = fake_upstream
    digest = fake.add_blob("lib/app", b"x" * 5000)
    path = fake.blob_path("lib/app", digest)
    fake.wrong_bytes(path)
    for _ in range(2):
        response = await get(fake.url + path)
        assert response.headers.getRawHeaders(b"Docker-Content-Digest") == [digest.encode()]
        body = await Body.collect(response)
        assert len(body.data) == 5000 and sha256_digest(body.data) != digest
    fake.recover(path)
    body = await Body.collect(await get(fake.url + path))
    assert sha256_digest(body.data) == digest


@pytest_twisted.ensureDeferred
async def test_fake_stall_after_and_release(fake_upstream: FakeUpstream) -> None:
    fake = fake_upstream
    data = seeded_bytes(2, 100_000)
    digest = fake.add_blob("lib/app", data)
    path = fake.blob_path("lib/app", digest)
    fake.stall_after(path, 10_000)
    body = Body.start(await get(fake.url + path))
    await body.first
    await deferLater(reactor, 0.3, lambda: None)
    assert len(body.data) == 10_000 and not body.done.called
    assert fake.stalled(path) == 1
    assert fake.release_stalled(path) == 1
    await body.done
    assert body.reason.check(ResponseDone) and body.data == data


@pytest_twisted.ensureDeferred
async def test_fake_stalled_connection_is_cut_at_close() -> None:
    fake = FakeUpstream(reactor).start()
    digest = fake.add_blob("lib/app", b"y" * 50_000)
    fake.stall_after(fake.blob_path("lib/app", digest), 100)
    body = Body.start(await get(fake.url + fake.blob_path("lib/app", digest)))
    await body.first
    await fake.close()
    await body.done
    assert len(body.data) == 100 and not body.reason.check(ResponseDone)


@pytest_twisted.ensureDeferred
async def test_fake_status_faults(fake_upstream: FakeUpstream) -> None:
    fake = fake_upstream
    image = fake.add_image("lib/app", "v1")
    tag_path = fake.manifest_path("lib/app", "v1")
    fake.status(tag_path, 429, retry_after=7, times=2)
    response = await get(fake.url + tag_path)
    assert response.code == 429
    assert response.headers.getRawHeaders(b"Retry-After") == [b"7"]
    document = json.loads((await Body.collect(response)).data)
    assert document["errors"][0]["code"] == "TOOMANYREQUESTS"
    response = await get(fake.url + tag_path, b"HEAD")
    assert response.code == 429
    await Body.collect(response)
    response = await get(fake.url + tag_path)
    assert response.code == 200 and (await Body.collect(response)).data == image["manifest"]

    fake.status("/v2/", 503)
    response = await get(fake.url + "/v2/")
    assert response.code == 503 and response.headers.getRawHeaders(b"Retry-After") is None
    await Body.collect(response)
    fake.recover()
    response = await get(fake.url + "/v2/")
    assert response.code == 200
    await Body.collect(response)
    assert fake.count("GET", tag_path) == 2 and fake.count("HEAD", tag_path) == 1


@pytest_twisted.ensureDeferred
async def test_fake_slow_drips_the_body(fake_upstream: FakeUpstream) -> None:
    fake = fake_upstream
    data = seeded_bytes(3, 4000)
    digest = fake.add_blob("lib/app", data)
    path = fake.blob_path("lib/app", digest)
    fake.slow(path, 200, tick=0.01)
    body = Body.start(await get(fake.url + path))
    await body.first
    assert not body.done.called and len(body.data) < len(data)
    await body.done
    assert body.data == data and len(body.pieces) >= 10
    assert body.pieces[-1][0] - body.pieces[0][0] >= 0.1


@pytest_twisted.ensureDeferred
async def test_fake_wait_for(fake_upstream: FakeUpstream) -> None:
    fake = fake_upstream
    waiting = fake.wait_for("GET", "/v2/", 2)
    await Body.collect(await get(fake.url + "/v2/"))
    assert not waiting.called
    await Body.collect(await get(fake.url + "/v2/?x=1"))
    assert waiting.called
    assert fake.requests[-1].query == "x=1"
    await fake.wait_for("GET", "/v2/", 1)
