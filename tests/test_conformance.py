"""HTTP-level conformance of registryd to the OCI distribution spec v1.1.

Written from the text of the spec (``spec.md`` of opencontainers/
distribution-spec v1.1.0); each test's docstring names the rule it checks.
The registry runs in-process on a real loopback port (the ``registry``
fixture) and is spoken to over real HTTP with Twisted's Agent, so the
tests never block the reactor the server runs on.

Rules that hold for every response (the API version header, the JSON error
document, Content-Length on JSON and HEAD, no chunked JSON) are checked on
every single request by :mod:`oci_client`, so each test below also checks
them for all the requests it makes.

Where the spec leaves a choice (single-POST uploads, tag deletion, the
referrers filter, ``?tag=`` on a push by digest, ``mount`` without
``from``), the tests expect the choice registryd makes, and say so.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from registryd.config import Config, StorageSettings
from registryd.service import RegistryService
from registryd.storage.containerd.settings import ContainerdSettings
from registryd.storage.containerd.store import ContainerdStore
from registryd.storage.memory import MemoryDriver
from registryd.storage.memory_store import DriverStore

from conftest import RunningRegistry
from oci_client import (
    DOCKER_CONFIG,
    DOCKER_FOREIGN_LAYER,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    EMPTY_JSON,
    EMPTY_JSON_DIGEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    OCI_NONDISTRIBUTABLE_LAYER,
    Client,
    Image,
    Reply,
    descriptor,
    digest_of,
    encode,
    snapshot,
    with_query,
)

ACCEPT_ALL = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
OCTET = {"Content-Type": "application/octet-stream"}
REPO = "library/alpine"
MISSING_SHA256 = "sha256:" + "0" * 64
SBOM_TYPE = "application/vnd.example.sbom.v1"
SIGNATURE_CONFIG_TYPE = "application/vnd.example.signature.config.v1+json"
BUNDLE_TYPE = "application/vnd.example.bundle.v1"


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3), "memory",
                        pytest.param("containerd", marks=pytest.mark.e2e)])
def registry(request: Any, make_registry: Any, tmp_path: Any) -> Any:
    """The whole suite runs against every storage driver; s3 gets a fresh bucket on a real radosgw,
    memory a DriverStore over a MemoryDriver, in this process, containerd a namespace of its own
    in one real containerd for the module."""
    if request.param == "filesystem":
        return make_registry()
    if request.param == "memory":
        return memory_registry(request, tmp_path)
    if request.param == "containerd":
        daemon = request.getfixturevalue("module_containerd")
        namespace = f"conformance{next(_NAMESPACES)}"
        # foreign_names: every name the grammar allows is pushable, a.b/c too (by default a name
        # that starts with another registry's host is refused on this driver: README, and
        # tests/e2e/test_containerd_store.py::test_a_push_under_another_registrys_name_is_refused_unless_foreign_names).
        return make_registry(storage=StorageSettings("containerd", containerd=ContainerdSettings(
            socket=daemon.address, namespace=namespace, hostname="registry.example", foreign_names=True,
            content_dir=os.path.join(daemon.root, "io.containerd.content.v1.content"))))
    ceph = request.getfixturevalue("ceph_s3")
    bucket = pytest_twisted.blockon(defer.ensureDeferred(ceph.new_bucket()))
    running = make_registry(storage=StorageSettings("s3", s3=bucket.settings))
    running.bucket = bucket

    def finish() -> None:
        # Nothing but spools may ever land on the node's own disk.
        assert sorted(os.listdir(running.data_dir)) == ["tmp"], os.listdir(running.data_dir)
        pytest_twisted.blockon(defer.ensureDeferred(bucket.close()))

    request.addfinalizer(finish)
    return running


_NAMESPACES = itertools.count()


def memory_registry(request: Any, tmp_path: Any) -> RunningRegistry:
    """An in-process registryd whose blobs and repositories are a MemoryDriver's keys."""
    from twisted.internet import reactor

    data_dir = str(tmp_path / "memory")
    memory = MemoryDriver()
    service = RegistryService(Config(listen=("tcp:0:interface=127.0.0.1",), data_dir=data_dir), reactor,
                              store=lambda pool: DriverStore(data_dir, pool, memory))
    service.prepare_storage()
    service.privilegedStartService()
    service.startService()
    request.addfinalizer(lambda: pytest_twisted.blockon(service.stopService()))
    host = f"127.0.0.1:{service.ports[0].getHost().port}"
    return RunningRegistry(f"http://{host}", host, data_dir, service=service)


@pytest.fixture
def oci(registry: Any) -> Client:
    """A client for the default in-process registry."""
    return Client(registry.url)


async def store_snapshot(registry: Any, ignore_uploads: bool = False) -> dict[str, str]:
    """What the store holds: files under the data directory, and objects in the bucket for s3."""
    found = snapshot(registry.data_dir, ignore_uploads=ignore_uploads)
    memory = registry.service.store.objects if registry.service is not None else None
    if isinstance(memory, MemoryDriver):
        async for entry in memory.list(""):
            if not (ignore_uploads and entry.key.startswith("uploads/")):
                found[f"memory:{entry.key}"] = f"{entry.size}:{entry.version}"
    store = registry.service.store if registry.service is not None else None
    if isinstance(store, ContainerdStore):
        for info in await store.client.list_content():
            found[f"containerd:{info.digest}"] = f"{info.size}:{sorted(info.labels.items())}"
        for image in await store.client.images():
            found[f"containerd:{image.name}"] = f"{image.target.digest}:{sorted(image.labels.items())}"
    bucket = getattr(registry, "bucket", None)
    if bucket is not None:
        async for entry in bucket.list_objects(""):
            if ignore_uploads and entry.key.startswith("uploads/"):
                continue
            found[f"s3:{entry.key}"] = f"{entry.size}:{entry.etag}"
    return found


# -- helpers -------------------------------------------------------------------


def expect_error(reply: Reply, status: int, *codes: str) -> None:
    """``reply`` is an error with ``status`` and (unless HEAD) one of ``codes``."""
    assert reply.status == status, f"expected {status}\n{reply}"
    if codes and reply.method != "HEAD":
        assert set(reply.codes) & set(codes), f"expected a code among {codes}\n{reply}"


def expect_error_among(reply: Reply, allowed: dict[int, tuple[str, ...]]) -> None:
    """``reply`` is one of several acceptable errors: {status: codes}."""
    assert reply.status in allowed, f"expected a status among {sorted(allowed)}\n{reply}"
    expect_error(reply, reply.status, *allowed[reply.status])


async def assert_unchanged(registry: Any, before: dict[str, str], ignore_uploads: bool = False) -> None:
    """The store holds exactly what it held before a refused request."""
    after = await store_snapshot(registry, ignore_uploads=ignore_uploads)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    assert (added, removed, changed) == ([], [], []), (
        f"disk changed by a refused request: added={added} removed={removed} changed={changed}"
    )


async def get_manifest(oci: Client, repo: str, reference: str, method: str = "GET") -> Reply:
    return await oci.request(method, f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_ALL})


async def upload_status(oci: Client, location: str) -> Reply:
    return await oci.get(location)


def assert_upload_range(reply: Reply, end: int) -> None:
    """Chunk and status replies: ``Location`` and ``Range: 0-<end>``."""
    assert reply.header("Location"), f"no Location\n{reply}"
    assert reply.header("Range") == f"0-{end}", f"expected Range 0-{end}\n{reply}"


