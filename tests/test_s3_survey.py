"""Surveys and the mirror cache limit on a shared S3 bucket, against the session's radosgw.

S3 LastModified cannot be set back, so "least recently pulled" is made by
pulling a second apart (pull times are to the second), and "older than the
[gc] delay" by a one-second delay and a wait past it.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, AsyncIterator, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from conftest import RunningRegistry
from fake_upstream import FakeUpstream
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Client, descriptor, digest_of, encode
from registryd.config import StorageSettings, UpstreamConfig
from registryd.digest import Digest, parse_digest
from registryd.storage.guard import BlobGuard
from registryd.storage.s3 import S3Client
from registryd.storage.blobs import Blobs
from registryd.storage.s3.driver import S3Driver
from registryd.storage.layout import blob_key, repositories_root
from registryd.storage.repositories import Repositories
from registryd.storage.s3.driver import S3Driver
from registryd.upkeep import scheduler
from registryd.upkeep.collector import referenced_digests
from registryd.upkeep.eviction import plan_eviction
from registryd.upkeep.survey import SurveyedRepository, take_survey
from test_upkeep import metric
from support.wait import sleep

NS = "mirror.test:5000"      # its folder in the bucket: mirror/mirror.test_5000/


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(reactor).start()
    yield fake
    pytest_twisted.blockon(fake.close())


@pytest_twisted.async_yield_fixture
async def bucket(ceph_s3: Any) -> AsyncIterator[S3Client]:
    client = await ceph_s3.new_bucket()
    yield client
    await client.close()


def start_node(make_registry: Any, upstream: FakeUpstream, bucket: S3Client, max_size: int = 0) -> RunningRegistry:
    """A node on the shared bucket; collections only when a test (or an eviction) asks, with a 1 s delay."""
    return make_registry(upstreams=(UpstreamConfig(namespace=NS, url=upstream.url),),
                         storage=StorageSettings("s3", s3=bucket.settings), mirror_max_size=max_size,
                         gc_interval=0, gc_delay=1, usage_interval=3600)


async def metrics(node: RunningRegistry) -> str:
    return (await Client(node.url).get("/metrics")).body.decode()


def add_image(upstream: FakeUpstream, repo: str, layer_size: int) -> dict[str, Any]:
    return upstream.add_image(repo, "v1", layer_sizes=[layer_size], seed=repo)


def digests(image: dict[str, Any]) -> list[str]:
    """The manifest, its config, its layers."""
    return [image["digest"], image["config"]["digest"], *(layer["digest"] for layer in image["layers"])]


def sizes(image: dict[str, Any]) -> dict[str, int]:
    return {image["digest"]: len(image["manifest"]), image["config"]["digest"]: image["config"]["size"],
            **{layer["digest"]: layer["size"] for layer in image["layers"]}}


async def pull(client: Client, image: dict[str, Any]) -> None:
    """Manifest by tag, then every blob, through the mirror; each checked against its digest."""
    repo = image["repo"]
    reply = await client.get(f"/v2/{repo}/manifests/v1?ns={NS}", headers={"Accept": image["media_type"]})
    assert reply.status == 200 and reply.header("Docker-Content-Digest") == image["digest"], str(reply)
    for digest in digests(image)[1:]:
        reply = await client.get(f"/v2/{repo}/blobs/{digest}?ns={NS}")
        assert reply.status == 200 and digest_of(reply.body) == digest, str(reply)


async def wait_pulled(bucket: S3Client, image: dict[str, Any], since: float) -> None:
    """Until the bucket holds a pull time of ``image`` from ``since`` on (pulls are recorded in the background)."""
    mirror = Repositories(S3Driver(bucket), repositories_root(NS))
    digest = parse_digest(image["digest"])
    for _ in range(100):
        if (await mirror.pulls(image["repo"])).get(digest, 0.0) >= math.floor(since):
            return
        await sleep(0.05)
    raise AssertionError(f"no pull of {image['repo']} recorded")


async def pull_in_turn(client: Client, bucket: S3Client, images: list[dict[str, Any]]) -> None:
    """Pull each image a second after the one before: their pull times differ."""
    for image in images:
        began = time.time()
        await pull(client, image)
        await wait_pulled(bucket, image, began)
        await sleep(1.1)


async def push_local(client: Client, repo: str, layer: bytes) -> dict[str, int]:
    """A local image around ``layer``: manifest, config and layer, with their sizes."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "repo": repo}).encode()
    for blob in (config, layer):
        await client.push_blob(repo, blob)
    document = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                       "layers": [descriptor(OCI_LAYER, layer)]})
    assert (await client.push_manifest(repo, "v1", document, OCI_MANIFEST)).status == 201
    return {digest_of(blob): len(blob) for blob in (document, config, layer)}


