"""End-to-end: registryd with ``[storage] driver = "containerd"`` over a real containerd (Debian's 1.6).

Each test starts a private containerd (``containerd_daemon``: its own root,
state and socket) and an in-process registryd whose store is that
containerd's ``k8s.io`` namespace. Images are brought in with ``ctr images
import`` from OCI layouts the tests build (``oci_layout``), pulled and pushed
with the real skopeo, and checked with ``ctr images ls`` / ``ctr content ls``.
A missing containerd, ctr or skopeo is a failure, not a skip.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import queue
import re
import subprocess
import sys
import tarfile
from typing import Any

import attrs
import pytest_twisted
from twisted.internet.threads import deferToThread

from registryd.config import StorageSettings, UpstreamConfig
from registryd.storage.containerd import joined
from registryd.storage.containerd.settings import ContainerdSettings
from oci_client import Client

from . import oci_layout as oci
from support.wait import sleep, wait_until
from upstreams import reference_upstream  # noqa: F401  (fixture)

from .containerd_daemon import ContainerdDaemon, make_containerd, push_unpackable_image  # noqa: F401
from .docker_daemon import make_dockerd  # noqa: F401  (fixture)
from .test_containerd import write_hosts_dir
from .skopeo_cli import Skopeo

HOSTNAME = "registry.example"
NAMESPACE = "k8s.io"


def settings_for(daemon: ContainerdDaemon, **overrides: Any) -> StorageSettings:
    values: dict[str, Any] = {"socket": daemon.address, "namespace": NAMESPACE, "hostname": HOSTNAME,
                              "content_dir": os.path.join(daemon.root, "io.containerd.content.v1.content")}
    values.update(overrides)
    return StorageSettings("containerd", containerd=ContainerdSettings(**values))


def layout_archive(directory: Any, image: Any, tag: str) -> str:
    """An OCI layout holding ``image`` as ``tag``, as the tar ``ctr images import`` reads."""
    root = os.path.join(str(directory), f"layout-{tag}")
    layout = oci.OCILayout(root)
    layout.add_image(image, tag=tag)
    archive = root + ".tar"
    with tarfile.open(archive, "w") as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name)
    return archive


def sample_image(seed: int) -> Any:
    return oci.make_image(oci.sample_layers(f"app{seed}", count=2, seed=seed, sizes=[300_000, 5_000]))


async def import_image(daemon: ContainerdDaemon, tmp_path: Any, image: Any, base: str, tag: str) -> None:
    archive = layout_archive(tmp_path, image, tag)
    await daemon.ctr("images", "import", "--no-unpack", "--base-name", base, archive, namespace=NAMESPACE)


async def content_digests(daemon: ContainerdDaemon) -> set[str]:
    listing = await daemon.ctr("content", "ls", "-q", namespace=NAMESPACE)
    return {line.strip() for line in listing.stdout.splitlines() if line.strip()}


async def image_names(daemon: ContainerdDaemon) -> dict[str, str]:
    return daemon.image_digests((await daemon.ctr("images", "ls", namespace=NAMESPACE)).stdout)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- pull ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_image_containerd_imported_is_pulled_with_skopeo(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    daemon = await make_containerd()
    image = sample_image(1)
    await import_image(daemon, tmp_path, image, f"{HOSTNAME}/team/app", "1.0")
    registry = make_registry(storage=settings_for(daemon))
    skopeo = Skopeo(tmp_path / "skopeo")

    out = tmp_path / "pulled"
    await skopeo.copy(f"docker://{registry.host}/team/app:1.0", f"oci:{out}:1.0")
    with open(out / "index.json", "rb") as f:
        assert image.digest in f.read().decode()
    for blob in image.blobs():
        with open(out / "blobs" / "sha256" / blob.digest.split(":", 1)[1], "rb") as f:
            assert sha256(f.read()) == blob.digest

    client = Client(registry.url)
    assert (await client.get("/v2/_catalog")).json()["repositories"] == ["team/app"]
    assert (await client.get("/v2/team/app/tags/list")).json() == {"name": "team/app", "tags": ["1.0"]}
    # Another repository's name never reaches this image's blobs.
    layer = image.layers[0].blob
    assert (await client.get(f"/v2/other/app/blobs/{layer.digest}")).status == 404


@pytest_twisted.ensureDeferred
async def test_blob_ranges_from_containerd_files_and_through_the_content_service(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """The sendfile path (containerd's own file) and the streamed path (content Read) send the same bytes."""
    daemon = await make_containerd()
    image = sample_image(2)
    await import_image(daemon, tmp_path, image, f"{HOSTNAME}/team/ranged", "v1")
    layer = image.layers[0].blob
    for content_dir in (None, ""):
        overrides = {} if content_dir is None else {"content_dir": content_dir}
        registry = make_registry(storage=settings_for(daemon, **overrides))
        client = Client(registry.url)
        whole = await client.get(f"/v2/team/ranged/blobs/{layer.digest}")
        assert whole.status == 200 and whole.body == layer.data, content_dir
        part = await client.get(f"/v2/team/ranged/blobs/{layer.digest}", headers={"Range": "bytes=1000-250999"})
        assert part.status == 206, part
        assert part.body == layer.data[1000:251000]
        assert part.header("Content-Range") == f"bytes 1000-250999/{len(layer.data)}"
        tail = await client.get(f"/v2/team/ranged/blobs/{layer.digest}", headers={"Range": "bytes=-10"})
        assert tail.status == 206 and tail.body == layer.data[-10:]


@pytest_twisted.ensureDeferred
async def test_a_docker_hub_image_is_reachable_all_three_ways(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """``docker.io/library/alpine:3.20`` held by containerd: repository ``docker.io/library/alpine``
    without an upstream; with one for docker.io (offline: containerd's copy is the only one) by
    ``?ns=docker.io``, by path prefix and as the default upstream's ``library/alpine``."""
    daemon = await make_containerd()
    image = sample_image(3)
    await import_image(daemon, tmp_path, image, "docker.io/library/alpine", "3.20")
    accept = {"Accept": oci.OCI_MANIFEST}

    plain = Client(make_registry(storage=settings_for(daemon)).url)
    reply = await plain.get("/v2/docker.io/library/alpine/manifests/3.20", headers=accept)
    assert reply.status == 200 and sha256(reply.body) == image.digest, reply
    assert "docker.io/library/alpine" in (await plain.get("/v2/_catalog")).json()["repositories"]

    hub = UpstreamConfig(namespace="docker.io", url="http://127.0.0.1:9", default=True, offline=True)
    mirror = Client(make_registry(storage=settings_for(daemon), upstreams=(hub,)).url)
    for path in ("/v2/library/alpine/manifests/3.20?ns=docker.io", "/v2/docker.io/library/alpine/manifests/3.20",
                 "/v2/library/alpine/manifests/3.20", "/v2/alpine/manifests/3.20"):
        reply = await mirror.get(path, headers=accept)
        assert reply.status == 200 and sha256(reply.body) == image.digest, (path, reply)
    layer = image.layers[1].blob
    reply = await mirror.get(f"/v2/library/alpine/blobs/{layer.digest}?ns=docker.io")
    assert reply.status == 200 and reply.body == layer.data, reply


# -- push ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_skopeo_push_is_an_image_containerd_holds_and_gc_keeps(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    daemon = await make_containerd()
    registry = make_registry(storage=settings_for(daemon))
    skopeo = Skopeo(tmp_path / "skopeo")
    image = sample_image(4)
    layout = oci.OCILayout(tmp_path / "source")
    layout.add_image(image, tag="2.0")
    await skopeo.copy(f"oci:{tmp_path / 'source'}:2.0", f"docker://{registry.host}/team/pushed:2.0")

    names = await image_names(daemon)
    assert names.get(f"{HOSTNAME}/team/pushed:2.0") == image.digest, names
    wanted = {image.digest, *(blob.digest for blob in image.blobs())}
    assert wanted <= await content_digests(daemon)

    # A GC-triggering delete of another image: nothing of the pushed one goes.
    other = sample_image(5)
    await import_image(daemon, tmp_path, other, "docker.io/library/other", "1")
    await daemon.ctr("images", "rm", "--sync", "docker.io/library/other:1", namespace=NAMESPACE)
    assert wanted <= await content_digests(daemon)

    # Another registryd, with nothing of the first's state, serves it all: containerd is the truth.
    again = make_registry(storage=settings_for(daemon))
    out = tmp_path / "pulled"
    await skopeo.copy(f"docker://{again.host}/team/pushed:2.0", f"oci:{out}:2.0")
    for blob in image.blobs():
        with open(out / "blobs" / "sha256" / blob.digest.split(":", 1)[1], "rb") as f:
            assert sha256(f.read()) == blob.digest


GONE_DELAY = 3


@pytest_twisted.ensureDeferred
async def test_delete_removes_the_image_and_containerd_gc_reclaims_it(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """Content registryd wrote is leased for [gc] delay only; once its image is deleted
    through the API, containerd's next collection takes every blob of it."""
    daemon = await make_containerd()
    # The lease must outlast the push (a collection between a blob's commit and the manifest
    # PUT would take the blob: manifest blob unknown), and end soon after the DELETE.
    registry = make_registry(storage=settings_for(daemon), gc_delay=GONE_DELAY)
    skopeo = Skopeo(tmp_path / "skopeo")
    image = sample_image(6)
    oci.OCILayout(tmp_path / "source").add_image(image, tag="1")
    await skopeo.copy(f"oci:{tmp_path / 'source'}:1", f"docker://{registry.host}/team/gone:1")
    wanted = {image.digest, *(blob.digest for blob in image.blobs())}
    assert wanted <= await content_digests(daemon)

    client = Client(registry.url)
    reply = await client.delete(f"/v2/team/gone/manifests/{image.digest}")
    assert reply.status == 202, reply
    assert not [name for name in await image_names(daemon) if "team/gone" in name]
    assert (await client.get(f"/v2/team/gone/manifests/{image.digest}")).status == 404

    # containerd's clock decides when a lease has run out (a second after gc_delay has passed).
    await sleep(GONE_DELAY + 1.5)
    # Trigger a synchronous collection.
    other = sample_image(7)
    await import_image(daemon, tmp_path, other, "docker.io/library/trigger", "1")
    await daemon.ctr("images", "rm", "--sync", "docker.io/library/trigger:1", namespace=NAMESPACE)
    assert not wanted & await content_digests(daemon)


@pytest_twisted.ensureDeferred
async def test_delete_also_removes_the_image_id_name_the_cri_gave_it_once_no_other_name_is_left(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """containerd's CRI (disabled in these daemons) names each image of k8s.io once more by its
    image ID, ``sha256:<config digest>``; here ``ctr images tag`` plays that part. After a DELETE
    that name must go too, or containerd's GC could never reclaim the image: but only once no
    other repository's name points at the same manifest."""
    daemon = await make_containerd()
    registry = make_registry(storage=settings_for(daemon))
    skopeo = Skopeo(tmp_path / "skopeo")
    image = sample_image(20)
    oci.OCILayout(tmp_path / "source").add_image(image, tag="1")
    for repo in ("team/one", "team/two"):
        await skopeo.copy(f"oci:{tmp_path / 'source'}:1", f"docker://{registry.host}/{repo}:1")
    image_id = image.config.digest
    await daemon.ctr("images", "tag", f"{HOSTNAME}/team/one:1", image_id, namespace=NAMESPACE)
    client = Client(registry.url)

    assert (await client.delete(f"/v2/team/one/manifests/{image.digest}")).status == 202
    assert image_id in await image_names(daemon)      # team/two still names that image

    assert (await client.delete(f"/v2/team/two/manifests/{image.digest}")).status == 202
    assert image_id not in await image_names(daemon)
    assert not [name for name in await image_names(daemon) if "team/" in name]


# -- mirror -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_pull_through_fill_lands_in_containerd_and_is_served_from_it(
        reference_upstream: Any, make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """A mirror fill on this driver writes containerd's image ``upstream.test/lib/app:v1`` and its
    content; an offline registryd then serves it from containerd alone, to a second containerd
    pulling through ``hosts.toml``."""
    up = reference_upstream("open")
    image = push_unpackable_image(up, "lib/app", "v1", marker="registryd-containerd-store")
    daemon = await make_containerd()
    upstream = UpstreamConfig(namespace="upstream.test", url=up.url)
    registry = make_registry(storage=settings_for(daemon), upstreams=(upstream,))
    skopeo = Skopeo(tmp_path / "skopeo")
    await skopeo.copy(f"docker://{registry.host}/upstream.test/lib/app:v1", f"oci:{tmp_path / 'first'}:v1")
    # A client has the whole blob before its fill is in the store: wait for the fills to be stored.
    await registry.service.api.mirror.settle_fills(30)

    names = await image_names(daemon)
    assert names.get("upstream.test/lib/app:v1") == image["digest"], names
    wanted = {image["digest"], image["config"]["digest"], image["layers"][0]["digest"]}
    assert wanted <= await content_digests(daemon)

    # The node's images are not registryd's alone to remove: no prune, no collection touches them.
    admin = Client(registry.url)
    json_body = {"Content-Type": "application/json"}
    for path in ("/admin/prune?older_than=0&pattern=**", "/admin/gc?delay=0"):
        refused = await admin.post(path, headers=json_body)
        assert refused.status == 400 and b"nothing there" in refused.body, (path, refused.status, refused.body)
    assert (await image_names(daemon)).get("upstream.test/lib/app:v1") == image["digest"]

    # The upstream is gone from here on: an offline registryd has only containerd.
    offline = attrs.evolve(upstream, offline=True)
    served = make_registry(storage=settings_for(daemon), upstreams=(offline,))
    hosts_dir = write_hosts_dir(tmp_path / "hosts.d", "upstream.test", f"http://{served.host}")
    node = await make_containerd()
    await node.ctr("images", "pull", "--hosts-dir", hosts_dir, "upstream.test/lib/app:v1")
    pulled = node.image_digests((await node.ctr("images", "ls")).stdout)
    assert pulled.get("upstream.test/lib/app:v1") == image["digest"], pulled


def read_to_length(host: str, path: str) -> tuple[int, bytes]:
    """Blocking: a GET whose body is read to its Content-Length, not to the connection's end."""
    connection = http.client.HTTPConnection(host, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_a_fill_of_a_blob_the_node_is_pulling_waits_for_that_pull_instead_of_writing_it_twice(
        reference_upstream: Any, make_containerd: Any, make_registry: Any, monkeypatch: Any) -> None:
    """The node's containerd pulling through registryd ingests each blob itself (``layer-sha256:<hex>``,
    opened before it asks registryd): the fill of that blob waits for that ingest to commit, then
    only leases the content, so containerd is sent its bytes once. The node's commit succeeds (it
    would be refused as already there had registryd written the blob meanwhile); a stalled ingest
    (a pull that gave up) is not waited for."""
    up = reference_upstream("open")
    image = push_unpackable_image(up, "lib/joined", "v1", marker="registryd-joined", payload_size=2_000_000)
    layer = image["layers"][0]
    monkeypatch.setattr(joined, "STALL", 3.0)
    daemon = await make_containerd()
    registry = make_registry(storage=settings_for(daemon),
                             upstreams=(UpstreamConfig(namespace="upstream.test", url=up.url),))
    half = layer["size"] // 2
    pull = await deferToThread(IngestHolder, daemon.address, f"layer-{layer['digest']}")
    try:
        await deferToThread(pull.write, layer["data"][:half])
        # As containerd reads a blob: to its Content-Length (the response ends once the fill is stored).
        status, body = await deferToThread(read_to_length, registry.host,
                                           f"/v2/upstream.test/lib/joined/blobs/{layer['digest']}")
        assert status == 200 and body == layer["data"]
        await sleep(1.0)   # the fill is verified: it waits for the node's ingest, which moved < STALL ago
        assert layer["digest"] not in await content_digests(daemon), (
            await daemon.ctr("content", "ls", namespace=NAMESPACE)).stdout
        await deferToThread(pull.write, layer["data"][half:])
        await deferToThread(pull.commit, layer["digest"], {"test.writer": "the node's pull"})
    finally:
        await deferToThread(pull.release)
    await registry.service.api.mirror.settle_fills(30)
    info = (await daemon.ctr("content", "ls", namespace=NAMESPACE)).stdout
    line = next(line for line in info.splitlines() if line.startswith(layer["digest"]))
    assert "test.writer" in line, line
    leases = (await daemon.ctr("leases", "ls", namespace=NAMESPACE)).stdout
    assert "registryd-recent-" in leases, leases

    # An ingest of the config that stands still: the fill writes the config itself after the stall.
    config = image["config"]
    stalled = await deferToThread(IngestHolder, daemon.address, f"config-{config['digest']}")
    try:
        await deferToThread(stalled.write, config["data"][:10])
        status, body = await deferToThread(read_to_length, registry.host,
                                           f"/v2/upstream.test/lib/joined/blobs/{config['digest']}")
        assert status == 200 and body == config["data"]
        await registry.service.api.mirror.settle_fills(30)
        assert config["digest"] in await content_digests(daemon)
    finally:
        await deferToThread(stalled.release)


# -- health, read-only, resumed uploads ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_push_under_another_registrys_name_is_refused_unless_foreign_names(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """Without an upstream, ``docker.io/library/shadow`` is a repository like any other on the
    filesystem store; on containerd it would be the node's image of that name, what the kubelet
    runs for ``docker.io/library/shadow``: a push (its upload, a mount, a manifest) and a delete
    under such a name are refused with DENIED and change nothing, unless ``foreign_names`` allows them."""
    daemon = await make_containerd()
    node = sample_image(18)
    await import_image(daemon, tmp_path, node, "docker.io/library/alpine", "3.20")
    client = Client(make_registry(storage=settings_for(daemon)).url)
    image = sample_image(19)
    before = await image_names(daemon)

    refused = await client.post("/v2/docker.io/library/shadow/blobs/uploads/")
    assert refused.status == 405 and refused.codes == ["DENIED"], refused
    assert "foreign_names" in refused.json()["errors"][0]["message"]
    config = await client.push_blob("team/app", image.config.data)
    mounted = await client.post(f"/v2/docker.io/library/shadow/blobs/uploads/?mount={config}&from=team/app")
    assert mounted.status == 405 and mounted.codes == ["DENIED"], mounted
    for blob in image.layers:
        await client.push_blob("team/app", blob.blob.data)
    # A manifest of blobs the node's docker.io/library/alpine has, tagged "latest" there.
    manifest = await client.push_manifest("docker.io/library/alpine", "latest", node.manifest.data,
                                          node.manifest.media_type)
    assert manifest.status == 405 and manifest.codes == ["DENIED"], manifest
    deleted = await client.delete(f"/v2/docker.io/library/alpine/manifests/{node.digest}")
    assert deleted.status == 405 and deleted.codes == ["DENIED"], deleted
    assert await image_names(daemon) == before   # no shadow, no alpine:latest; alpine:3.20 stays
    # Its own host name is its own: registry.example/team/app is team/app.
    own = await client.push_manifest(f"{HOSTNAME}/team/app", "1", image.manifest.data, image.manifest.media_type)
    assert own.status == 201, own
    assert (await client.get("/v2/team/app/manifests/1")).status == 200

    allowed = Client(make_registry(storage=settings_for(daemon, foreign_names=True)).url)
    for blob in image.blobs():
        await allowed.push_blob("docker.io/library/shadow", blob.data)
    pushed = await allowed.push_manifest("docker.io/library/shadow", "1", image.manifest.data, image.manifest.media_type)
    assert pushed.status == 201, pushed
    assert (await image_names(daemon)).get("docker.io/library/shadow:1") == image.digest


@pytest_twisted.ensureDeferred
async def test_readyz_fails_while_containerd_does_not_answer(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    daemon = await make_containerd()
    image = sample_image(8)
    await import_image(daemon, tmp_path, image, f"{HOSTNAME}/team/app", "1")
    registry = make_registry(storage=settings_for(daemon))
    client = Client(registry.url)
    assert (await client.get("/readyz")).status == 200

    await deferToThread(daemon.stop)
    down = await client.get("/readyz")
    assert down.status == 503 and down.json()["status"] == "unavailable", down
    # A request that needs containerd meanwhile: 503 with Retry-After, never a traceback.
    reply = await client.get("/v2/team/app/manifests/1", headers={"Accept": oci.OCI_MANIFEST})
    assert reply.status == 503 and reply.header("Retry-After"), reply
    assert (await client.get("/healthz")).status == 200

    await deferToThread(daemon.start)

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200
    await wait_until(ready, 15, "/readyz once containerd is back")
    reply = await client.get("/v2/team/app/manifests/1", headers={"Accept": oci.OCI_MANIFEST})
    assert reply.status == 200 and sha256(reply.body) == image.digest, reply


@pytest_twisted.ensureDeferred
async def test_read_only_serves_the_node_and_refuses_pushes(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    daemon = await make_containerd()
    image = sample_image(9)
    await import_image(daemon, tmp_path, image, f"{HOSTNAME}/team/app", "1")
    registry = make_registry(storage=settings_for(daemon, read_only=True))
    client = Client(registry.url)
    reply = await client.get("/v2/team/app/manifests/1", headers={"Accept": oci.OCI_MANIFEST})
    assert reply.status == 200 and sha256(reply.body) == image.digest
    # `ctr images import` leaves its layout's index.json unreferenced, and containerd's
    # background collection may take it at any moment: compare the image's own content.
    wanted = {image.digest, *(blob.digest for blob in image.blobs())}
    before_content, before_names = await content_digests(daemon), await image_names(daemon)
    assert wanted <= before_content

    pushed = await client.post("/v2/team/new/blobs/uploads/")
    assert pushed.status == 405 and "DENIED" in pushed.codes, pushed
    removed = await client.delete(f"/v2/team/app/manifests/{image.digest}")
    assert removed.status == 405 and "DENIED" in removed.codes, removed
    after_content = await content_digests(daemon)
    assert wanted <= after_content <= before_content, (before_content, after_content)
    assert await image_names(daemon) == before_names


@pytest_twisted.ensureDeferred
async def test_a_chunked_upload_resumes_on_a_restarted_registryd(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """The session is spooled in data_dir: a registryd started again on it continues the upload,
    and the committed blob and its manifest land in containerd."""
    daemon = await make_containerd()
    data_dir = str(tmp_path / "data")
    first = Client(make_registry(storage=settings_for(daemon), data_dir=data_dir).url)
    image = sample_image(10)
    layer = image.layers[0].blob
    started = await first.post("/v2/team/resumed/blobs/uploads/")
    assert started.status == 202, started
    half = len(layer.data) // 2
    patched = await first.patch(started.location, layer.data[:half],
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Range": f"0-{half - 1}"})
    assert patched.status == 202, patched

    second = Client(make_registry(storage=settings_for(daemon), data_dir=data_dir).url)
    status = await second.get(patched.location)
    assert status.status == 204 and status.header("Range") == f"0-{half - 1}", status
    done = await second.put(f"{patched.location}{'&' if '?' in patched.location else '?'}digest={layer.digest}",
                            layer.data[half:], headers={"Content-Type": "application/octet-stream",
                                                        "Content-Range": f"{half}-{len(layer.data) - 1}"})
    assert done.status == 201, done
    assert layer.digest in await content_digests(daemon)
    for blob in (image.config, image.layers[1].blob):
        assert (await second.post(f"/v2/team/resumed/blobs/uploads/?digest={blob.digest}", blob.data,
                                  headers={"Content-Type": "application/octet-stream"})).status == 201
    put = await second.put("/v2/team/resumed/manifests/1", image.manifest.data,
                           headers={"Content-Type": oci.OCI_MANIFEST})
    assert put.status == 201, put
    assert (await image_names(daemon)).get(f"{HOSTNAME}/team/resumed:1") == image.digest


def data_dir_bytes(root: str) -> int:
    """Bytes allocated on disk to the files under ``root`` (a sparse file's hole takes none)."""
    return sum(os.lstat(os.path.join(folder, name)).st_blocks * 512
               for folder, _, names in os.walk(root) for name in names)


@pytest_twisted.ensureDeferred
async def test_mid_upload_the_bytes_are_in_containerds_ingest_and_gc_keeps_them(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """An acknowledged body is in containerd's ingest (``ctr content active`` lists the session's
    ref at its size), not in the data directory; a GC-triggering delete and ``ctr content prune
    references`` leave it (the session's lease holds it); the finished upload is committed from it
    and the ingest and its lease go."""
    daemon = await make_containerd()
    data_dir = str(tmp_path / "data")
    # Leases of GONE_DELAY: they end before the prune below, yet outlast the commit until the
    # listing at the end (with 0, a collection in that second took the committed blob under load).
    client = Client(make_registry(storage=settings_for(daemon), data_dir=data_dir, gc_delay=GONE_DELAY).url)
    layer = sample_image(12).layers[0].blob
    started = await client.post("/v2/team/ingest/blobs/uploads/")
    assert started.status == 202, started
    upload_id = started.location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    ref = f"registryd-upload-{upload_id}"
    half = len(layer.data) // 2
    patched = await client.patch(started.location, layer.data[:half],
                                 headers={"Content-Type": "application/octet-stream", "Content-Range": f"0-{half - 1}"})
    assert patched.status == 202, patched

    async def active() -> set[str]:
        listing = (await daemon.ctr("content", "active", namespace=NAMESPACE)).stdout
        return {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}

    ingests = os.path.join(daemon.root, "io.containerd.content.v1.content", "ingest")
    assert ref in await active()
    assert data_dir_bytes(ingests) >= half   # the ingest's data (and its small ref/startedat files)
    assert data_dir_bytes(data_dir) < half // 4   # the session's state only, not its bytes

    # containerd's leases run out a second after gc_delay has passed: the session's does not.
    await sleep(GONE_DELAY + 1.5)
    await daemon.ctr("content", "prune", "references", namespace=NAMESPACE)
    other = sample_image(13)
    await import_image(daemon, tmp_path, other, "docker.io/library/trigger", "1")
    await daemon.ctr("images", "rm", "--sync", "docker.io/library/trigger:1", namespace=NAMESPACE)
    assert ref in await active() and data_dir_bytes(ingests) >= half
    assert (await client.get(patched.location)).header("Range") == f"0-{half - 1}"

    done = await client.put(f"{patched.location}{'&' if '?' in patched.location else '?'}digest={layer.digest}",
                            layer.data[half:], headers={"Content-Type": "application/octet-stream",
                                                        "Content-Range": f"{half}-{len(layer.data) - 1}"})
    assert done.status == 201, done
    assert layer.digest in await content_digests(daemon)
    assert ref not in await active()
    leases = (await daemon.ctr("leases", "ls", namespace=NAMESPACE)).stdout
    assert ref not in leases, leases
    fetched = await client.get(f"/v2/team/ingest/blobs/{layer.digest}")
    assert fetched.status == 200 and sha256(fetched.body) == layer.digest


@pytest_twisted.ensureDeferred
async def test_a_body_after_another_registryd_moved_the_ingest_on_gets_416(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """Two registryd on one data directory (as worker processes): the ingest's offset is the
    session's size, so a body the first sends where it last saw the session ends is refused with
    416 and the Range the ingest has, once the second appended meanwhile; nothing is appended twice."""
    daemon = await make_containerd()
    data_dir = str(tmp_path / "data")
    first = Client(make_registry(storage=settings_for(daemon), data_dir=data_dir).url)
    second = Client(make_registry(storage=settings_for(daemon), data_dir=data_dir).url)
    layer = sample_image(15).layers[0].blob
    third = len(layer.data) // 3
    headers = {"Content-Type": "application/octet-stream"}
    started = await first.post("/v2/team/moved/blobs/uploads/")
    one = await first.patch(started.location, layer.data[:third], headers={**headers, "Content-Range": f"0-{third - 1}"})
    assert one.status == 202, one
    two = await second.patch(one.location, layer.data[third:2 * third],
                             headers={**headers, "Content-Range": f"{third}-{2 * third - 1}"})
    assert two.status == 202, two
    stale = await first.patch(one.location, layer.data[third:2 * third],
                              headers={**headers, "Content-Range": f"{third}-{2 * third - 1}"})
    assert stale.status == 416 and stale.header("Range") == f"0-{2 * third - 1}", stale
    ref = "registryd-upload-" + started.location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    assert ref in (await daemon.ctr("content", "active", namespace=NAMESPACE)).stdout   # the session is intact
    done = await first.put(f"{one.location}{'&' if '?' in one.location else '?'}digest={layer.digest}",
                           layer.data[2 * third:], headers={**headers, "Content-Range": f"{2 * third}-{len(layer.data) - 1}"})
    assert done.status == 201, done
    fetched = await second.get(f"/v2/team/moved/blobs/{layer.digest}")
    assert fetched.status == 200 and sha256(fetched.body) == layer.digest


class IngestHolder:
    """Another writer of an ingest, as a worker process is while it sends a body: a Write stream
    on the ref, opened and held (containerd locks the ref) until ``release``."""

    def __init__(self, socket: str, ref: str) -> None:
        import grpc
        from registryd.storage.containerd.proto import containerd_api_pb2 as api
        self._requests: queue.Queue[Any] = queue.Queue()
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        call = self._channel.stream_stream("/containerd.services.content.v1.Content/Write",
                                           request_serializer=lambda m: m.SerializeToString(),
                                           response_deserializer=api.ContentWriteResponse.FromString)
        self._replies = call(iter(self._requests.get, None), metadata=[("containerd-namespace", NAMESPACE)])
        self._api, self._ref = api, ref
        self._requests.put(api.ContentWriteRequest(action=api.STAT, ref=ref))
        self.offset = next(self._replies).offset   # the writer is open: the ref is locked

    def write(self, data: bytes) -> None:
        self._requests.put(self._api.ContentWriteRequest(action=self._api.WRITE, ref=self._ref, offset=self.offset,
                                                         data=data))
        self.offset = next(self._replies).offset

    def commit(self, digest: str, labels: dict[str, str]) -> None:
        """Commit what was written as ``digest`` (an RpcError if containerd refuses: it has it already)."""
        self._requests.put(self._api.ContentWriteRequest(action=self._api.COMMIT, ref=self._ref, offset=self.offset,
                                                         total=self.offset, expected=digest, labels=labels))
        next(self._replies)

    def release(self) -> None:
        self._requests.put(None)
        for _ in self._replies:
            pass
        self._channel.close()


@pytest_twisted.ensureDeferred
async def test_a_body_while_another_process_writes_the_ingest_gets_416(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """As on the filesystem store (tests/test_uploads.py::test_two_processes_on_one_data_directory_
    continue_each_others_sessions): a body that arrives while another process writes a body of the
    same session (containerd holds the ingest's ref locked for it) is refused with 416 and the Range
    of the acknowledged end, not 503; the session is intact and goes on once the other is done."""
    daemon = await make_containerd()
    client = Client(make_registry(storage=settings_for(daemon)).url)
    layer = sample_image(17).layers[0].blob
    half = len(layer.data) // 2
    headers = {"Content-Type": "application/octet-stream"}
    started = await client.post("/v2/team/locked/blobs/uploads/")
    one = await client.patch(started.location, layer.data[:half], headers={**headers, "Content-Range": f"0-{half - 1}"})
    assert one.status == 202, one
    ref = "registryd-upload-" + started.location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    holder = await deferToThread(IngestHolder, daemon.address, ref)
    try:
        assert holder.offset == half
        busy = await client.patch(one.location, layer.data[half:],
                                  headers={**headers, "Content-Range": f"{half}-{len(layer.data) - 1}"})
        assert busy.status == 416 and busy.header("Range") == f"0-{half - 1}", busy
        assert busy.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID", busy
        closing = await client.put(f"{one.location}{'&' if '?' in one.location else '?'}digest={layer.digest}",
                                   layer.data[half:], headers=headers)
        assert closing.status == 416 and closing.header("Range") == f"0-{half - 1}", closing
    finally:
        await deferToThread(holder.release)
    assert (await client.get(one.location)).header("Range") == f"0-{half - 1}"
    done = await client.put(f"{one.location}{'&' if '?' in one.location else '?'}digest={layer.digest}",
                            layer.data[half:], headers={**headers, "Content-Range": f"{half}-{len(layer.data) - 1}"})
    assert done.status == 201, done
    fetched = await client.get(f"/v2/team/locked/blobs/{layer.digest}")
    assert fetched.status == 200 and sha256(fetched.body) == layer.digest


@pytest_twisted.ensureDeferred
async def test_reaping_aborts_expired_ingests_and_those_whose_state_is_gone(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    """The upload reaper aborts the ingest and drops the lease of an expired session, and of a
    session whose state a crash lost (its lease is all that names it)."""
    daemon = await make_containerd()
    registry = make_registry(storage=settings_for(daemon))
    client = Client(registry.url)
    layer = sample_image(16).layers[0].blob
    refs = []
    for _ in range(2):
        started = await client.post("/v2/team/reaped/blobs/uploads/")
        patched = await client.patch(started.location, layer.data, headers={"Content-Type": "application/octet-stream"})
        assert patched.status == 202, patched
        refs.append("registryd-upload-" + started.location.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
    # The second session's folder (its state) is lost, as in a crash before the lease went.
    subprocess.run(["rm", "-rf", os.path.join(registry.data_dir, "uploads", refs[1].rsplit("-", 1)[-1])], check=True)
    active = (await daemon.ctr("content", "active", namespace=NAMESPACE)).stdout
    assert all(ref in active for ref in refs), active
    await sleep(1.1)   # containerd records a lease's creation to the second

    # A session that got a body since is not expired, however old its start.
    started = await client.post("/v2/team/reaped/blobs/uploads/")
    await sleep(1.1)
    patched = await client.patch(started.location, layer.data[:1000], headers={"Content-Type": "application/octet-stream"})
    assert patched.status == 202, patched
    removed = await registry.service.store.uploads.reap(0.8)
    assert removed == 2
    assert (await client.get(patched.location)).status == 204
    active = (await daemon.ctr("content", "active", namespace=NAMESPACE)).stdout
    leases = (await daemon.ctr("leases", "ls", namespace=NAMESPACE)).stdout
    assert not any(ref in active or ref in leases for ref in refs), (active, leases)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_upload_aborts_its_ingest_and_a_wrong_digest_stores_nothing(
        make_containerd: Any, make_registry: Any, tmp_path: Any) -> None:
    daemon = await make_containerd()
    client = Client(make_registry(storage=settings_for(daemon)).url)
    layer = sample_image(14).layers[0].blob
    before = await content_digests(daemon)
    for ending in ("cancel", "wrong digest"):
        started = await client.post("/v2/team/aborted/blobs/uploads/")
        patched = await client.patch(started.location, layer.data,
                                     headers={"Content-Type": "application/octet-stream"})
        assert patched.status == 202, patched
        ref = "registryd-upload-" + started.location.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        assert ref in (await daemon.ctr("content", "active", namespace=NAMESPACE)).stdout
        if ending == "cancel":
            assert (await client.delete(patched.location)).status == 204
        else:
            wrong = sha256(b"something else")
            put = await client.put(f"{patched.location}{'&' if '?' in patched.location else '?'}digest={wrong}", b"",
                                   headers={"Content-Type": "application/octet-stream"})
            assert put.status == 400 and "DIGEST_INVALID" in put.codes, put
        assert ref not in (await daemon.ctr("content", "active", namespace=NAMESPACE)).stdout
        assert ref not in (await daemon.ctr("leases", "ls", namespace=NAMESPACE)).stdout
        assert (await client.get(patched.location)).status == 404
    assert await content_digests(daemon) == before


# -- admin commands -----------------------------------------------------------------------


def registryd_command(*args: str) -> subprocess.CompletedProcess[str]:
    """Blocking: ``registryd ARGS`` (this venv's), at most a minute."""
    command = [os.path.join(os.path.dirname(sys.executable), "registryd"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest_twisted.ensureDeferred
async def test_ls_fsck_and_gc_on_the_containerd_driver(make_containerd: Any, tmp_path: Any) -> None:
    """``ls`` lists containerd's images, ``fsck`` re-hashes its content through the content
    service (and finds a flipped byte), ``gc`` refuses: containerd collects its own garbage."""
    daemon = await make_containerd()
    image = sample_image(11)
    await import_image(daemon, tmp_path, image, f"{HOSTNAME}/team/app", "1.0")
    config = tmp_path / "registryd.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[storage]\ndriver = "containerd"\n'
                      f'[storage.containerd]\nsocket = "{daemon.address}"\nhostname = "{HOSTNAME}"\n')

    listed = await deferToThread(registryd_command, "ls", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^team/app\s+local\s+1\s.*\b1\.0$", listed.stdout, re.M), listed.stdout

    checked = await deferToThread(registryd_command, "fsck", "-c", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(image.blobs()) + 1} blobs" in checked.stdout and "clean" in checked.stdout, checked.stdout

    layer = image.layers[0].blob
    path = os.path.join(daemon.root, "io.containerd.content.v1.content", "blobs", "sha256",
                        layer.digest.split(":", 1)[1])
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(bytes([layer.data[100] ^ 0xFF]))
    damaged = await deferToThread(registryd_command, "fsck", "-c", str(config))
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert f"damage: blob {layer.digest}" in damaged.stdout, damaged.stdout

    collected = await deferToThread(registryd_command, "gc", "-c", str(config))
    assert collected.returncode == 3 and "collects its own garbage" in collected.stderr, collected
    pruned = await deferToThread(registryd_command, "prune", "-c", str(config), "--pattern", "**")
    assert pruned.returncode == 3 and "registryd prunes nothing there" in pruned.stderr, pruned
    assert layer.digest in await content_digests(daemon)


@pytest_twisted.ensureDeferred
async def test_export_and_import_on_the_containerd_driver(make_containerd: Any, tmp_path: Any) -> None:
    """``export`` copies an image containerd holds out to an OCI layout; ``import`` of that layout
    into another namespace makes it an image containerd holds there, whole."""
    daemon = await make_containerd()
    image = sample_image(12)
    await import_image(daemon, tmp_path, image, f"{HOSTNAME}/team/app", "1.0")

    def config_for(namespace: str) -> str:
        path = tmp_path / f"{namespace}.toml"
        path.write_text(f'data_dir = "{tmp_path / namespace}"\n[storage]\ndriver = "containerd"\n'
                        f'[storage.containerd]\nsocket = "{daemon.address}"\nnamespace = "{namespace}"\n'
                        f'hostname = "{HOSTNAME}"\n')
        return str(path)

    archive = str(tmp_path / "out.tar")
    exported = await deferToThread(registryd_command, "export", "-c", config_for(NAMESPACE), "-o", archive,
                                   "--image", "team/app:1.0")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    imported = await deferToThread(registryd_command, "import", "-c", config_for("other"), "-i", archive)
    assert imported.returncode == 0, imported.stdout + imported.stderr

    listing = await daemon.ctr("images", "ls", namespace="other")
    assert daemon.image_digests(listing.stdout).get(f"{HOSTNAME}/team/app:1.0") == image.digest, listing.stdout
    held = await daemon.ctr("content", "ls", "-q", namespace="other")
    assert {image.digest, *(blob.digest for blob in image.blobs())} <= set(held.stdout.split())


def test_a_containerd_that_does_not_answer_stops_the_start_with_one_line(tmp_path: Any) -> None:
    config = tmp_path / "registryd.toml"
    missing = tmp_path / "none.sock"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[storage]\ndriver = "containerd"\n'
                      f'[storage.containerd]\nsocket = "{missing}"\ntimeout = 5\n')
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    done = subprocess.run([twistd, "-n", "--pidfile=", "registryd", "-c", str(config),
                           "--listen", "tcp:0:interface=127.0.0.1"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 1, done
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and f"containerd does not answer on {missing}" in lines[0], lines


@pytest_twisted.ensureDeferred
async def test_a_docker_push_is_an_image_containerd_holds(
        reference_upstream: Any, make_containerd: Any, make_registry: Any, make_dockerd: Any) -> None:
    """dockerd pulls an image through registryd (a mirror fill into containerd), then pushes it
    under a local name: containerd holds it as ``registry.example/team/dpush:1``, every blob with it."""
    up = reference_upstream("open")
    image = push_unpackable_image(up, "library/app", "v1", marker="registryd-docker-push", docker=True)
    daemon = await make_containerd()
    hub = UpstreamConfig(namespace="docker.io", url=up.url, default=True)
    registry = make_registry(storage=settings_for(daemon), upstreams=(hub,), local_prefixes=("team",))
    docker = await make_dockerd(mirrors=[registry.url])
    await docker.docker("pull", "app:v1")
    await docker.docker("tag", "app:v1", f"{registry.host}/team/dpush:1")
    pushed = await docker.docker("push", f"{registry.host}/team/dpush:1")
    # dockerd writes the manifest again: its digest is the one the push reports.
    found = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed.stdout)
    assert found, pushed.stdout

    names = await image_names(daemon)
    assert names.get(f"{HOSTNAME}/team/dpush:1") == found[1], names
    wanted = {found[1], image["config"]["digest"], image["layers"][0]["digest"]}
    assert wanted <= await content_digests(daemon)

    # Runnable on the node without a pull: containerd creates a container of it, unpacking the
    # pushed layer from its own content (this daemon has no registry to fetch from).
    await assert_a_container_is_created_from_the_store(daemon, f"{HOSTNAME}/team/dpush:1", image["marker"])


async def assert_a_container_is_created_from_the_store(daemon: ContainerdDaemon, name: str, marker: str) -> None:
    """``ctr containers create`` of ``name`` (as the kubelet's CRI does before it starts a pod's
    container) unpacks it into the native snapshotter: its ``etc/registryd-e2e`` holds ``marker``.
    (``ctr images mount`` of containerd 1.6 ignores ``--snapshotter``, so it cannot be used here.)"""
    await daemon.ctr("containers", "create", "--snapshotter", "native", name, "registryd-e2e", namespace=NAMESPACE)
    try:
        assert marker in daemon.native_snapshot_file("etc/registryd-e2e")
    finally:
        await daemon.ctr("containers", "rm", "registryd-e2e", namespace=NAMESPACE)