async def push_artifact(
    oci: Client,
    repo: str,
    *,
    artifact_type: str = SBOM_TYPE,
    payload: bytes = b'{"sbom": true}',
    subject: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    reference: str | None = None,
) -> Image:
    """An artifact manifest: ``artifactType`` and the empty config (image-spec 1.1)."""
    await oci.push_blob(repo, EMPTY_JSON)
    await oci.push_blob(repo, payload)
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(OCI_EMPTY, EMPTY_JSON),
        "layers": [descriptor("application/vnd.example.payload", payload)],
    }
    if subject is not None:
        document["subject"] = subject
    if annotations is not None:
        document["annotations"] = annotations
    body = encode(document)
    digest = digest_of(body)
    reply = await oci.push_manifest(repo, reference or digest, body, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    return Image(body=body, digest=digest, media_type=OCI_MANIFEST, reply=reply, blobs=[payload])


async def docker_image(oci: Client, repo: str, seed: str) -> tuple[bytes, str]:
    """Push a Docker schema2 config and layer; return the (unpushed) manifest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "docker": seed}).encode()
    layer = f"docker layer {seed}".encode()
    await oci.push_blob(repo, config)
    await oci.push_blob(repo, layer)
    body = encode({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER, layer)],
    })
    return body, DOCKER_MANIFEST


async def build_manifest(oci: Client, repo: str, kind: str) -> tuple[bytes, str]:
    """Push everything a manifest of ``kind`` refers to; return its bytes and type."""
    if kind == "oci-image":
        config = b'{"architecture":"arm64","os":"linux"}'
        layers = [b"layer one", b"layer two"]
        for blob in (config, *layers):
            await oci.push_blob(repo, blob)
        return encode({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
            "annotations": {"org.opencontainers.image.title": "roundtrip"},
        }), OCI_MANIFEST
    if kind == "oci-index":
        children = [await oci.push_image(repo, seed=f"child{i}") for i in range(2)]
        return encode({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                dict(child.descriptor(), platform={"architecture": arch, "os": "linux"})
                for child, arch in zip(children, ["amd64", "arm64"])
            ],
        }), OCI_INDEX
    if kind == "docker-manifest":
        return await docker_image(oci, repo, "solo")
    if kind == "docker-manifest-list":
        entries = []
        for arch in ("amd64", "arm64"):
            body, media_type = await docker_image(oci, repo, arch)
            reply = await oci.push_manifest(repo, digest_of(body), body, media_type)
            assert reply.status == 201, str(reply)
            entries.append(dict(descriptor(media_type, body), platform={"architecture": arch, "os": "linux"}))
        return encode({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": entries}), DOCKER_MANIFEST_LIST
    if kind == "artifact":
        payload = b"signature bytes"
        await oci.push_blob(repo, EMPTY_JSON)
        await oci.push_blob(repo, payload)
        return encode({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.signature.v1",
            "config": descriptor(OCI_EMPTY, EMPTY_JSON),
            "layers": [descriptor("application/vnd.example.signature.v1+raw", payload)],
        }), OCI_MANIFEST
    if kind == "artifact-empty-layer":
        await oci.push_blob(repo, EMPTY_JSON)
        return encode({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.marker.v1",
            "config": descriptor(OCI_EMPTY, EMPTY_JSON),
            "layers": [descriptor(OCI_EMPTY, EMPTY_JSON)],
            "annotations": {"org.example.marker": "yes"},
        }), OCI_MANIFEST
    raise AssertionError(kind)


async def tags_of(oci: Client, repo: str) -> list[str]:
    reply = await oci.get(f"/v2/{repo}/tags/list")
    assert reply.status == 200, str(reply)
    return reply.json()["tags"] or []


# -- API version check ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_api_version_check(oci: Client) -> None:
    """end-1: GET /v2/ answers 200 with Docker-Distribution-API-Version: registry/2.0."""
    reply = await oci.get("/v2/")
    assert reply.status == 200, str(reply)
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0"


@pytest_twisted.ensureDeferred
async def test_api_version_check_head(oci: Client) -> None:
    """end-1: the version check also answers HEAD, with the version header."""
    reply = await oci.head("/v2/")
    assert reply.status == 200, str(reply)


@pytest.mark.parametrize("method,path", [
    ("PATCH", "/v2/library/alpine/manifests/latest"),
    ("POST", "/v2/library/alpine/manifests/latest"),
    ("PUT", "/v2/library/alpine/tags/list"),
    ("DELETE", "/v2/library/alpine/tags/list"),
    ("POST", "/v2/library/alpine/referrers/" + MISSING_SHA256),
])
@pytest_twisted.ensureDeferred
async def test_method_not_allowed(registry: Any, oci: Client, method: str, path: str) -> None:
    """Endpoints table: a method an endpoint does not define is refused (405 UNSUPPORTED, or 404) and changes nothing."""
    await oci.push_image("library/alpine", "latest")
    before = await store_snapshot(registry)
    reply = await oci.request(method, path, body=b"{}" if method in ("PUT", "POST", "PATCH") else None)
    expect_error_among(reply, {405: ("UNSUPPORTED",), 404: ()})
    await assert_unchanged(registry, before)


@pytest.mark.parametrize("path", [
    "/v2/library/alpine/nonsense",
    "/v2/library/alpine/manifests",
    "/v2/library/alpine/blobs/uploads/extra/segments/x",
    "/v3/",
])
@pytest_twisted.ensureDeferred
async def test_unknown_route_is_404_with_error_document(oci: Client, path: str) -> None:
    """Error Codes: a path no endpoint serves is 404; a JSON error body's "code field MUST be one of" the spec's codes."""
    reply = await oci.get(path)
    assert reply.status == 404, str(reply)


# -- pulling blobs -------------------------------------------------------------


@pytest.mark.parametrize("data", [b"hello blob", b"", bytes(range(256)) * 40], ids=["small", "empty", "10k"])
@pytest_twisted.ensureDeferred
async def test_blob_get_and_head(oci: Client, data: bytes) -> None:
    """end-2: GET/HEAD of an existing blob is 200 with Content-Length and Docker-Content-Digest."""
    digest = await oci.push_blob(REPO, data)
    reply = await oci.get(f"/v2/{REPO}/blobs/{digest}")
    assert reply.status == 200, str(reply)
    assert reply.body == data
    assert reply.header("Content-Length") == str(len(data)), str(reply)
    assert reply.header("Docker-Content-Digest") == digest, str(reply)
    assert "chunked" not in (reply.header("Transfer-Encoding") or ""), str(reply)
    head = await oci.head(f"/v2/{REPO}/blobs/{digest}")
    assert head.status == 200, str(head)
    assert head.header("Content-Length") == str(len(data)), str(head)
    assert head.header("Docker-Content-Digest") == digest, str(head)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_blob_unknown(oci: Client, method: str) -> None:
    """end-2: "If the blob is not found in the repository, the response code MUST be 404" (BLOB_UNKNOWN)."""
    await oci.push_blob(REPO, b"something else")
    reply = await oci.request(method, f"/v2/{REPO}/blobs/{MISSING_SHA256}")
    expect_error(reply, 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_blob_is_scoped_to_its_repository(oci: Client, method: str) -> None:
    """end-2: a blob pushed to one repository is "not found in the repository" of another: 404."""
    digest = await oci.push_blob("team/a", b"private to a")
    await oci.push_blob("team/b", b"b's own blob")
    reply = await oci.request(method, f"/v2/team/b/blobs/{digest}")
    expect_error(reply, 404, "BLOB_UNKNOWN")


RANGE_DATA = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!?"  # 64 bytes


@pytest.mark.parametrize("header,first,last", [
    ("bytes=0-0", 0, 0),
    ("bytes=2-5", 2, 5),
    ("bytes=10-", 10, 63),
    ("bytes=-4", 60, 63),
    ("bytes=60-1000", 60, 63),
    ("bytes=0-63", 0, 63),
])
@pytest_twisted.ensureDeferred
async def test_blob_range(oci: Client, header: str, first: int, last: int) -> None:
    """Pulling blobs: "A registry SHOULD support the Range request header in accordance with RFC 9110" (206 + Content-Range)."""
    digest = await oci.push_blob(REPO, RANGE_DATA)
    reply = await oci.get(f"/v2/{REPO}/blobs/{digest}", headers={"Range": header})
    if (first, last) == (0, len(RANGE_DATA) - 1) and reply.status == 200:
        # RFC 9110 §14.2: a server MAY ignore Range; for a range that is the
        # whole blob a plain 200 is as good as a 206.
        assert reply.body == RANGE_DATA and reply.header("Content-Range") is None, str(reply)
        return
    assert reply.status == 206, str(reply)
    assert reply.body == RANGE_DATA[first:last + 1], str(reply)
    assert reply.header("Content-Range") == f"bytes {first}-{last}/{len(RANGE_DATA)}", str(reply)
    assert reply.header("Content-Length") == str(last + 1 - first), str(reply)


@pytest.mark.parametrize("header", ["bytes=64-", "bytes=100-200", "bytes=64-64"])
@pytest_twisted.ensureDeferred
async def test_blob_range_unsatisfiable(oci: Client, header: str) -> None:
    """RFC 9110 §15.5.17 (by way of the spec's Range rule): a range past the end is 416 with Content-Range bytes */size."""
    digest = await oci.push_blob(REPO, RANGE_DATA)
    reply = await oci.get(f"/v2/{REPO}/blobs/{digest}", headers={"Range": header})
    assert reply.status == 416, str(reply)
    assert reply.header("Content-Range") == f"bytes */{len(RANGE_DATA)}", str(reply)


MALFORMED_DIGESTS = {
    "short-hex": "sha256:abc",
    "non-hex": "sha256:" + "g" * 64,
    "uppercase-hex": "sha256:" + "A" * 64,
    "too-long-hex": "sha256:" + "a" * 65,
    "no-algorithm": "a" * 64,
    "empty-hex": "sha256:",
    "bad-algorithm-chars": "sha$256:" + "a" * 64,
}


@pytest.mark.parametrize("digest", list(MALFORMED_DIGESTS.values()), ids=list(MALFORMED_DIGESTS))
@pytest_twisted.ensureDeferred
async def test_blob_malformed_digest(registry: Any, oci: Client, digest: str) -> None:
    """end-2/Error Codes: a malformed digest is 400 DIGEST_INVALID; 404 is also allowed, end-2 lists only 404 as its failure."""
    await oci.push_blob(REPO, b"present")
    before = await store_snapshot(registry)
    reply = await oci.get(f"/v2/{REPO}/blobs/{digest}")
    expect_error_among(reply, {400: ("DIGEST_INVALID",), 404: ("BLOB_UNKNOWN", "DIGEST_INVALID")})
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_blob_unsupported_algorithm(oci: Client) -> None:
    """Content digests: a well-formed digest of an algorithm the registry does not implement is refused (400) or unknown (404)."""
    data = b"md5 is not an OCI algorithm"
    reply = await oci.get(f"/v2/{REPO}/blobs/md5:{hashlib.md5(data).hexdigest()}")
    expect_error_among(reply, {400: ("DIGEST_INVALID", "UNSUPPORTED"), 404: ("BLOB_UNKNOWN",)})


# -- pushing blobs -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_monolithic_single_post(oci: Client) -> None:
    """end-4b: POST ?digest= with the blob is 201 with Location (a pullable blob URL) and Docker-Content-Digest."""
    data = b"single post blob"
    digest = digest_of(data)
    reply = await oci.post(with_query(f"/v2/{REPO}/blobs/uploads/", digest=digest), data, headers=OCTET)
    assert reply.status == 201, str(reply)
    assert reply.header("Docker-Content-Digest") == digest, str(reply)
    location = reply.location
    assert location, str(reply)
    pulled = await oci.get(location)
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest_twisted.ensureDeferred
async def test_post_then_put(oci: Client) -> None:
    """end-4a/end-6: POST is 202 with Location; PUT <location>?digest= is 201 with a pullable Location."""
    data = b"post then put"
    digest = digest_of(data)
    started = await oci.post(f"/v2/{REPO}/blobs/uploads/", b"")
    assert started.status == 202, str(started)
    location = started.location
    assert location, str(started)
    done = await oci.put(with_query(location, digest=digest), data, headers=OCTET)
    assert done.status == 201, str(done)
    assert done.header("Docker-Content-Digest") == digest, str(done)
    assert done.header("Location"), str(done)
    pulled = await oci.get(done.location)
    assert pulled.status == 200 and pulled.body == data, str(pulled)
    by_digest = await oci.get(f"/v2/{REPO}/blobs/{digest}")
    assert by_digest.status == 200 and by_digest.body == data, str(by_digest)


@pytest_twisted.ensureDeferred
async def test_upload_location_contains_unique_session_id(oci: Client) -> None:
    """POST then PUT: "The <location> MUST contain a UUID representing a unique session ID"."""
    uuid_re = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)
    first = await oci.start_upload(REPO)
    second = await oci.start_upload(REPO)
    assert first != second
    assert uuid_re.search(first) and uuid_re.search(second), (first, second)


@pytest_twisted.ensureDeferred
async def test_chunked_upload(oci: Client) -> None:
    """Pushing a blob in chunks: each PATCH is 202 with Location and Range 0-<end>; GET status 204; PUT ?digest= closes with 201."""
    chunks = [b"01234", b"56789", b"abcdefghij"]
    data = b"".join(chunks)
    started = await oci.post(f"/v2/{REPO}/blobs/uploads/", b"")  # Content-Length: 0
    assert started.status == 202, str(started)
    location = started.location
    offset = 0
    for chunk in chunks:
        reply = await oci.patch(location, chunk, headers={
            **OCTET, "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        })
        assert reply.status == 202, str(reply)
        offset += len(chunk)
        assert_upload_range(reply, offset - 1)
        location = reply.location
    status = await upload_status(oci, location)
    assert status.status == 204, str(status)
    assert_upload_range(status, len(data) - 1)
    digest = digest_of(data)
    done = await oci.put(with_query(location, digest=digest))
    assert done.status == 201, str(done)
    assert done.header("Location"), str(done)
    assert done.header("Docker-Content-Digest") == digest, str(done)
    pulled = await oci.get(f"/v2/{REPO}/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest_twisted.ensureDeferred
async def test_chunked_upload_final_chunk_in_put(oci: Client) -> None:
    """Pushing a blob in chunks: "The final chunk MAY be uploaded ... in the closing PUT request"."""
    location = await oci.start_upload(REPO)
    first = await oci.patch(location, b"first-", headers={**OCTET, "Content-Range": "0-5"})
    assert first.status == 202, str(first)
    assert_upload_range(first, 5)
    data = b"first-and-last"
    done = await oci.put(
        with_query(first.location, digest=digest_of(data)), b"and-last",
        headers={**OCTET, "Content-Range": "6-13"},
    )
    assert done.status == 201, str(done)
    pulled = await oci.get(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest_twisted.ensureDeferred
async def test_streamed_patch_without_content_range(oci: Client) -> None:
    """Blob upload streamed (conformance 02): a PATCH without Content-Range appends and answers 202 with Range."""
    data = bytes(range(256)) * 1024  # 256 KiB: spans many TCP reads
    location = await oci.start_upload(REPO)
    reply = await oci.patch(location, data, headers=OCTET)
    assert reply.status == 202, str(reply)
    assert_upload_range(reply, len(data) - 1)
    done = await oci.put(with_query(reply.location, digest=digest_of(data)))
    assert done.status == 201, str(done)
    pulled = await oci.get(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert pulled.status == 200 and pulled.body == data


@pytest.mark.parametrize("first_range,bad_range", [
    (None, "5-9"),     # first chunk not starting at 0
    ("0-4", "6-10"),   # a gap
    ("0-4", "0-4"),    # the same chunk again
    ("0-4", "3-7"),    # an overlap
])
@pytest_twisted.ensureDeferred
async def test_chunk_out_of_order_is_416(registry: Any, oci: Client, first_range: str | None, bad_range: str) -> None:
    """Pushing in chunks: "If a chunk is uploaded out of order, the registry MUST respond with a 416"; the session survives."""
    location = await oci.start_upload(REPO)
    acknowledged = -1
    if first_range is not None:
        first = await oci.patch(location, b"AAAAA", headers={**OCTET, "Content-Range": first_range})
        assert first.status == 202, str(first)
        location = first.location
        acknowledged = 4
    before = await store_snapshot(registry)
    bad = await oci.patch(location, b"BBBBB", headers={**OCTET, "Content-Range": bad_range})
    expect_error(bad, 416)
    await assert_unchanged(registry, before)
    if acknowledged >= 0:
        status = await upload_status(oci, location)
        assert status.status == 204, str(status)
        assert_upload_range(status, acknowledged)
    # The session goes on from where it really is.
    start = acknowledged + 1
    good = await oci.patch(location, b"CCCCC", headers={**OCTET, "Content-Range": f"{start}-{start + 4}"})
    assert good.status == 202, str(good)
    data = (b"AAAAA" if acknowledged >= 0 else b"") + b"CCCCC"
    done = await oci.put(with_query(good.location, digest=digest_of(data)))
    assert done.status == 201, str(done)


@pytest_twisted.ensureDeferred
async def test_closing_put_with_out_of_order_final_chunk(registry: Any, oci: Client) -> None:
    """Pushing in chunks: "Chunks MUST be uploaded in order" — also a final chunk sent in the closing PUT; a gap is refused and the session survives."""
    location = await oci.start_upload(REPO)
    first = await oci.patch(location, b"01234", headers={**OCTET, "Content-Range": "0-4"})
    assert first.status == 202, str(first)
    data = b"0123456789"
    before = await store_snapshot(registry, ignore_uploads=True)
    bad = await oci.put(with_query(first.location, digest=digest_of(data)), b"56789",
                        headers={**OCTET, "Content-Range": "10-14"})
    expect_error_among(bad, {416: (), 400: ("BLOB_UPLOAD_INVALID",)})
    await assert_unchanged(registry, before, ignore_uploads=True)
    missing = await oci.head(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert missing.status == 404, str(missing)


@pytest_twisted.ensureDeferred
async def test_resume_after_interrupted_chunk(oci: Client) -> None:
    """Resumable push: after a chunk is cut off, GET <location> (204, Range) tells where to resume and the upload completes intact."""
    location = await oci.start_upload(REPO)
    first = await oci.patch(location, b"01234", headers={**OCTET, "Content-Range": "0-4"})
    assert first.status == 202, str(first)
    location = first.location
    await oci.send_truncated("PATCH", location, b"567", 10, headers={**OCTET, "Content-Range": "5-14"})
    status = await oci.get(location)
    assert status.status == 204, str(status)
    match = re.fullmatch(r"0-(\d+)", status.header("Range") or "")
    assert match, str(status)
    end = int(match.group(1))
    # Whatever part of the cut chunk the registry kept, it must say so truthfully.
    assert end in (4, 7), str(status)
    data = b"0123456789abcde"
    rest = data[end + 1:]
    done = await oci.put(with_query(status.location, digest=digest_of(data)), rest,
                         headers={**OCTET, "Content-Range": f"{end + 1}-{len(data) - 1}"})
    assert done.status == 201, str(done)
    pulled = await oci.get(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest_twisted.ensureDeferred
async def test_interrupted_monolithic_upload_stores_nothing(registry: Any, oci: Client) -> None:
    """Push: a blob exists only once its upload is closed with the right digest; a POST ?digest= cut off mid-body stores no blob."""
    data = b"x" * 1000
    await oci.push_blob(REPO, b"repo exists")
    before = await store_snapshot(registry, ignore_uploads=True)
    await oci.send_truncated("POST", with_query(f"/v2/{REPO}/blobs/uploads/", digest=digest_of(data)),
                             data[:400], len(data), headers=OCTET)
    missing = await oci.head(f"/v2/{REPO}/blobs/{digest_of(data)}")
    assert missing.status == 404, str(missing)
    await assert_unchanged(registry, before, ignore_uploads=True)


@pytest_twisted.ensureDeferred
async def test_concurrent_uploads_of_the_same_blob(oci: Client) -> None:
    """Layer upload de-duplication: "If process A and B upload the same layer at the same time, both operations will proceed"."""
    data = b"the same layer, twice at once"
    digest = digest_of(data)
    first = await oci.start_upload(REPO)
    second = await oci.start_upload(REPO)
    a = await oci.patch(first, data[:10], headers={**OCTET, "Content-Range": "0-9"})
    b = await oci.patch(second, data[:10], headers={**OCTET, "Content-Range": "0-9"})
    assert a.status == 202 and b.status == 202, (str(a), str(b))
    done_a = await oci.put(with_query(a.location, digest=digest), data[10:],
                           headers={**OCTET, "Content-Range": f"10-{len(data) - 1}"})
    assert done_a.status == 201, str(done_a)
    done_b = await oci.put(with_query(b.location, digest=digest), data[10:],
                           headers={**OCTET, "Content-Range": f"10-{len(data) - 1}"})
    assert done_b.status == 201, str(done_b)
    pulled = await oci.get(f"/v2/{REPO}/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest.mark.parametrize("content_range", ["0-9", "0-2", "4-0", "garbage", "0-"])
@pytest_twisted.ensureDeferred
async def test_chunk_content_range_not_matching_body(registry: Any, oci: Client, content_range: str) -> None:
    """Pushing in chunks: Content-Range is "the byte range of the chunk" and MUST match ^[0-9]+-[0-9]+$; a wrong one is refused (400/416) and changes nothing."""
    location = await oci.start_upload(REPO)
    before = await store_snapshot(registry)
    bad = await oci.patch(location, b"12345", headers={**OCTET, "Content-Range": content_range})
    expect_error_among(bad, {400: ("BLOB_UPLOAD_INVALID", "SIZE_INVALID"), 416: ()})
    await assert_unchanged(registry, before)
    good = await oci.patch(location, b"12345", headers={**OCTET, "Content-Range": "0-4"})
    assert good.status == 202, str(good)
    assert_upload_range(good, 4)


@pytest.mark.parametrize("method", ["GET", "PATCH", "PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_unknown_upload_session(registry: Any, oci: Client, method: str) -> None:
    """end-5/end-6/end-13: an upload URL with no session behind it is 404 BLOB_UPLOAD_UNKNOWN."""
    await oci.push_blob(REPO, b"repo exists")
    before = await store_snapshot(registry)
    path = f"/v2/{REPO}/blobs/uploads/{'1' * 32}"
    if method == "PUT":
        path = with_query(path, digest=digest_of(b"x"))
    body = b"x" if method in ("PATCH", "PUT") else None
    headers = {**OCTET, "Content-Range": "0-0"} if method == "PATCH" else {}
    reply = await oci.request(method, path, body=body, headers=headers)
    expect_error(reply, 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_upload_session_is_bound_to_its_repository(oci: Client) -> None:
    """end-13: an upload session belongs to the <name> it was started in; another name does not find it (404)."""
    location = oci.path_of(await oci.start_upload("team/a"))
    assert location.startswith("/v2/team/a/blobs/uploads/"), location
    foreign = location.replace("/v2/team/a/", "/v2/team/b/", 1)
    await oci.push_blob("team/b", b"b exists")
    reply = await oci.get(foreign)
    expect_error(reply, 404, "BLOB_UPLOAD_UNKNOWN")
    reply = await oci.put(with_query(foreign, digest=digest_of(b"")))
    expect_error(reply, 404, "BLOB_UPLOAD_UNKNOWN")
    still = await oci.get(location)
    assert still.status == 204, str(still)


@pytest_twisted.ensureDeferred
async def test_cancel_upload(registry: Any, oci: Client) -> None:
    """Details (apdx-1) DELETE upload: cancels the session (204); afterwards it is 404 BLOB_UPLOAD_UNKNOWN and its data is gone."""
    await oci.push_blob(REPO, b"repo exists")
    before = await store_snapshot(registry)
    location = await oci.start_upload(REPO)
    chunk = await oci.patch(location, b"partial", headers={**OCTET, "Content-Range": "0-6"})
    assert chunk.status == 202, str(chunk)
    location = chunk.location
    cancelled = await oci.delete(location)
    assert cancelled.status in (202, 204), str(cancelled)
    status = await oci.get(location)
    expect_error(status, 404, "BLOB_UPLOAD_UNKNOWN")
    again = await oci.patch(location, b"more", headers={**OCTET, "Content-Range": "7-10"})
    expect_error(again, 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_completed_upload_session_is_closed(oci: Client) -> None:
    """Closing PUT: once the session is closed with 201 its upload URL is 404 BLOB_UPLOAD_UNKNOWN."""
    location = await oci.start_upload(REPO)
    done = await oci.put(with_query(location, digest=digest_of(b"once")), b"once", headers=OCTET)
    assert done.status == 201, str(done)
    reply = await oci.get(location)
    expect_error(reply, 404, "BLOB_UPLOAD_UNKNOWN")


@pytest.mark.parametrize("mode", ["single-post", "post-put", "chunked-put"])
@pytest_twisted.ensureDeferred
async def test_upload_digest_mismatch(registry: Any, oci: Client, mode: str) -> None:
    """end-4b/end-6 + code-4: a digest that does not match the uploaded bytes is 400 DIGEST_INVALID and stores nothing."""
    data = b"the real content"
    wrong = digest_of(b"other content")
    await oci.push_blob(REPO, b"repo exists")
    # The refused PUT may end or reset its session (upload area), but no blob
    # and no repository link may appear.
    before = await store_snapshot(registry, ignore_uploads=True)
    if mode == "single-post":
        reply = await oci.post(with_query(f"/v2/{REPO}/blobs/uploads/", digest=wrong), data, headers=OCTET)
    elif mode == "post-put":
        location = await oci.start_upload(REPO)
        reply = await oci.put(with_query(location, digest=wrong), data, headers=OCTET)
    else:
        location = await oci.start_upload(REPO)
        chunk = await oci.patch(location, data, headers={**OCTET, "Content-Range": f"0-{len(data) - 1}"})
        assert chunk.status == 202, str(chunk)
        reply = await oci.put(with_query(chunk.location, digest=wrong))
    expect_error(reply, 400, "DIGEST_INVALID")
    await assert_unchanged(registry, before, ignore_uploads=True)
    for digest in (wrong, digest_of(data)):
        missing = await oci.head(f"/v2/{REPO}/blobs/{digest}")
        assert missing.status == 404, str(missing)


@pytest_twisted.ensureDeferred
async def test_closing_put_without_digest(registry: Any, oci: Client) -> None:
    """Closing PUT: "The closing PUT request MUST include the <digest> of the whole blob"; without it: 400."""
    location = await oci.start_upload(REPO)
    before = await store_snapshot(registry, ignore_uploads=True)
    reply = await oci.put(location, b"no digest given", headers=OCTET)
    expect_error(reply, 400, "DIGEST_INVALID", "BLOB_UPLOAD_INVALID")
    await assert_unchanged(registry, before, ignore_uploads=True)


@pytest.mark.parametrize("digest", list(MALFORMED_DIGESTS.values()), ids=list(MALFORMED_DIGESTS))
@pytest.mark.parametrize("mode", ["single-post", "closing-put"])
@pytest_twisted.ensureDeferred
async def test_upload_malformed_digest(registry: Any, oci: Client, mode: str, digest: str) -> None:
    """Error Codes code-4: an upload whose ?digest= is not a digest is 400 DIGEST_INVALID and stores nothing."""
    await oci.push_blob(REPO, b"repo exists")
    location = await oci.start_upload(REPO) if mode == "closing-put" else None
    before = await store_snapshot(registry, ignore_uploads=mode == "closing-put")
    if location is None:
        reply = await oci.post(with_query(f"/v2/{REPO}/blobs/uploads/", digest=digest), b"data", headers=OCTET)
    else:
        reply = await oci.put(with_query(location, digest=digest), b"data", headers=OCTET)
    expect_error(reply, 400, "DIGEST_INVALID")
    await assert_unchanged(registry, before, ignore_uploads=mode == "closing-put")


@pytest_twisted.ensureDeferred
async def test_upload_unsupported_algorithm(registry: Any, oci: Client) -> None:
    """Content digests: an upload under an algorithm the registry cannot verify is refused with 400 and stores nothing."""
    data = b"hashed with md5"
    await oci.push_blob(REPO, b"repo exists")
    before = await store_snapshot(registry)
    reply = await oci.post(
        with_query(f"/v2/{REPO}/blobs/uploads/", digest=f"md5:{hashlib.md5(data).hexdigest()}"),
        data, headers=OCTET,
    )
    expect_error(reply, 400, "DIGEST_INVALID", "UNSUPPORTED")
    await assert_unchanged(registry, before)


# -- cross-repository mount ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mount_from_other_repository(oci: Client) -> None:
    """end-11: POST ?mount=<digest>&from=<other> of a blob in <other> is 201 with Location and Docker-Content-Digest."""
    data = b"shared base layer"
    digest = await oci.push_blob("team/source", data)
    reply = await oci.post(with_query("/v2/team/target/blobs/uploads/", mount=digest, **{"from": "team/source"}))
    assert reply.status == 201, str(reply)
    assert reply.header("Docker-Content-Digest") == digest, str(reply)
    location = reply.location
    assert location, str(reply)
    pulled = await oci.get(location)
    assert pulled.status == 200 and pulled.body == data, str(pulled)
    pulled = await oci.get(f"/v2/team/target/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest.mark.parametrize("case", ["blob-unknown", "source-repo-unknown"])
@pytest_twisted.ensureDeferred
async def test_mount_falls_back_to_upload(oci: Client, case: str) -> None:
    """end-11: "if a registry ... is unable to mount the requested blob, it SHOULD return a 202" that starts an upload session."""
    data = b"not mountable"
    digest = digest_of(data)
    await oci.push_blob("team/source", b"something else")
    source = "team/source" if case == "blob-unknown" else "team/nowhere"
    reply = await oci.post(with_query("/v2/team/target/blobs/uploads/", mount=digest, **{"from": source}))
    assert reply.status == 202, str(reply)
    location = reply.location
    assert location, str(reply)
    missing = await oci.head(f"/v2/team/target/blobs/{digest}")
    assert missing.status == 404, str(missing)
    done = await oci.put(with_query(location, digest=digest), data, headers=OCTET)
    assert done.status == 201, str(done)


@pytest_twisted.ensureDeferred
async def test_mount_without_from(oci: Client) -> None:
    """end-11: "The registry MAY treat the from parameter as optional, and it MAY cross-mount the blob if it can be found" (registryd does)."""
    data = b"found without from"
    digest = await oci.push_blob("team/source", data)
    reply = await oci.post(with_query("/v2/team/target/blobs/uploads/", mount=digest))
    assert reply.status == 201, str(reply)
    assert reply.header("Docker-Content-Digest") == digest, str(reply)
    pulled = await oci.get(f"/v2/team/target/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest_twisted.ensureDeferred
async def test_mount_malformed_digest(registry: Any, oci: Client) -> None:
    """end-11 + code-4: a mount of something that is not a digest mounts nothing: 400 DIGEST_INVALID, or a plain 202 upload."""
    await oci.push_blob("team/source", b"x")
    before = await store_snapshot(registry, ignore_uploads=True)
    reply = await oci.post(with_query("/v2/team/target/blobs/uploads/", mount="sha256:nothex", **{"from": "team/source"}))
    if reply.status != 202:
        expect_error(reply, 400, "DIGEST_INVALID")
    await assert_unchanged(registry, before, ignore_uploads=True)


# -- sha512 --------------------------------------------------------------------


def sha256_only(registry: Any) -> bool:
    """containerd's content store addresses content by sha256 alone: there a sha512 push is
    refused with 400 DIGEST_INVALID, and nothing of it is stored."""
    return registry.service is not None and registry.service.store.driver == "containerd"


async def expect_sha512_refused(registry: Any, oci: Client) -> None:
    """The containerd store's answer to a sha512 blob: 400 DIGEST_INVALID, nothing stored."""
    before = await store_snapshot(registry, ignore_uploads=True)
    data = b"sha512 content" * 10
    digest = digest_of(data, "sha512")
    reply = await oci.post(with_query(f"/v2/{REPO}/blobs/uploads/", digest=digest), data, headers=OCTET)
    expect_error(reply, 400, "DIGEST_INVALID")
    expect_error(await oci.get(f"/v2/{REPO}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    await assert_unchanged(registry, before, ignore_uploads=True)


@pytest_twisted.ensureDeferred
async def test_sha512_blob_single_post(registry: Any, oci: Client) -> None:
    """Digests (image-spec): sha512 is a registered algorithm; a blob pushed and pulled by its sha512 digest round-trips."""
    if sha256_only(registry):
        return await expect_sha512_refused(registry, oci)
    data = b"sha512 content" * 10
    digest = digest_of(data, "sha512")
    reply = await oci.post(with_query(f"/v2/{REPO}/blobs/uploads/", digest=digest), data, headers=OCTET)
    assert reply.status == 201, str(reply)
    assert reply.header("Docker-Content-Digest") in (digest, digest_of(data)), str(reply)
    pulled = await oci.get(f"/v2/{REPO}/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)
    header = pulled.header("Docker-Content-Digest")
    # "If present, the value of this header MUST be a digest matching that of the response body."
    assert header is not None and digest_of(data, header.split(":")[0]) == header, str(pulled)
    head = await oci.head(f"/v2/{REPO}/blobs/{digest}")
    assert head.status == 200 and head.header("Content-Length") == str(len(data)), str(head)


@pytest_twisted.ensureDeferred
async def test_sha512_chunked_upload(registry: Any, oci: Client) -> None:
    """Closing PUT "MUST include the <digest> of the whole blob": a sha512 digest closes a chunked upload."""
    if sha256_only(registry):
        return await expect_sha512_refused(registry, oci)
    location = await oci.start_upload(REPO)
    reply = await oci.patch(location, b"part one, ", headers={**OCTET, "Content-Range": "0-9"})
    assert reply.status == 202, str(reply)
    data = b"part one, part two"
    digest = digest_of(data, "sha512")
    done = await oci.put(with_query(reply.location, digest=digest), b"part two",
                         headers={**OCTET, "Content-Range": "10-17"})
    assert done.status == 201, str(done)
    pulled = await oci.get(f"/v2/{REPO}/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest_twisted.ensureDeferred
async def test_sha512_digest_mismatch(oci: Client) -> None:
    """code-4: a sha512 digest that does not match the content is 400 DIGEST_INVALID."""
    wrong = digest_of(b"something else", "sha512")
    reply = await oci.post(with_query(f"/v2/{REPO}/blobs/uploads/", digest=wrong), b"data", headers=OCTET)
    expect_error(reply, 400, "DIGEST_INVALID")


@pytest_twisted.ensureDeferred
async def test_sha512_manifest_push_by_digest(registry: Any, oci: Client) -> None:
    """Pushing manifests by digest: Docker-Content-Digest "MUST be equal to the client provided digest", sha512 included."""
    if sha256_only(registry):
        return await expect_sha512_refused(registry, oci)
    image = await oci.push_image(REPO, algorithm="sha512")
    assert image.digest.startswith("sha512:")
    assert image.reply.header("Docker-Content-Digest") == image.digest, str(image.reply)
    for method in ("GET", "HEAD"):
        reply = await get_manifest(oci, REPO, image.digest, method)
        assert reply.status == 200, str(reply)
        if method == "GET":
            assert reply.body == image.body
        assert reply.header("Content-Type") == OCI_MANIFEST, str(reply)
        assert reply.header("Content-Length") == str(len(image.body)), str(reply)


@pytest_twisted.ensureDeferred
async def test_sha512_manifest_digest_mismatch(registry: Any, oci: Client) -> None:
    """Pushing by digest: a sha512 reference that is not the body's digest is 400 DIGEST_INVALID."""
    body, media_type = await build_manifest(oci, REPO, "oci-image")
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, digest_of(body + b" ", "sha512"), body, media_type)
    expect_error(reply, 400, "DIGEST_INVALID")
    await assert_unchanged(registry, before)


# -- manifests -----------------------------------------------------------------

MANIFEST_KINDS = ["oci-image", "oci-index", "docker-manifest", "docker-manifest-list", "artifact", "artifact-empty-layer"]


@pytest.mark.parametrize("kind", MANIFEST_KINDS)
@pytest_twisted.ensureDeferred
async def test_manifest_roundtrip(oci: Client, kind: str) -> None:
    """end-3/end-7: PUT is 201 + Location; GET/HEAD by tag and digest give the exact bytes, the pushed Content-Type and Docker-Content-Digest."""
    body, media_type = await build_manifest(oci, REPO, kind)
    digest = digest_of(body)
    put = await oci.push_manifest(REPO, "v1", body, media_type)
    assert put.status == 201, str(put)
    assert put.header("Location"), str(put)
    assert put.header("Docker-Content-Digest") == digest, str(put)
    for reference in ("v1", digest):
        got = await get_manifest(oci, REPO, reference)
        assert got.status == 200, str(got)
        assert got.body == body, "the registry MUST store the manifest in the exact byte representation"
        assert got.header("Content-Type") == media_type, str(got)
        assert got.header("Docker-Content-Digest") == digest, str(got)
        head = await get_manifest(oci, REPO, reference, "HEAD")
        assert head.status == 200, str(head)
        assert head.header("Content-Length") == str(len(body)), str(head)
        assert head.header("Content-Type") == media_type, str(head)
        assert head.header("Docker-Content-Digest") == digest, str(head)
    located = await oci.get(put.location, headers={"Accept": ACCEPT_ALL})
    assert located.status == 200 and located.body == body, str(located)


@pytest_twisted.ensureDeferred
async def test_manifest_push_by_digest_creates_no_tag(oci: Client) -> None:
    """end-7: <reference> may be a digest; such a push is 201 and leaves the tag list empty."""
    image = await oci.push_image(REPO)
    assert image.reply.header("Docker-Content-Digest") == image.digest
    assert image.reply.location, str(image.reply)
    assert await tags_of(oci, REPO) == []


@pytest_twisted.ensureDeferred
async def test_manifest_repush_and_tag_move(oci: Client) -> None:
    """end-7: pushing again is 201 again; a tag pushed with another manifest points to the new one, the old stays by digest."""
    first = await oci.push_image(REPO, "latest", seed="one")
    again = await oci.push_manifest(REPO, "latest", first.body, OCI_MANIFEST)
    assert again.status == 201, str(again)
    second = await oci.push_image(REPO, "latest", seed="two")
    got = await get_manifest(oci, REPO, "latest")
    assert got.status == 200 and got.body == second.body, str(got)
    old = await get_manifest(oci, REPO, first.digest)
    assert old.status == 200 and old.body == first.body, str(old)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("reference", ["missing", MISSING_SHA256], ids=["tag", "digest"])
@pytest_twisted.ensureDeferred
async def test_manifest_unknown(oci: Client, method: str, reference: str) -> None:
    """end-3: "If the manifest is not found in the repository, the response code MUST be 404" (MANIFEST_UNKNOWN)."""
    await oci.push_image(REPO, "present")
    reply = await get_manifest(oci, REPO, reference, method)
    expect_error(reply, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_manifest_is_scoped_to_its_repository(oci: Client, method: str) -> None:
    """end-3: "If the manifest is not found in the repository" — one pushed to another repository — the response is 404."""
    image = await oci.push_image("team/a", "v1")
    await oci.push_image("team/b", "v1", seed="b")
    reply = await get_manifest(oci, "team/b", image.digest, method)
    expect_error(reply, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_manifest_in_unknown_repository(oci: Client, method: str) -> None:
    """end-3 / Pushing manifests: "An attempt to pull a nonexistent repository MUST return response code 404"."""
    reply = await get_manifest(oci, "no/such/repo", "latest", method)
    expect_error(reply, 404, "NAME_UNKNOWN", "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("missing", ["config", "layer", "both"])
@pytest.mark.parametrize("kind", [OCI_MANIFEST, DOCKER_MANIFEST])
@pytest_twisted.ensureDeferred
async def test_manifest_with_unknown_blob(registry: Any, oci: Client, kind: str, missing: str) -> None:
    """Push: a manifest rejected for a reference to an unknown blob "MUST result in one or more MANIFEST_BLOB_UNKNOWN errors" (400)."""
    config, layer = b'{"os":"linux"}', b"a layer"
    if missing not in ("config", "both"):
        await oci.push_blob(REPO, config)
    if missing not in ("layer", "both"):
        await oci.push_blob(REPO, layer)
    if missing == "both":
        await oci.push_blob(REPO, b"repo exists")
    docker = kind == DOCKER_MANIFEST
    body = encode({
        "schemaVersion": 2,
        "mediaType": kind,
        "config": descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER if docker else OCI_LAYER, layer)],
    })
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, "broken", body, kind)
    expect_error(reply, 400, "MANIFEST_BLOB_UNKNOWN")
    await assert_unchanged(registry, before)
    gone = await get_manifest(oci, REPO, "broken")
    assert gone.status == 404, str(gone)


@pytest_twisted.ensureDeferred
async def test_manifest_blob_of_another_repository_only(oci: Client) -> None:
    """Push: blobs are per repository; a manifest may not lean on a blob only another repository holds (MANIFEST_BLOB_UNKNOWN), or the blob becomes pullable here."""
    config, layer = b'{"os":"linux","x":1}', b"layer only elsewhere"
    await oci.push_blob("team/a", layer)
    await oci.push_blob("team/b", config)
    body = encode({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer)],
    })
    reply = await oci.push_manifest("team/b", "t", body, OCI_MANIFEST)
    if reply.status == 201:
        # Accepting it is allowed ("MAY reject"), but then a client that
        # pulls the image from team/b must get every blob it names.
        pulled = await oci.get(f"/v2/team/b/blobs/{digest_of(layer)}")
        assert pulled.status == 200 and pulled.body == layer, str(pulled)
    else:
        expect_error(reply, 400, "MANIFEST_BLOB_UNKNOWN")


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
@pytest_twisted.ensureDeferred
async def test_index_with_unknown_child(registry: Any, oci: Client, media_type: str) -> None:
    """code-5 MANIFEST_BLOB_UNKNOWN: "manifest references a manifest or blob unknown to registry" — an index with an unknown child is 400."""
    known = await oci.push_image(REPO)
    child_type = OCI_MANIFEST if media_type == OCI_INDEX else DOCKER_MANIFEST
    body = encode({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            dict(known.descriptor(), mediaType=child_type, platform={"architecture": "amd64", "os": "linux"}),
            {"mediaType": child_type, "digest": MISSING_SHA256, "size": 123,
             "platform": {"architecture": "arm64", "os": "linux"}},
        ],
    })
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, "multi", body, media_type)
    expect_error(reply, 400, "MANIFEST_BLOB_UNKNOWN")
    await assert_unchanged(registry, before)


@pytest.mark.parametrize("kind", ["oci-nondistributable", "docker-foreign"])
@pytest_twisted.ensureDeferred
async def test_nondistributable_layers_need_not_exist(oci: Client, kind: str) -> None:
    """image-spec: non-distributable (foreign) layers are fetched from their urls, so the registry does not require them."""
    config = b'{"os":"windows"}'
    await oci.push_blob(REPO, config)
    foreign = b"windows base layer, not here"
    if kind == "oci-nondistributable":
        document = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_NONDISTRIBUTABLE_LAYER, foreign, urls=["https://example.com/layer"])],
        }
        media_type = OCI_MANIFEST
    else:
        document = {
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": descriptor(DOCKER_CONFIG, config),
            "layers": [descriptor(DOCKER_FOREIGN_LAYER, foreign, urls=["https://example.com/layer"])],
        }
        media_type = DOCKER_MANIFEST
    body = encode(document)
    reply = await oci.push_manifest(REPO, "windows", body, media_type)
    assert reply.status == 201, str(reply)
    got = await get_manifest(oci, REPO, "windows")
    assert got.status == 200 and got.body == body, str(got)


INVALID_MANIFESTS = {
    "not-json": (b"{this is not json", ("MANIFEST_INVALID",)),
    "empty-body": (b"", ("MANIFEST_INVALID",)),
    "json-array": (b"[]", ("MANIFEST_INVALID",)),
    "json-string": (b'"manifest"', ("MANIFEST_INVALID",)),
    "schema-version-3": (json.dumps({
        "schemaVersion": 3, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": EMPTY_JSON_DIGEST, "size": 2}, "layers": [],
    }).encode(), ("MANIFEST_INVALID",)),
    "config-not-object": (json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": "oops", "layers": [],
    }).encode(), ("MANIFEST_INVALID",)),
    "layers-not-list": (json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": EMPTY_JSON_DIGEST, "size": 2}, "layers": {},
    }).encode(), ("MANIFEST_INVALID",)),
    "descriptor-bad-digest": (json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:nothex", "size": 2}, "layers": [],
    }).encode(), ("MANIFEST_INVALID", "DIGEST_INVALID")),
    "invalid-utf8": (b'{"schemaVersion": 2, "mediaType": "\xff\xfe"}', ("MANIFEST_INVALID",)),
}


@pytest.mark.parametrize("body,codes", list(INVALID_MANIFESTS.values()), ids=list(INVALID_MANIFESTS))
@pytest_twisted.ensureDeferred
async def test_invalid_manifest(registry: Any, oci: Client, body: bytes, codes: tuple[str, ...]) -> None:
    """code-6 MANIFEST_INVALID: a body that is not a valid manifest of its type is 400 and changes nothing."""
    await oci.push_blob(REPO, EMPTY_JSON)
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, "bad", body, OCI_MANIFEST)
    expect_error(reply, 400, *codes)
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_manifest_media_type_disagrees_with_content_type(registry: Any, oci: Client) -> None:
    """Pushing manifests: "If a manifest includes a mediaType field, clients MUST set the Content-Type header to" it; a mismatch is 400 MANIFEST_INVALID."""
    body, _ = await build_manifest(oci, REPO, "oci-image")
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, "mismatch", body, OCI_INDEX)
    expect_error(reply, 400, "MANIFEST_INVALID")
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_manifest_content_type_parameters_ignored(oci: Client) -> None:
    """Pushing manifests: "The registry SHOULD ignore parameters on the Content-Type header"; pulls carry none ("SHOULD NOT include parameters")."""
    body, media_type = await build_manifest(oci, REPO, "oci-image")
    reply = await oci.push_manifest(REPO, "params", body, f"{media_type}; charset=utf-8")
    assert reply.status == 201, str(reply)
    got = await get_manifest(oci, REPO, "params")
    assert got.status == 200 and got.header("Content-Type") == media_type, str(got)


@pytest_twisted.ensureDeferred
async def test_manifest_without_content_type(registry: Any, oci: Client) -> None:
    """Pushing manifests: Content-Type is only a client SHOULD; without it the registry uses the mediaType field (201) or refuses with 400 MANIFEST_INVALID."""
    body, media_type = await build_manifest(oci, REPO, "oci-image")
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, "untyped", body, None)
    if reply.status == 201:
        got = await get_manifest(oci, REPO, "untyped")
        assert got.status == 200 and got.body == body, str(got)
        assert got.header("Content-Type") == media_type, str(got)
    else:
        expect_error(reply, 400, "MANIFEST_INVALID")
        await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_manifest_push_by_wrong_digest(registry: Any, oci: Client) -> None:
    """Pushing by digest: Docker-Content-Digest "MUST be equal to the client provided digest"; a digest the body does not have is 400 DIGEST_INVALID."""
    body, media_type = await build_manifest(oci, REPO, "oci-image")
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, digest_of(body + b"\n"), body, media_type)
    expect_error(reply, 400, "DIGEST_INVALID")
    await assert_unchanged(registry, before)


INVALID_REFERENCES = {
    "malformed-digest": "sha256:totallywrong",
    "tag-leading-dash": "-latest",
    "tag-leading-dot": ".latest",
    "tag-129-chars": "t" * 129,
    "tag-with-plus": "v1+build",
    "tag-with-percent": "v1%25",
}


@pytest.mark.parametrize("reference", list(INVALID_REFERENCES.values()), ids=list(INVALID_REFERENCES))
@pytest_twisted.ensureDeferred
async def test_manifest_push_invalid_reference(registry: Any, oci: Client, reference: str) -> None:
    """Pulling manifests: a tag "MUST match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}" and "<reference> MUST NOT be in any other format" (400; 404 as conformance allows)."""
    body, media_type = await build_manifest(oci, REPO, "oci-image")
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, reference, body, media_type)
    expect_error_among(reply, {
        400: ("TAG_INVALID", "MANIFEST_INVALID", "DIGEST_INVALID"),
        404: ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"),
    })
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_manifest_tag_of_128_chars(oci: Client) -> None:
    """Pulling manifests: a tag is "at most 128 characters"; exactly 128 is valid."""
    tag = "T" + "a" * 127
    image = await oci.push_image(REPO, tag)
    got = await get_manifest(oci, REPO, tag)
    assert got.status == 200 and got.body == image.body, str(got)