async def in_bucket(bucket: S3Client, digest: str) -> bool:
    return await bucket.head_object(blob_key(parse_digest(digest))) is not None


async def cached_revisions(bucket: S3Client, repo: str) -> set[str]:
    return {str(d) for d in await Repositories(S3Driver(bucket), repositories_root(NS)).revisions(repo)}


async def missing_blobs(bucket: S3Client) -> list[str]:
    """Every revision, local or mirrored, whose document or a digest it names is not in ``blobs/``."""
    missing = []
    async for entry in bucket.list_objects(""):
        if "/_manifests/revisions/" not in entry.key:
            continue
        algorithm, hexpart = entry.key.rsplit("/", 2)[1:]
        manifest = Digest(algorithm, hexpart)
        document = await bucket.get_small(blob_key(manifest), 1 << 20)
        if document is None:
            missing.append(f"{entry.key}: its manifest")
            continue
        for digest in referenced_digests(document):
            if await bucket.head_object(blob_key(digest)) is None:
                missing.append(f"{entry.key}: {digest}")
    return missing


# --- the survey --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_survey_of_the_bucket_sets_the_store_size_metrics(make_registry, upstream, bucket) -> None:
    node = start_node(make_registry, upstream, bucket)
    client = Client(node.url)
    a, b = add_image(upstream, "lib/a", 3000), add_image(upstream, "lib/b", 5000)
    await pull(client, a)
    await pull(client, b)
    shared = a["layers"][0]["blob"].data()
    local = await push_local(client, "team/app", shared)       # a local image using a's layer
    orphan = b"in the bucket, in no repository" * 10
    await Blobs(S3Driver(bucket), BlobGuard()).put(parse_digest(digest_of(orphan)), orphan)

    size = await node.service.upkeep.survey()

    mirror_bytes = sum(sizes(b).values()) + len(a["manifest"]) + a["config"]["size"]
    assert (size.local_bytes, size.mirror_bytes, size.blobs) == (sum(local.values()), mirror_bytes, 9)
    assert size.total_bytes == size.local_bytes + size.mirror_bytes + len(orphan)
    text = await metrics(node)
    assert metric(text, "registryd_store_bytes", kind="local") == size.local_bytes
    assert metric(text, "registryd_store_bytes", kind="mirror") == mirror_bytes
    assert metric(text, "registryd_store_bytes", kind="unreferenced") == len(orphan)
    assert metric(text, "registryd_store_blobs") == 9
    # Without max_size, nothing is evicted.
    assert await cached_revisions(bucket, "lib/a") == {a["digest"]}
    assert metric(text, "registryd_mirror_evicted_manifests_total") == 0


@pytest_twisted.ensureDeferred
async def test_the_survey_names_mirrored_repositories_by_namespace(upstream, bucket, make_registry) -> None:
    node = start_node(make_registry, upstream, bucket)
    client = Client(node.url)
    image = add_image(upstream, "lib/deep/app", 1000)
    reply = await client.get(f"/v2/lib/deep/app/manifests/v1?ns={NS}", headers={"Accept": image["media_type"]})
    assert reply.status == 200
    await push_local(client, "team/app", b"local layer")
    survey = await take_survey(S3Driver(bucket), {"mirror.test_5000": NS})
    assert [(m.repository, str(m.digest)) for m in survey.manifests] == [
        (SurveyedRepository(f"{NS}/lib/deep/app", "lib/deep/app", NS, "mirror.test_5000"), image["digest"])]
    # The manifest linked its blobs, not fetched yet: links, but nothing they hold is stored.
    assert plan_eviction(survey, 1).blobs == {parse_digest(image["digest"]): len(image["manifest"])}