def padded_manifest(config: bytes, layer: bytes, size: int) -> bytes:
    """An OCI manifest of exactly ``size`` bytes (padded in an annotation)."""
    document: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer)],
        "annotations": {"pad": ""},
    }
    base = len(encode(document))
    assert size >= base
    document["annotations"]["pad"] = "x" * (size - base)
    body = encode(document)
    assert len(body) == size
    return body


@pytest.mark.parametrize("size,status", [(1024, 201), (1025, 413), (8192, 413)])
@pytest_twisted.ensureDeferred
async def test_manifest_size_limit(make_registry: Any, size: int, status: int) -> None:
    """Pushing manifests: a registry enforcing a limit "SHOULD respond to a request to push a manifest over this limit with 413"."""
    registry = make_registry(max_manifest_size=1024)
    oci = Client(registry.url)
    config, layer = b'{"os":"linux"}', b"layer"
    await oci.push_blob(REPO, config)
    await oci.push_blob(REPO, layer)
    body = padded_manifest(config, layer, size)
    before = await store_snapshot(registry)
    reply = await oci.push_manifest(REPO, "sized", body, OCI_MANIFEST)
    if status == 201:
        assert reply.status == 201, str(reply)
    else:
        expect_error(reply, 413)
        await assert_unchanged(registry, before)
        gone = await get_manifest(oci, REPO, "sized")
        assert gone.status == 404, str(gone)


@pytest_twisted.ensureDeferred
async def test_default_manifest_size_limit_allows_4mb(oci: Client) -> None:
    """Pushing manifests: "registry implementations SHOULD expect to be able to support manifest pushes of at least 4 megabytes"."""
    config, layer = b'{"os":"linux"}', b"layer"
    await oci.push_blob(REPO, config)
    await oci.push_blob(REPO, layer)
    body = padded_manifest(config, layer, 4 * 1000 * 1000)
    reply = await oci.push_manifest(REPO, "big", body, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    got = await get_manifest(oci, REPO, "big")
    assert got.status == 200 and got.body == body


@pytest_twisted.ensureDeferred
async def test_push_by_digest_with_tag_parameters(oci: Client) -> None:
    """Pushing by digest with ?tag=a&tag=b (spec after v1.1, kept by registryd): 201, and both tags point to the manifest."""
    body, media_type = await build_manifest(oci, REPO, "oci-image")
    digest = digest_of(body)
    reply = await oci.put(with_query(f"/v2/{REPO}/manifests/{digest}", tag=["a", "b"]), body,
                          headers={"Content-Type": media_type})
    assert reply.status == 201, str(reply)
    assert reply.header("Docker-Content-Digest") == digest, str(reply)
    for tag in ("a", "b"):
        got = await get_manifest(oci, REPO, tag)
        assert got.status == 200 and got.header("Docker-Content-Digest") == digest, str(got)
    assert await tags_of(oci, REPO) == ["a", "b"]


# -- subject and referrers -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_push_with_subject_sets_oci_subject(oci: Client) -> None:
    """Pushing manifests with subject: a registry with the referrers API "MUST respond with the response header OCI-Subject: <subject digest>"."""
    subject = await oci.push_image(REPO, "v1")
    artifact = await push_artifact(oci, REPO, subject=subject.descriptor())
    assert artifact.reply.header("OCI-Subject") == subject.digest, str(artifact.reply)
    index = await oci.push_index(REPO, [subject], subject=subject.descriptor())
    assert index.reply.header("OCI-Subject") == subject.digest, str(index.reply)


@pytest_twisted.ensureDeferred
async def test_push_with_missing_subject_is_accepted(oci: Client) -> None:
    """Push: "A registry MUST initially accept an otherwise valid manifest with a subject field that references a manifest that does not exist"."""
    subject = {"mediaType": OCI_MANIFEST, "digest": MISSING_SHA256, "size": 1234}
    artifact = await push_artifact(oci, REPO, subject=subject)
    assert artifact.reply.status == 201
    assert artifact.reply.header("OCI-Subject") == MISSING_SHA256, str(artifact.reply)
    reply = await oci.get(f"/v2/{REPO}/referrers/{MISSING_SHA256}")
    assert reply.status == 200, str(reply)
    assert [d["digest"] for d in reply.json()["manifests"]] == [artifact.digest]


def assert_referrers_document(reply: Reply) -> list[dict[str, Any]]:
    """Listing referrers: 200, Content-Type OCI index, an image index body."""
    assert reply.status == 200, str(reply)
    assert reply.header("Content-Type") == OCI_INDEX, str(reply)
    document = reply.json()
    assert document.get("schemaVersion") == 2, str(reply)
    assert document.get("mediaType") == OCI_INDEX, str(reply)
    assert isinstance(document.get("manifests"), list), "an empty manifest list MUST be returned, not null"
    return document["manifests"]


def assert_descriptor(found: dict[str, Any], image: Image, artifact_type: str | None, annotations: dict[str, str] | None) -> None:
    assert found["mediaType"] == image.media_type, found
    assert found["digest"] == image.digest, found
    assert found["size"] == len(image.body), found
    if artifact_type is None:
        assert "artifactType" not in found or found["artifactType"] in ("", None), (
            f"an index without artifactType: 'the artifactType MUST be omitted' {found}"
        )
    else:
        assert found.get("artifactType") == artifact_type, found
    assert (found.get("annotations") or {}) == (annotations or {}), found


async def referrers_fixture(oci: Client) -> dict[str, Any]:
    """A subject with four referrers of the four kinds the spec names, plus decoys."""
    subject = await oci.push_image(REPO, "v1")
    sbom = await push_artifact(oci, REPO, subject=subject.descriptor(), annotations={
        "org.opencontainers.image.created": "2024-01-01T00:00:00Z", "org.example.sbom.format": "json",
    })
    signature = await oci.push_image(
        REPO, seed="sig", config_media_type=SIGNATURE_CONFIG_TYPE, subject=subject.descriptor(),
        annotations={"org.example.signature.fingerprint": "abcd"},
    )
    plain_index = await oci.push_index(REPO, [signature], subject=subject.descriptor(),
                                       annotations={"org.example.index": "yes"})
    typed_index = await oci.push_index(REPO, [sbom], subject=subject.descriptor(), artifact_type=BUNDLE_TYPE)
    # Decoys: another subject in the same repository; the same subject in another repository.
    other = await oci.push_image(REPO, "v2", seed="other")
    await push_artifact(oci, REPO, subject=other.descriptor())
    await push_artifact(oci, "elsewhere/repo", subject=subject.descriptor())
    return {
        "subject": subject,
        "expected": {
            sbom.digest: (sbom, SBOM_TYPE, {"org.opencontainers.image.created": "2024-01-01T00:00:00Z",
                                            "org.example.sbom.format": "json"}),
            signature.digest: (signature, SIGNATURE_CONFIG_TYPE, {"org.example.signature.fingerprint": "abcd"}),
            plain_index.digest: (plain_index, None, {"org.example.index": "yes"}),
            typed_index.digest: (typed_index, BUNDLE_TYPE, None),
        },
    }


@pytest_twisted.ensureDeferred
async def test_referrers_list(oci: Client) -> None:
    """end-12a: 200 with an image index of descriptors (mediaType, size, digest, artifactType — the config mediaType when absent — and annotations)."""
    setup = await referrers_fixture(oci)
    reply = await oci.get(f"/v2/{REPO}/referrers/{setup['subject'].digest}")
    manifests = assert_referrers_document(reply)
    found = {d["digest"]: d for d in manifests}
    assert len(found) == len(manifests), "duplicate descriptors"
    assert set(found) == set(setup["expected"]), str(reply)
    for digest, (image, artifact_type, annotations) in setup["expected"].items():
        assert_descriptor(found[digest], image, artifact_type, annotations)


@pytest.mark.parametrize("artifact_type,expected", [
    (SBOM_TYPE, "sbom"),
    (SIGNATURE_CONFIG_TYPE, "signature"),
    (BUNDLE_TYPE, "bundle"),
    ("application/vnd.example.nothing", None),
])
@pytest_twisted.ensureDeferred
async def test_referrers_filter(oci: Client, artifact_type: str, expected: str | None) -> None:
    """end-12b: ?artifactType= filters, and "the response MUST include a header OCI-Filters-Applied: artifactType"."""
    setup = await referrers_fixture(oci)
    reply = await oci.get(with_query(f"/v2/{REPO}/referrers/{setup['subject'].digest}", artifactType=artifact_type))
    manifests = assert_referrers_document(reply)
    assert reply.header("OCI-Filters-Applied") == "artifactType", str(reply)
    wanted = [d for d, (_, at, _) in setup["expected"].items() if at == artifact_type]
    assert [d["digest"] for d in manifests] == wanted, str(reply)
    assert (len(wanted) == 1) == (expected is not None)


@pytest_twisted.ensureDeferred
async def test_referrers_of_unknown_subject(oci: Client) -> None:
    """end-12a: the request "MUST return a 200" whether or not the digest exists; "an empty manifest list MUST be returned"."""
    await oci.push_image(REPO, "v1")
    reply = await oci.get(f"/v2/{REPO}/referrers/{MISSING_SHA256}")
    assert assert_referrers_document(reply) == []
    assert reply.header("Link") is None, str(reply)


@pytest_twisted.ensureDeferred
async def test_referrers_in_unknown_repository(oci: Client) -> None:
    """end-12a: "the registry MUST NOT return a 404 Not Found to a referrers API request" — 200 empty (404 only as the table's repository failure)."""
    reply = await oci.get(f"/v2/no/such/repo/referrers/{MISSING_SHA256}")
    if reply.status == 404:
        expect_error(reply, 404, "NAME_UNKNOWN")
    else:
        assert assert_referrers_document(reply) == []


@pytest_twisted.ensureDeferred
async def test_referrers_after_subject_pushed_later(oci: Client) -> None:
    """Push: clients may "push a manifest and referrers to that manifest in either order"; the referrer is listed once the subject arrives."""
    config, layer = b'{"late":true}', b"late layer"
    await oci.push_blob(REPO, config)
    await oci.push_blob(REPO, layer)
    subject_body = encode({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config), "layers": [descriptor(OCI_LAYER, layer)],
    })
    subject_descriptor = descriptor(OCI_MANIFEST, subject_body)
    artifact = await push_artifact(oci, REPO, subject=subject_descriptor)
    reply = await oci.push_manifest(REPO, "late", subject_body, OCI_MANIFEST)
    assert reply.status == 201, str(reply)
    listed = assert_referrers_document(await oci.get(f"/v2/{REPO}/referrers/{subject_descriptor['digest']}"))
    assert [d["digest"] for d in listed] == [artifact.digest]