# --- eviction ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_over_max_size_the_least_recently_pulled_images_leave_the_bucket(
        make_registry, upstream, bucket) -> None:
    """a, b and c are pulled in that order; a's layer is also a local image's. Over the limit,
    a goes (its layer stays: local), then b with its layer; c stays whole."""
    mib = 100_000
    a, b, c = (add_image(upstream, f"lib/{name}", mib) for name in "abc")
    node = start_node(make_registry, upstream, bucket, max_size=int(1.5 * mib))
    client = Client(node.url)
    local = await push_local(client, "team/app", a["layers"][0]["blob"].data())
    await pull_in_turn(client, bucket, [a, b, c])
    await sleep(1.1)     # with the pulls' last second: everything is older than the 1 s delay

    size = await node.service.upkeep.survey()

    assert await cached_revisions(bucket, "lib/a") == set() and await cached_revisions(bucket, "lib/b") == set()
    assert await cached_revisions(bucket, "lib/c") == {c["digest"]}
    evicted = [a["digest"], a["config"]["digest"], *digests(b)]
    for digest in evicted:
        assert not await in_bucket(bucket, digest), digest
    for digest in [*digests(c), *local]:
        assert await in_bucket(bucket, digest), digest
    assert size.mirror_bytes == sum(sizes(c).values()) <= 1.5 * mib
    text = await metrics(node)
    assert metric(text, "registryd_mirror_evicted_manifests_total") == 2
    assert metric(text, "registryd_mirror_evicted_blobs_total") == len(evicted)
    assert metric(text, "registryd_mirror_evicted_bytes_total") == sum({**sizes(a), **sizes(b)}[d] for d in evicted)
    assert metric(text, "registryd_gc_runs_total", outcome="ok") == 1
    assert metric(text, "registryd_store_bytes", kind="mirror") == size.mirror_bytes
    assert await missing_blobs(bucket) == []
    # The local image pulls whole; b comes back from the upstream.
    manifest, *blobs = local
    reply = await client.get("/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert reply.status == 200 and reply.header("Docker-Content-Digest") == manifest
    for digest in blobs:
        reply = await client.get(f"/v2/team/app/blobs/{digest}")
        assert reply.status == 200 and digest_of(reply.body) == digest
    layer = upstream.blob_path("lib/b", b["layers"][0]["digest"])
    fetched = upstream.count("GET", layer)
    await pull(client, b)
    assert upstream.count("GET", layer) == fetched + 1


@pytest_twisted.ensureDeferred
async def test_a_manifest_pulled_after_the_survey_stays_with_its_blobs(
        make_registry, upstream, bucket, monkeypatch) -> None:
    a, b = add_image(upstream, "lib/a", 4000), add_image(upstream, "lib/b", 4000)
    node = start_node(make_registry, upstream, bucket, max_size=1)     # both over the limit
    client = Client(node.url)
    await pull_in_turn(client, bucket, [a, b])
    await sleep(1.1)
    real_survey = scheduler.take_survey
    plans: list[list[str]] = []

    async def then_pull_a(*args: Any, **kwargs: Any) -> Any:
        survey = await real_survey(*args, **kwargs)
        if not plans:
            plans.append(sorted(str(m.digest) for m in plan_eviction(survey, 1).manifests))
            await sleep(1.1)     # past the second of the pull time the survey saw
            began = time.time()
            await pull(client, a)
            await wait_pulled(bucket, a, began)
        return survey

    monkeypatch.setattr(scheduler, "take_survey", then_pull_a)
    await node.service.upkeep.survey()

    assert plans == [sorted([a["digest"], b["digest"]])]     # both were to go
    assert await cached_revisions(bucket, "lib/a") == {a["digest"]}
    assert await cached_revisions(bucket, "lib/b") == set()
    for digest in digests(a):
        assert await in_bucket(bucket, digest), digest
    for digest in digests(b):
        assert not await in_bucket(bucket, digest), digest
    text = await metrics(node)
    assert metric(text, "registryd_mirror_evicted_manifests_total") == 1
    assert metric(text, "registryd_mirror_evicted_blobs_total") == 3
    # a is still cached: pulled again, nothing comes from the upstream.
    fetched = upstream.count("GET", upstream.blob_path("lib/a", a["layers"][0]["digest"]))
    await pull(client, a)
    assert upstream.count("GET", upstream.blob_path("lib/a", a["layers"][0]["digest"])) == fetched


@pytest_twisted.ensureDeferred
async def test_two_nodes_evicting_at_once_leave_a_consistent_bucket(make_registry, upstream, bucket) -> None:
    """Both nodes survey, evict and collect at the same time while clients pull through both;
    afterwards every revision's blobs are in the bucket and every image pulls whole."""
    layer = 20_000
    images = [add_image(upstream, f"lib/i{n}", layer) for n in range(6)]
    limit = int(2.5 * layer)
    one = start_node(make_registry, upstream, bucket, max_size=limit)
    two = start_node(make_registry, upstream, bucket, max_size=limit)
    clients = [Client(one.url), Client(two.url)]
    local = await push_local(clients[1], "team/app", images[0]["layers"][0]["blob"].data())
    for n, image in enumerate(images):
        await pull(clients[n % 2], image)
    await sleep(2.1)
    stop = [False]
    pulls = [0]

    async def puller(client: Client, mine: list[dict[str, Any]]) -> None:
        while not stop[0]:
            for image in mine:
                await pull(client, image)
                pulls[0] += 1

    load = [Deferred.fromCoroutine(puller(clients[0], images[4:5])),
            Deferred.fromCoroutine(puller(clients[1], images[1:2]))]
    await gatherResults([Deferred.fromCoroutine(one.service.upkeep.survey()),
                         Deferred.fromCoroutine(two.service.upkeep.survey())], consumeErrors=True)
    stop[0] = True
    await gatherResults(load, consumeErrors=True)

    assert pulls[0] >= 2
    evicted = [metric(await metrics(node), "registryd_mirror_evicted_manifests_total") for node in (one, two)]
    assert sum(evicted) >= 3, evicted
    assert await missing_blobs(bucket) == []
    # Once more on one node, with nobody pulling: the cache is under the limit, and still whole.
    await sleep(1.1)
    size = await one.service.upkeep.survey()
    assert size.mirror_bytes <= limit
    assert await missing_blobs(bucket) == []
    for digest in local:
        assert await in_bucket(bucket, digest), digest
    for n, image in enumerate(images):
        await pull(clients[(n + 1) % 2], image)
    assert await missing_blobs(bucket) == []



@pytest_twisted.ensureDeferred
async def test_a_blob_deleted_between_its_lookup_and_its_read(make_registry, upstream, bucket) -> None:
    """Another node's eviction or GC may delete a blob after this node found it and before it
    read a byte: a mirrored blob is fetched again, a local one is unknown; never a 500."""
    image = add_image(upstream, "lib/gone", 20_000)
    node = start_node(make_registry, upstream, bucket)
    client = Client(node.url)
    await pull(client, image)
    local = b"a local layer" * 1000
    await push_local(client, "team/app", local)
    blobs = node.service.store.blobs
    opened = blobs.open

    async def open_then_lose(digest: Digest) -> Any:
        source = await opened(digest)
        await bucket.delete_object(blob_key(digest))   # what the other node does meanwhile
        return source

    blobs.open = open_then_lose
    layer = image["layers"][0]["digest"]
    path = upstream.blob_path("lib/gone", layer)
    for headers in ({}, {"Range": "bytes=10-99"}):
        fetched = upstream.count("GET", path)
        reply = await client.get(f"/v2/lib/gone/blobs/{layer}?ns={NS}", headers=headers)
        assert reply.status == 200 and digest_of(reply.body) == layer, str(reply)
        assert reply.header("Content-Range") is None
        assert upstream.count("GET", path) == fetched + 1
    reply = await client.get(f"/v2/team/app/blobs/{digest_of(local)}")
    assert reply.status == 404 and json.loads(reply.body)["errors"][0]["code"] == "BLOB_UNKNOWN", str(reply)
    assert reply.header("Docker-Content-Digest") is None