@pytest_twisted.ensureDeferred
async def test_referrers_forget_deleted_referrer(oci: Client) -> None:
    """end-12a lists manifests "with a subject field" that exist: after DELETE of a referrer it is no longer listed."""
    subject = await oci.push_image(REPO, "v1")
    kept = await push_artifact(oci, REPO, subject=subject.descriptor(), payload=b"kept")
    dropped = await push_artifact(oci, REPO, subject=subject.descriptor(), payload=b"dropped")
    reply = await oci.delete(f"/v2/{REPO}/manifests/{dropped.digest}")
    assert reply.status == 202, str(reply)
    listed = assert_referrers_document(await oci.get(f"/v2/{REPO}/referrers/{subject.digest}"))
    assert [d["digest"] for d in listed] == [kept.digest]


@pytest_twisted.ensureDeferred
async def test_referrers_of_sha512_subject(registry: Any, oci: Client) -> None:
    """end-12a: <digest> is any digest of the subject, sha512 included."""
    if sha256_only(registry):
        return await expect_sha512_refused(registry, oci)
    subject = await oci.push_image(REPO, algorithm="sha512")
    artifact = await push_artifact(oci, REPO, subject=subject.descriptor())
    assert artifact.reply.header("OCI-Subject") == subject.digest, str(artifact.reply)
    listed = assert_referrers_document(await oci.get(f"/v2/{REPO}/referrers/{subject.digest}"))
    assert [d["digest"] for d in listed] == [artifact.digest]


@pytest.mark.parametrize("digest", list(MALFORMED_DIGESTS.values()), ids=list(MALFORMED_DIGESTS))
@pytest_twisted.ensureDeferred
async def test_referrers_invalid_digest(oci: Client, digest: str) -> None:
    """end-12a: "If the request is invalid, such as a <digest> with an invalid syntax, a 400 Bad Request MUST be returned"."""
    await oci.push_image(REPO, "v1")
    reply = await oci.get(f"/v2/{REPO}/referrers/{digest}")
    expect_error(reply, 400, "DIGEST_INVALID")


# -- tags ----------------------------------------------------------------------

SORTED_TAGS = ["1.0", "a", "a-b", "a.b", "a1", "a_b", "b10", "b2", "latest", "v1.0"]


async def push_tags(oci: Client, repo: str, tags: list[str]) -> Image:
    image = await oci.push_image(repo)
    for tag in tags:
        reply = await oci.push_manifest(repo, tag, image.body, OCI_MANIFEST)
        assert reply.status == 201, str(reply)
    return image


@pytest_twisted.ensureDeferred
async def test_tags_list(oci: Client) -> None:
    """end-8a: 200 with {"name": <name>, "tags": [...]} "in lexical order"."""
    shuffled = ["latest", "b2", "a_b", "v1.0", "a", "b10", "1.0", "a.b", "a1", "a-b"]
    await push_tags(oci, REPO, shuffled)
    reply = await oci.get(f"/v2/{REPO}/tags/list")
    assert reply.status == 200, str(reply)
    assert (reply.header("Content-Type") or "").split(";")[0] == "application/json", str(reply)
    assert reply.json() == {"name": REPO, "tags": SORTED_TAGS}
    assert reply.header("Link") is None, str(reply)


@pytest.mark.parametrize("query,expected,more", [
    ({"n": "3"}, SORTED_TAGS[:3], True),
    ({"n": "10"}, SORTED_TAGS, False),
    ({"n": "50"}, SORTED_TAGS, False),
    ({"n": "0"}, [], False),
    ({"n": "3", "last": "a.b"}, ["a1", "a_b", "b10"], True),
    ({"n": "5", "last": "b2"}, ["latest", "v1.0"], False),
    ({"last": "b10"}, ["b2", "latest", "v1.0"], False),
    ({"last": "v1.0"}, [], False),
    ({"last": "a0", "n": "2"}, ["a1", "a_b"], True),
])
@pytest_twisted.ensureDeferred
async def test_tags_list_pagination(oci: Client, query: dict[str, str], expected: list[str], more: bool) -> None:
    """end-8b: n limits (MUST include n results unless fewer remain or Link is sent), last starts after <tagname>; n=0 is empty without Link."""
    await push_tags(oci, REPO, SORTED_TAGS)
    reply = await oci.get(with_query(f"/v2/{REPO}/tags/list", **query))
    assert reply.status == 200, str(reply)
    tags = reply.json()["tags"] or []
    if more:
        # "MAY return fewer than <int> results, but only when ... a Link header is provided"
        assert reply.next_link is not None, f"more tags remain but no Link rel=next\n{reply}"
        assert tags == expected[:len(tags)] and tags, str(reply)
    else:
        assert tags == expected, str(reply)
        assert reply.next_link is None, f"Link header although nothing remains\n{reply}"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest_twisted.ensureDeferred
async def test_tags_list_follow_link(oci: Client, n: int) -> None:
    """end-8b: following each Link: <...>; rel="next" (RFC 5988) walks the whole list once, in order."""
    await push_tags(oci, REPO, SORTED_TAGS)
    collected: list[str] = []
    url: str | None = with_query(f"/v2/{REPO}/tags/list", n=str(n))
    for _ in range(len(SORTED_TAGS) + 2):
        if url is None:
            break
        reply = await oci.get(url)
        assert reply.status == 200, str(reply)
        page = reply.json()["tags"] or []
        assert len(page) <= n, str(reply)
        collected.extend(page)
        url = reply.next_link
    assert url is None, "pagination did not end"
    assert collected == SORTED_TAGS


@pytest_twisted.ensureDeferred
async def test_tags_list_mixed_case_is_consistently_ordered(oci: Client) -> None:
    """end-8a: "lexical order (i.e. case-insensitive alphanumeric order)" — accepted as case-insensitive or byte order, but one order, also across pages."""
    tags = ["Beta", "alpha", "Gamma", "delta", "ALPHA2"]
    await push_tags(oci, REPO, tags)
    full = (await oci.get(f"/v2/{REPO}/tags/list")).json()["tags"]
    assert full in (sorted(tags), sorted(tags, key=str.lower)), full
    paged: list[str] = []
    url: str | None = with_query(f"/v2/{REPO}/tags/list", n="1")
    while url is not None and len(paged) <= len(tags):
        reply = await oci.get(url)
        paged.extend(reply.json()["tags"] or [])
        url = reply.next_link
    assert paged == full


@pytest_twisted.ensureDeferred
async def test_tags_list_unknown_repository(oci: Client) -> None:
    """end-8a: "Assuming a repository is found" 200 — an unknown repository is 404 NAME_UNKNOWN."""
    await oci.push_image(REPO, "v1")
    reply = await oci.get("/v2/no/such/repo/tags/list")
    expect_error(reply, 404, "NAME_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_tags_list_empty_after_tag_deletion(oci: Client) -> None:
    """end-8a: "The list of tags MAY be empty if there are no tags on the repository" — the repository still exists."""
    image = await oci.push_image(REPO, "only")
    reply = await oci.delete(f"/v2/{REPO}/manifests/only")
    assert reply.status == 202, str(reply)
    listed = await oci.get(f"/v2/{REPO}/tags/list")
    assert listed.status == 200, str(listed)
    assert listed.json()["name"] == REPO and listed.json()["tags"] in ([], None), str(listed)
    still = await get_manifest(oci, REPO, image.digest)
    assert still.status == 200


# -- catalog -------------------------------------------------------------------

REPOSITORIES = ["alpha", "alpha/one", "beta/two", "gamma", "gamma/x/y"]


@pytest_twisted.ensureDeferred
async def test_catalog_empty(oci: Client) -> None:
    """Catalog (apdx-1, not in v1.1 but served): an empty registry lists {"repositories": []}."""
    reply = await oci.get("/v2/_catalog")
    assert reply.status == 200, str(reply)
    assert reply.json() == {"repositories": []}


@pytest_twisted.ensureDeferred
async def test_catalog(oci: Client) -> None:
    """Catalog (apdx-1): 200 with {"repositories": [...]} in lexical order."""
    for repo in reversed(REPOSITORIES):
        await oci.push_image(repo, "v1")
    reply = await oci.get("/v2/_catalog")
    assert reply.status == 200, str(reply)
    assert reply.json() == {"repositories": REPOSITORIES}
    assert reply.next_link is None


@pytest.mark.parametrize("query,expected,more", [
    ({"n": "2"}, REPOSITORIES[:2], True),
    ({"n": "0"}, [], False),
    ({"n": "2", "last": "alpha/one"}, ["beta/two", "gamma"], True),
    ({"n": "9", "last": "beta/two"}, ["gamma", "gamma/x/y"], False),
])
@pytest_twisted.ensureDeferred
async def test_catalog_pagination(oci: Client, query: dict[str, str], expected: list[str], more: bool) -> None:
    """Catalog (apdx-1): n and last paginate like tags, with Link: <...>; rel="next" while more remain."""
    for repo in REPOSITORIES:
        await oci.push_image(repo, "v1")
    reply = await oci.get(with_query("/v2/_catalog", **query))
    assert reply.status == 200, str(reply)
    assert reply.json()["repositories"] == expected, str(reply)
    assert (reply.next_link is not None) == more, str(reply)
    if reply.next_link is not None:
        follow = await oci.get(reply.next_link)
        assert follow.status == 200, str(follow)
        start = REPOSITORIES.index(expected[-1]) + 1
        assert follow.json()["repositories"] == REPOSITORIES[start:start + int(query["n"])], str(follow)


# -- deletion ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_blob(oci: Client) -> None:
    """end-10: DELETE of a blob is 202; afterwards GET/HEAD are 404 and a second DELETE is 404 BLOB_UNKNOWN."""
    digest = await oci.push_blob(REPO, b"to be deleted")
    reply = await oci.delete(f"/v2/{REPO}/blobs/{digest}")
    assert reply.status == 202, str(reply)
    expect_error(await oci.get(f"/v2/{REPO}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    expect_error(await oci.head(f"/v2/{REPO}/blobs/{digest}"), 404)
    expect_error(await oci.delete(f"/v2/{REPO}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_delete_blob_unknown(registry: Any, oci: Client) -> None:
    """end-10: "If the blob is not found, a 404 Not Found code MUST be returned"."""
    await oci.push_blob(REPO, b"repo exists")
    before = await store_snapshot(registry)
    expect_error(await oci.delete(f"/v2/{REPO}/blobs/{MISSING_SHA256}"), 404, "BLOB_UNKNOWN")
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_delete_blob_only_in_its_repository(oci: Client) -> None:
    """end-10: deleting through another repository that does not hold the blob is 404 and leaves the owner's copy."""
    data = b"owned by a"
    digest = await oci.push_blob("team/a", data)
    await oci.push_blob("team/b", b"b exists")
    expect_error(await oci.delete(f"/v2/team/b/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    pulled = await oci.get(f"/v2/team/a/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data


@pytest_twisted.ensureDeferred
async def test_delete_blob_from_one_repository_keeps_other(oci: Client) -> None:
    """end-10: a blob deleted from one repository stays pullable from another that holds it too."""
    data = b"shared by both"
    digest = await oci.push_blob("team/a", data)
    await oci.push_blob("team/b", data)
    assert (await oci.delete(f"/v2/team/a/blobs/{digest}")).status == 202
    expect_error(await oci.get(f"/v2/team/a/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    pulled = await oci.get(f"/v2/team/b/blobs/{digest}")
    assert pulled.status == 200 and pulled.body == data, str(pulled)


@pytest_twisted.ensureDeferred
async def test_delete_manifest_by_digest(oci: Client) -> None:
    """Deleting manifests: 202; "a GET to /v2/<name>/manifests/<digest> and any tag pointing to that digest will return a 404"."""
    image = await push_tags(oci, REPO, ["t1", "t2"])
    other = await oci.push_image(REPO, "t3", seed="other")
    reply = await oci.delete(f"/v2/{REPO}/manifests/{image.digest}")
    assert reply.status == 202, str(reply)
    for reference in (image.digest, "t1", "t2"):
        expect_error(await get_manifest(oci, REPO, reference), 404, "MANIFEST_UNKNOWN")
        expect_error(await get_manifest(oci, REPO, reference, "HEAD"), 404)
    assert await tags_of(oci, REPO) == ["t3"]
    kept = await get_manifest(oci, REPO, "t3")
    assert kept.status == 200 and kept.body == other.body
    expect_error(await oci.delete(f"/v2/{REPO}/manifests/{image.digest}"), 404, "MANIFEST_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_delete_tag(oci: Client) -> None:
    """Deleting tags: 202; "Once deleted, a GET to /v2/<name>/manifests/<tag> will return a 404"; the manifest stays by digest."""
    image = await push_tags(oci, REPO, ["t1", "t2"])
    reply = await oci.delete(f"/v2/{REPO}/manifests/t1")
    assert reply.status == 202, str(reply)
    expect_error(await get_manifest(oci, REPO, "t1"), 404, "MANIFEST_UNKNOWN")
    for reference in (image.digest, "t2"):
        got = await get_manifest(oci, REPO, reference)
        assert got.status == 200 and got.body == image.body, str(got)
    assert await tags_of(oci, REPO) == ["t2"]


@pytest.mark.parametrize("reference", ["missing", MISSING_SHA256], ids=["tag", "digest"])
@pytest_twisted.ensureDeferred
async def test_delete_manifest_unknown(registry: Any, oci: Client, reference: str) -> None:
    """end-9: deleting a manifest or tag that does not exist is 404 MANIFEST_UNKNOWN and changes nothing."""
    await oci.push_image(REPO, "present")
    before = await store_snapshot(registry)
    expect_error(await oci.delete(f"/v2/{REPO}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    await assert_unchanged(registry, before)


@pytest_twisted.ensureDeferred
async def test_delete_manifest_unknown_repository(oci: Client) -> None:
    """Deleting manifests: "If the repository does not exist, the response MUST return 404 Not Found"."""
    reply = await oci.delete(f"/v2/no/such/repo/manifests/{MISSING_SHA256}")
    expect_error(reply, 404, "NAME_UNKNOWN", "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("target", ["blob", "manifest", "tag"])
@pytest_twisted.ensureDeferred
async def test_delete_disabled(make_registry: Any, target: str) -> None:
    """Content management: "If ... deletion is disabled, the registry MUST respond with either a 400 Bad Request or a 405" — registryd: 405 UNSUPPORTED."""
    registry = make_registry(delete_enabled=False)
    oci = Client(registry.url)
    image = await oci.push_image(REPO, "v1")
    path = {
        "blob": f"/v2/{REPO}/blobs/{digest_of(image.blobs[1])}",
        "manifest": f"/v2/{REPO}/manifests/{image.digest}",
        "tag": f"/v2/{REPO}/manifests/v1",
    }[target]
    before = await store_snapshot(registry)
    expect_error(await oci.delete(path), 405, "UNSUPPORTED")
    await assert_unchanged(registry, before)
    got = await oci.get(path, headers={"Accept": ACCEPT_ALL})
    assert got.status == 200, str(got)


# -- repository names ----------------------------------------------------------

# <name> MUST match [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
# and (Details, apdx-1) be shorter than 256 characters; otherwise NAME_INVALID.
#
# 400 NAME_INVALID rather than 404 for all of these: every path below has the
# shape /v2/<something>/<endpoint>, and an endpoint is recognised from the
# right (tags/list, manifests/<ref>, blobs/<digest>, ...), so the registry
# knows exactly which part is the name and that it is not a valid one. 404 is
# for paths that match no endpoint at all (test_unknown_route_...). "%2F" is
# an encoded octet, not a path separator (RFC 3986 §2.2: it is data), so
# "library%2Falpine" is one name containing '%', which the grammar forbids —
# treating it as "library/alpine" would make two URIs name one repository.
INVALID_NAMES = {
    "uppercase": "Library/alpine",
    "dot-dot-component": "library/../alpine",
    "leading-dot-dot": "../alpine",
    "encoded-slash": "library%2Falpine",
    "leading-slash": "/alpine",
    "double-slash": "library//alpine",
    "trailing-slash": "library/",
    "leading-separator": "_alpine",
    "trailing-separator": "alpine-",
    "double-period": "al..pine",
    "encoded-space": "al%20pine",
    "256-chars": "a" * 128 + "/" + "b" * 127,
}

NAME_ENDPOINTS = {
    "tags-list": ("GET", "/v2/{name}/tags/list"),
    "manifest-get": ("GET", "/v2/{name}/manifests/latest"),
    "manifest-put": ("PUT", "/v2/{name}/manifests/latest"),
    "manifest-delete": ("DELETE", "/v2/{name}/manifests/latest"),
    "blob-get": ("GET", "/v2/{name}/blobs/" + EMPTY_JSON_DIGEST),
    "upload-post": ("POST", "/v2/{name}/blobs/uploads/"),
    "upload-single-post": ("POST", "/v2/{name}/blobs/uploads/?digest=" + EMPTY_JSON_DIGEST),
    "referrers": ("GET", "/v2/{name}/referrers/" + EMPTY_JSON_DIGEST),
}


@pytest.mark.parametrize("endpoint", list(NAME_ENDPOINTS), ids=list(NAME_ENDPOINTS))
@pytest.mark.parametrize("name", list(INVALID_NAMES.values()), ids=list(INVALID_NAMES))
@pytest_twisted.ensureDeferred
async def test_invalid_repository_name(registry: Any, oci: Client, name: str, endpoint: str) -> None:
    """Pulling manifests: "<name> MUST match the following regular expression" — anything else is 400 NAME_INVALID, with nothing written."""
    # The valid look-alike exists, so a registry that normalises the name
    # (decoding %2F, resolving "..", dropping empty segments) would find it.
    await oci.push_blob("library/alpine", EMPTY_JSON)
    await oci.push_image("library/alpine", "latest")
    await oci.push_image("alpine", "latest")
    before = await store_snapshot(registry)
    method, template = NAME_ENDPOINTS[endpoint]
    body = None
    headers: dict[str, str] = {}
    if method == "PUT":
        body = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": descriptor(OCI_EMPTY, EMPTY_JSON), "layers": []})
        headers = {"Content-Type": OCI_MANIFEST}
    elif method == "POST":
        body = EMPTY_JSON if "digest=" in template else b""
        headers = OCTET
    reply = await oci.request(method, template.format(name=name), body=body, headers=headers)
    expect_error(reply, 400, "NAME_INVALID")
    await assert_unchanged(registry, before)


VALID_NAMES = [
    "a",
    "0",
    "library/alpine",
    "a/b/c/d/e",
    "a.b_c-d",
    "a__b",
    "a---b",
    "a.b/c__d/e---f",
    "x" * 127 + "/" + "y" * 127,  # 255 characters
]


@pytest.mark.parametrize("name", VALID_NAMES, ids=[n if len(n) < 40 else "255-chars" for n in VALID_NAMES])
@pytest_twisted.ensureDeferred
async def test_valid_repository_name(oci: Client, name: str) -> None:
    """Pulling manifests: every name the <name> grammar allows can be pushed, pulled and listed."""
    image = await oci.push_image(name, "v1")
    got = await get_manifest(oci, name, "v1")
    assert got.status == 200 and got.body == image.body, str(got)
    listed = await oci.get(f"/v2/{name}/tags/list")
    assert listed.status == 200 and listed.json() == {"name": name, "tags": ["v1"]}, str(listed)
    blob = await oci.get(f"/v2/{name}/blobs/{digest_of(image.blobs[0])}")
    assert blob.status == 200 and blob.body == image.blobs[0]
