"""End-to-end: skopeo, docker, podman and containerd against a node of two worker processes.

Two ``twistd -n registryd`` nodes with ``[server] workers = 2`` (tests/test_workers.py's
``start_node``), shared by the module's tests: a plain-HTTP one whose upstreams are
Debian's docker-registry (as ``docker.io``, the default, and as ``upstream.test``), and
a TLS one with htpasswd users. The kernel spreads each client's connections over the two
workers; the plain node's responses name their worker (REGISTRYD_WORKER_HEADER), and a
``RequestTap`` in front of it notes which worker answered each request, so a test can
see that the requests of one client (and of one upload session) met both workers.

Pushes: skopeo, podman and docker send each blob as POST, a streamed PATCH
(chunked transfer encoding) and a PUT; ``ctr push`` sends a monolithic PUT
after the POST. Every pull is checked against the digests pushed.

One dockerd (with its own containerd, used for ``ctr`` too) serves the whole module.
Missing tools fail, never skip.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import tempfile
import time
from collections import defaultdict
from typing import Any, Iterator

import attrs
import bcrypt
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from conftest import stop_process
from support.daemons import running_daemon
from support.pki import issue, make_ca
from test_workers import WORKER, Node, start_node
from upstreams import ReferenceUpstream, blob_path, free_port, manifest_path, push_index, shared_pki

from . import oci_layout as oci
from .containerd_daemon import RequestTap, push_unpackable_image
from .docker_daemon import DockerDaemon
from .podman_cli import Podman
from .skopeo_cli import Skopeo
from .test_skopeo import assert_pulled, expected_blobs

pytestmark = pytest.mark.timeout(240)

PASSWORD = "workers-e2e-Secret-5"


@attrs.frozen
class Plain:
    node: Node
    upstream: ReferenceUpstream


@attrs.frozen
class Secure:
    node: Node
    host: str           # 127.0.0.1:<tls port>
    cert_dir: str       # ca.crt, for the clients
    htpasswd: str


def _check_log(directory: Any) -> None:
    for log_file in directory.glob("twistd-*.log"):
        text = log_file.read_text(errors="replace")
        assert "Traceback" not in text and "Unhandled error" not in text, f"{log_file}:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: Any) -> Iterator[ReferenceUpstream]:
    """docker-registry, as reference_upstream("open") starts it, for the whole module."""
    directory = str(tmp_path_factory.mktemp("upstream"))
    os.makedirs(os.path.join(directory, "data"))
    up = ReferenceUpstream("open", directory, free_port(), "http", shared_pki(tmp_path_factory))
    up.start()
    yield up
    up.close()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: Any, upstream: ReferenceUpstream) -> Iterator[Plain]:
    directory = tmp_path_factory.mktemp("plain")
    extra = ('[mirror]\nlocal_prefixes = ["team"]\n'
             f'[[upstream]]\nnamespace = "docker.io"\nurl = "{upstream.url}"\ndefault = true\n'
             f'[[upstream]]\nnamespace = "upstream.test"\nurl = "{upstream.url}"\n')
    node = start_node(directory, extra)
    yield Plain(node, upstream)
    stop_process(node.process)
    _check_log(directory)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: Any) -> Iterator[Secure]:
    directory = tmp_path_factory.mktemp("secure")
    ca = make_ca("workers e2e CA")
    cert, key = issue(ca, "registryd", hosts=["127.0.0.1", "localhost"]).write(str(directory), "server")
    cert_dir = directory / "certs"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(ca.cert_pem())
    htpasswd = directory / "htpasswd"
    htpasswd.write_bytes(b"ci:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)) + b"\n")
    node = start_node(directory, f'[auth]\nhtpasswd = "{htpasswd}"\n', tls=(cert, key))
    yield Secure(node, f"127.0.0.1:{node.tls_port}", str(cert_dir), str(htpasswd))
    stop_process(node.process)
    _check_log(directory)


@pytest.fixture(scope="module")
def dockerd(plain: Plain) -> Iterator[DockerDaemon]:
    """One dockerd for the module, the plain node its registry mirror (and its containerd for ctr)."""
    with running_daemon(lambda directory: DockerDaemon(directory, [f"http://{plain.node.host}"]), "dockerd-") as daemon:
        yield daemon


@pytest.fixture
def tap(plain: Plain) -> Iterator[RequestTap]:
    tap = RequestTap("127.0.0.1", plain.node.port)
    yield tap
    pytest_twisted.blockon(tap.close())


async def together(coroutines: list[Any]) -> list[Any]:
    """Run client commands at once (each in its thread); their results in order."""
    return await gatherResults([Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True)


def _image(prefix: str, sizes: list[int]) -> oci.Image:
    return oci.make_image(oci.sample_layers(prefix, sizes=sizes))


def _workers_by_session(served: list[tuple[str, str, str | None]]) -> dict[str, set[str | None]]:
    """Upload session id -> the workers that answered its requests (PATCH, PUT, GET, HEAD)."""
    sessions: dict[str, set[str | None]] = defaultdict(set)
    for _, target, worker in served:
        match = re.search(r"/blobs/uploads/([^/?]+)", target)
        if match:
            sessions[match.group(1)].add(worker)
    return sessions


def _count(up: ReferenceUpstream, method: str, path: str) -> int:
    return up.count(method, path, settle=0.1)


# -- skopeo: pushes and pulls at once, their sessions over both workers --------------------------

@pytest_twisted.ensureDeferred
async def test_skopeo_pushes_and_pulls_at_once_over_both_workers(plain: Plain, tap: RequestTap,
                                                                 tmp_path: Any) -> None:
    images = [_image(f"skopeo{i}", [300_000 + i, 1_200_000 + i, 2_500_000 + i, 64 * 1024 + i]) for i in range(4)]
    skopeos = [Skopeo(tmp_path / f"skopeo{i}") for i in range(len(images))]
    sources = []
    for i, image in enumerate(images):
        layout = oci.OCILayout(tmp_path / f"src{i}")
        layout.add_image(image, tag="1")
        sources.append(layout.root)
    pushed = await together([
        skopeo.copy_digest(f"oci:{source}:1", f"docker://{tap.host}/team/skopeo{i}:1")
        for i, (skopeo, source) in enumerate(zip(skopeos, sources))])
    assert pushed == [image.digest for image in images]

    served = tap.served()
    assert {worker for _, _, worker in served} == {"0", "1"}, served
    sessions = _workers_by_session(served)
    assert len(sessions) >= 4 * 5, sessions     # four layers and a config per image
    assert all(None not in workers for workers in sessions.values()), sessions

    outs = [tmp_path / f"out{i}" for i in range(len(images))]
    await together([
        skopeo.copy(f"docker://{tap.host}/team/skopeo{i}:1", f"oci:{out}:1")
        for i, (skopeo, out) in enumerate(zip(skopeos, outs))])
    for image, out in zip(images, outs):
        assert_pulled(out, "1", image.digest, expected_blobs(image))
    # Pulled by digest through the other worker too: every byte the same.
    again = tmp_path / "again"
    await skopeos[0].copy(f"docker://{plain.node.host}/team/skopeo3@{images[3].digest}", f"oci:{again}:1")
    assert_pulled(again, "1", images[3].digest, expected_blobs(images[3]))


@pytest_twisted.ensureDeferred
async def test_skopeo_chunks_of_one_session_on_both_workers(plain: Plain, tap: RequestTap, tmp_path: Any) -> None:
    """Many small layers pushed by four skopeos at once: each session's POST, PATCH and PUT take
    whichever pooled connection is free, so some sessions meet both workers; every one commits."""
    images = [_image(f"spread{i}", [20_000 + 7 * j + i for j in range(12)]) for i in range(4)]
    sources = []
    for i, image in enumerate(images):
        layout = oci.OCILayout(tmp_path / f"src{i}")
        layout.add_image(image, tag="1")
        sources.append(layout.root)
    skopeos = [Skopeo(tmp_path / f"skopeo{i}") for i in range(len(images))]
    pushed = await together([
        skopeo.copy_digest(f"oci:{source}:1", f"docker://{tap.host}/team/spread{i}:1")
        for i, (skopeo, source) in enumerate(zip(skopeos, sources))])
    assert pushed == [image.digest for image in images]
    served = tap.served()
    posts = [(target, worker) for method, target, worker in served if method == "POST"]
    puts = [(target, worker) for method, target, worker in served if method == "PUT" and "/uploads/" in target]
    assert len(posts) == len(puts) == 4 * 13
    # Sessions are started (POST) and committed (PUT) on both workers.
    post_workers = {worker for _, worker in posts}
    put_workers = {worker for _, worker in puts}
    assert post_workers == put_workers == {"0", "1"}, served
    # Sessions whose PATCH one worker took and whose PUT the other (about half of them here).
    assert any(workers == {"0", "1"} for workers in _workers_by_session(served).values()), served
    out = tmp_path / "out"
    await skopeos[0].copy(f"docker://{plain.node.host}/team/spread2:1", f"oci:{out}:1")
    assert_pulled(out, "1", images[2].digest, expected_blobs(images[2]))


@pytest_twisted.ensureDeferred
async def test_one_image_pushed_by_six_skopeos_at_once_then_deleted(plain: Plain, tap: RequestTap,
                                                                     tmp_path: Any) -> None:
    """Six pushes of the same blobs at once, into one repository and into three: the same
    digest committed by both workers at the same moment. Then a delete on one worker is a
    404 on the other, and the other tags still pull."""
    image = _image("same", [1_500_000, 2_000_000, 100_000])
    layout = oci.OCILayout(tmp_path / "src")
    layout.add_image(image, tag="1")
    targets = ["team/same:1", "team/same:2", "team/same:3", "team/same-a:1", "team/same-b:1", "team/same-c:1"]
    skopeos = [Skopeo(tmp_path / f"skopeo{i}") for i in range(len(targets))]
    pushed = await together([skopeo.copy_digest(f"oci:{layout.root}:1", f"docker://{tap.host}/{target}")
                             for skopeo, target in zip(skopeos, targets)])
    assert pushed == [image.digest] * len(targets)
    commits = {worker for method, target, worker in tap.served() if method == "PUT" and "/uploads/" in target}
    assert commits == {"0", "1"}
    assert sorted((await skopeos[0].list_tags(f"docker://{plain.node.host}/team/same"))["Tags"]) == ["1", "2", "3"]
    outs = [tmp_path / f"out{i}" for i in range(len(targets))]
    await together([skopeo.copy(f"docker://{tap.host}/{target}", f"oci:{out}:1")
                    for skopeo, target, out in zip(skopeos, targets, outs)])
    for out in outs:
        assert_pulled(out, "1", image.digest, expected_blobs(image))

    await skopeos[0].delete(f"docker://{plain.node.host}/team/same-a@{image.digest}")
    for _ in range(4):      # new connections: both workers are asked
        gone = await skopeos[1].run("inspect", "--tls-verify=false", "--raw",
                                    f"docker://{plain.node.host}/team/same-a:1", check=False)
        assert gone.returncode != 0 and re.search(r"manifest unknown|not found", gone.text, re.I), gone.text
    out = tmp_path / "after"
    await skopeos[2].copy(f"docker://{plain.node.host}/team/same-b:1", f"oci:{out}:1")
    assert_pulled(out, "1", image.digest, expected_blobs(image))


# -- the pull-through cache: many clients at once, one upstream fetch --------------------------

@pytest_twisted.ensureDeferred
async def test_concurrent_skopeo_pulls_through_the_mirror_fetch_once(plain: Plain, tap: RequestTap,
                                                                    tmp_path: Any) -> None:
    up = plain.upstream
    image = push_unpackable_image(up, "lib/cold", "v1", marker="workers-cold", payload_size=3 * 1024 * 1024)
    skopeos = [Skopeo(tmp_path / f"skopeo{i}") for i in range(6)]
    outs = [tmp_path / f"out{i}" for i in range(6)]
    await together([
        skopeo.copy(f"docker://{tap.host}/upstream.test/lib/cold:v1", f"oci:{out}:v1")
        for skopeo, out in zip(skopeos, outs)])
    blobs = {image["config"]["digest"]: image["config"]["data"],
             image["layers"][0]["digest"]: image["layers"][0]["data"],
             image["digest"]: image["manifest"]}
    for out in outs:
        assert_pulled(out, "v1", image["digest"], blobs)
    assert {worker for _, _, worker in tap.served()} == {"0", "1"}
    for digest in (image["config"]["digest"], image["layers"][0]["digest"]):
        assert _count(up, "GET", blob_path("lib/cold", digest)) == 1, digest
    assert _count(up, "GET", manifest_path("lib/cold", "v1")) == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_pulls_of_an_index_fetch_each_manifest_once(plain: Plain, tap: RequestTap,
                                                                    tmp_path: Any) -> None:
    """Five ``skopeo copy --all`` of a cold two-platform index at once: the index by tag, each
    image manifest by digest and each blob are one upstream GET each for the node."""
    up = plain.upstream
    images = [push_unpackable_image(up, "lib/multi", arch, marker=f"multi-{arch}", payload_size=600_000)
              for arch in ("amd64", "arm64")]
    index = push_index(up, "lib/multi", "v1", images)
    outs = [tmp_path / f"out{i}" for i in range(5)]
    await together([
        Skopeo(tmp_path / f"skopeo{i}").copy(f"docker://{tap.host}/upstream.test/lib/multi:v1",
                                             f"oci:{out}:v1", "--all")
        for i, out in enumerate(outs)])
    # skopeo writes the image manifests anew into an OCI layout; the blobs it keeps as they are.
    for out in outs:
        for image in images:
            for blob in [image["config"], *image["layers"]]:
                assert oci.read_blob(out, blob["digest"]) == blob["data"], blob["digest"]
    inspector = Skopeo(tmp_path / "inspector")
    assert await inspector.inspect_raw(f"docker://{plain.node.host}/upstream.test/lib/multi:v1") == index["manifest"]
    for image in images:
        raw = await inspector.inspect_raw(f"docker://{plain.node.host}/upstream.test/lib/multi@{image['digest']}")
        assert raw == image["manifest"]
    assert {worker for _, _, worker in tap.served()} == {"0", "1"}
    assert _count(up, "GET", manifest_path("lib/multi", "v1")) == 1
    for image in images:
        assert _count(up, "GET", manifest_path("lib/multi", image["digest"])) == 1, image["digest"]
        for blob in [image["config"]["digest"], *(layer["digest"] for layer in image["layers"])]:
            assert _count(up, "GET", blob_path("lib/multi", blob)) == 1, blob


@pytest_twisted.ensureDeferred
async def test_skopeo_pushes_mount_blobs_the_node_has(plain: Plain, tap: RequestTap, tmp_path: Any) -> None:
    """A skopeo that pushed an image once mounts its blobs into other repositories
    (POST ?mount=&from=, from its blob-info cache), whichever worker takes each mount."""
    image = _image("mount", [700_000, 300_000])
    layout = oci.OCILayout(tmp_path / "src")
    layout.add_image(image, tag="1")
    skopeo = Skopeo(tmp_path / "skopeo")
    await skopeo.copy(f"oci:{layout.root}:1", f"docker://{tap.host}/team/mount-from:1")
    seen = len(tap.served())
    for i in range(3):
        await skopeo.copy(f"oci:{layout.root}:1", f"docker://{tap.host}/team/mount{i}:1")
    after = tap.served()[seen:]
    mounts = [worker for method, target, worker in after if method == "POST" and "mount=" in target]
    assert len(mounts) == 3 * 2, after        # the two layers (skopeo sends the small config again)
    layers = [layer.blob.digest.replace(":", "%3A") for layer in image.layers]
    assert not any(method == "PUT" and any(d in target for d in layers) for method, target, _ in after), after
    for i in range(3):
        out = tmp_path / f"out{i}"
        await skopeo.copy(f"docker://{plain.node.host}/team/mount{i}:1", f"oci:{out}:1")
        assert_pulled(out, "1", image.digest, expected_blobs(image))


# -- docker -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_docker_pulls_through_registry_mirrors_and_pushes(plain: Plain, dockerd: DockerDaemon) -> None:
    up = plain.upstream
    image = push_unpackable_image(up, "library/dapp", "v1", marker="workers-dockerd", docker=True)
    pulled = await dockerd.docker("pull", "dapp:v1")
    assert f"Digest: {image['digest']}" in pulled.stdout, pulled.stdout
    info = json.loads((await dockerd.docker("image", "inspect", "dapp:v1")).stdout)[0]
    assert info["Id"] == image["config"]["digest"]
    assert dockerd.vfs_file("etc/registryd-e2e") == [image["marker"]]
    for digest in (image["config"]["digest"], image["layers"][0]["digest"]):
        assert _count(up, "GET", blob_path("library/dapp", digest)) == 1, digest

    ref = f"{plain.node.host}/team/dapp:v1"
    await dockerd.docker("tag", "dapp:v1", ref)
    pushed = await dockerd.docker("push", ref)
    # docker writes the manifest anew (its own JSON layout): a digest of its own, the same blobs.
    match = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed.stdout)
    assert match, pushed.stdout
    await dockerd.docker("rmi", ref, "dapp:v1")
    assert dockerd.vfs_file("etc/registryd-e2e") == []
    pulled = await dockerd.docker("pull", ref)
    assert f"Digest: {match.group(1)}" in pulled.stdout, pulled.stdout
    info = json.loads((await dockerd.docker("image", "inspect", ref)).stdout)[0]
    assert info["Id"] == image["config"]["digest"]
    assert info["RootFS"]["Layers"] == [image["layers"][0]["diff_id"]]
    assert dockerd.vfs_file("etc/registryd-e2e") == [image["marker"]]


# -- podman -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_podman_pulls_through_a_registries_conf_mirror_and_pushes(plain: Plain, tmp_path: Any) -> None:
    up = plain.upstream
    image = push_unpackable_image(up, "lib/papp", "v1", marker="workers-podman")
    base = tempfile.mkdtemp(prefix="podman-", dir="/tmp")    # podman wants a short run root
    try:
        podman = Podman(os.path.join(base, "0"), insecure_hosts=(plain.node.host,))
        with open(podman.registries_conf, "a") as f:
            f.write('[[registry]]\nprefix = "upstream.test"\nlocation = "upstream.test"\n\n'
                    f'[[registry.mirror]]\nlocation = "{plain.node.host}/upstream.test"\ninsecure = true\n')
        await podman.run("pull", "upstream.test/lib/papp:v1")
        digest = (await podman.run("image", "inspect", "--format", "{{.Digest}}",
                                   "upstream.test/lib/papp:v1")).stdout.strip()
        assert digest == image["digest"]
        for blob in (image["config"]["digest"], image["layers"][0]["digest"]):
            assert _count(up, "GET", blob_path("lib/papp", blob)) == 1, blob

        digestfile = os.path.join(base, "pushed")
        await podman.run("push", "--digestfile", digestfile, "upstream.test/lib/papp:v1",
                         f"docker://{plain.node.host}/team/papp:v1")
        with open(digestfile) as f:
            pushed = f.read().strip()
        skopeo = Skopeo(tmp_path / "skopeo")
        raw = await skopeo.inspect_raw(f"docker://{plain.node.host}/team/papp:v1")
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed
        assert json.loads(raw)["config"]["digest"] == image["config"]["digest"]
        await podman.run("rmi", "-a", "-f")
        await podman.run("pull", f"{plain.node.host}/team/papp:v1")
        assert (await podman.run("image", "inspect", "--format", "{{.Digest}}",
                                 f"{plain.node.host}/team/papp:v1")).stdout.strip() == pushed
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- containerd ---------------------------------------------------------------------------------

HOSTS_TOML = 'server = "https://upstream.test"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'


@pytest_twisted.ensureDeferred
async def test_ctr_pulls_through_hosts_toml_and_pushes_monolithic(plain: Plain, dockerd: DockerDaemon,
                                                                   tap: RequestTap, tmp_path: Any) -> None:
    up = plain.upstream
    ctrd = dockerd.containerd
    image = push_unpackable_image(up, "lib/capp", "v1", marker="workers-containerd")
    hosts = tmp_path / "hosts.d"
    (hosts / "upstream.test").mkdir(parents=True)
    (hosts / "upstream.test" / "hosts.toml").write_text(HOSTS_TOML.format(mirror=tap.url))
    ref = "upstream.test/lib/capp:v1"
    await ctrd.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native", ref, namespace="w1")
    listing = await ctrd.ctr("images", "ls", namespace="w1")
    assert ctrd.image_digests(listing.stdout).get(ref) == image["digest"], listing.stdout
    asked = [target for _, target, _ in tap.served() if "/v2/lib/capp/" in target]
    assert asked and all("ns=upstream.test" in target for target in asked), asked
    for blob in (image["config"]["digest"], image["layers"][0]["digest"]):
        assert _count(up, "GET", blob_path("lib/capp", blob)) == 1, blob

    # ctr push: a POST, then the whole blob in one PUT (no PATCH), over the tap.
    seen = len(tap.served())
    await ctrd.ctr("images", "push", "--plain-http", f"{tap.host}/team/capp:v1", ref, namespace="w1")
    pushes = tap.served()[seen:]
    assert not any(method == "PATCH" for method, _, _ in pushes), pushes
    assert any(method == "PUT" and "/blobs/uploads/" in target for method, target, _ in pushes), pushes
    await ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "native",
                   f"{plain.node.host}/team/capp:v1", namespace="w2")
    listing = await ctrd.ctr("images", "ls", namespace="w2")
    assert ctrd.image_digests(listing.stdout).get(f"{plain.node.host}/team/capp:v1") == image["digest"]


# -- every client at once ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_docker_podman_ctr_and_skopeo_pull_one_cold_image_at_once(plain: Plain, dockerd: DockerDaemon,
                                                                       tmp_path: Any) -> None:
    """The four clients, each the way it is pointed at a mirror of docker.io, pull one image
    nobody pulled yet, at the same moment: one upstream GET per blob and for the tag."""
    up = plain.upstream
    image = push_unpackable_image(up, "library/every", "v1", marker="workers-every", docker=True,
                                  payload_size=2 * 1024 * 1024)
    base = tempfile.mkdtemp(prefix="podman-", dir="/tmp")
    try:
        podman = Podman(os.path.join(base, "0"))
        with open(podman.registries_conf, "w") as f:
            f.write('[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n'
                    f'[[registry.mirror]]\nlocation = "{plain.node.host}/docker.io"\ninsecure = true\n')
        hosts = tmp_path / "hosts.d"
        (hosts / "docker.io").mkdir(parents=True)
        (hosts / "docker.io" / "hosts.toml").write_text(
            HOSTS_TOML.replace("upstream.test", "registry-1.docker.io").format(mirror=f"http://{plain.node.host}"))
        skopeo = Skopeo(tmp_path / "skopeo")
        await together([
            dockerd.docker("pull", "every:v1"),
            podman.run("pull", "docker.io/library/every:v1"),
            dockerd.containerd.ctr("images", "pull", "--hosts-dir", str(hosts), "--snapshotter", "native",
                                   "docker.io/library/every:v1", namespace="every"),
            skopeo.copy(f"docker://{plain.node.host}/docker.io/library/every:v1", f"oci:{tmp_path / 'out'}:v1"),
        ])
        digest = (await podman.run("image", "inspect", "--format", "{{.Digest}}",
                                   "docker.io/library/every:v1")).stdout.strip()
        assert digest == image["digest"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert dockerd.vfs_file("etc/registryd-e2e").count(image["marker"]) == 1
    listing = await dockerd.containerd.ctr("images", "ls", namespace="every")
    assert dockerd.containerd.image_digests(listing.stdout).get("docker.io/library/every:v1") == image["digest"]
    assert oci.read_blob(tmp_path / "out", image["layers"][0]["digest"]) == image["layers"][0]["data"]
    for blob in (image["config"]["digest"], image["layers"][0]["digest"]):
        assert _count(up, "GET", blob_path("library/every", blob)) == 1, blob
    assert _count(up, "GET", manifest_path("library/every", "v1")) == 1


# -- TLS and htpasswd ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_every_client_over_tls_with_htpasswd_users(secure: Secure, dockerd: DockerDaemon,
                                                         tmp_path: Any) -> None:
    host = secure.host
    creds = f"ci:{PASSWORD}"
    images = [_image(f"tls{i}", [500_000 + i, 1_500_000 + i]) for i in range(3)]
    skopeos = [Skopeo(tmp_path / f"skopeo{i}") for i in range(len(images))]
    tls = ["--dest-cert-dir", secure.cert_dir, "--src-cert-dir", secure.cert_dir]
    sources = []
    for i, image in enumerate(images):
        layout = oci.OCILayout(tmp_path / f"src{i}")
        layout.add_image(image, tag="1")
        sources.append(layout.root)
    # skopeo: three pushes at once, then three pulls at once, checked byte for byte.
    await together([
        skopeo.run("copy", *tls, "--dest-creds", creds, f"oci:{source}:1", f"docker://{host}/team/tls{i}:1")
        for i, (skopeo, source) in enumerate(zip(skopeos, sources))])
    outs = [tmp_path / f"out{i}" for i in range(len(images))]
    await together([
        skopeo.run("copy", *tls, "--src-creds", creds, f"docker://{host}/team/tls{i}:1", f"oci:{out}:1")
        for i, (skopeo, out) in enumerate(zip(skopeos, outs))])
    for image, out in zip(images, outs):
        assert_pulled(out, "1", image.digest, expected_blobs(image))
    refused = await skopeos[0].run("copy", *tls, "--dest-creds", "ci:wrong", f"oci:{sources[0]}:1",
                                   f"docker://{host}/team/wrong:1", check=False)
    assert refused.returncode != 0 and re.search(r"unauthorized|401", refused.text, re.I), refused.text

    # podman: log in, pull what skopeo pushed, push it under another name.
    base = tempfile.mkdtemp(prefix="podman-", dir="/tmp")
    try:
        podman = Podman(os.path.join(base, "0"))
        await podman.run("login", "--cert-dir", secure.cert_dir, "-u", "ci", "--password-stdin", host,
                         stdin=PASSWORD + "\n")
        await podman.run("pull", "--cert-dir", secure.cert_dir, f"{host}/team/tls0:1")
        await podman.run("push", "--cert-dir", secure.cert_dir, f"{host}/team/tls0:1", f"docker://{host}/team/ptls:1")
        raw = await skopeos[0].run("inspect", "--raw", "--cert-dir", secure.cert_dir, "--creds", creds,
                                   f"docker://{host}/team/ptls:1")
        assert json.loads(raw.stdout)["config"]["digest"] == images[0].config.digest
    finally:
        shutil.rmtree(base, ignore_errors=True)

    # docker: 127.0.0.0/8 is an insecure registry to dockerd (TLS without verification).
    login = await dockerd.docker("login", "-u", "ci", "-p", PASSWORD, host)
    assert "Login Succeeded" in login.stdout, login.stdout
    pulled = await dockerd.docker("pull", f"{host}/team/tls1:1")
    assert f"Digest: {images[1].digest}" in pulled.stdout, pulled.stdout
    await dockerd.docker("tag", f"{host}/team/tls1:1", f"{host}/team/dtls:1")
    pushed = await dockerd.docker("push", f"{host}/team/dtls:1")
    assert "digest: sha256:" in pushed.stdout, pushed.stdout
    await dockerd.docker("logout", host)
    refused_docker = await dockerd.docker("push", f"{host}/team/dtls:1", check=False)
    assert refused_docker.returncode != 0

    # containerd: ctr with --user, over TLS with the node's CA.
    hosts = tmp_path / "hosts.d"
    (hosts / host).mkdir(parents=True)
    (hosts / host / "hosts.toml").write_text(
        f'server = "https://{host}"\n\n[host."https://{host}"]\n  capabilities = ["pull", "resolve", "push"]\n'
        f'  ca = "{os.path.join(secure.cert_dir, "ca.crt")}"\n')
    ctrd = dockerd.containerd
    await ctrd.ctr("images", "pull", "--hosts-dir", str(hosts), "--user", creds, "--snapshotter", "native",
                   f"{host}/team/tls2:1", namespace="tls")
    listing = await ctrd.ctr("images", "ls", namespace="tls")
    assert ctrd.image_digests(listing.stdout).get(f"{host}/team/tls2:1") == images[2].digest
    await ctrd.ctr("images", "push", "--hosts-dir", str(hosts), "--user", creds, f"{host}/team/ctls:1",
                   f"{host}/team/tls2:1", namespace="tls")
    raw = await skopeos[0].run("inspect", "--raw", "--cert-dir", secure.cert_dir, "--creds", creds,
                               f"docker://{host}/team/ctls:1")
    assert "sha256:" + hashlib.sha256(raw.stdout).hexdigest() == images[2].digest


def _tls_worker(secure: Secure, user: str, password: str) -> tuple[int, str | None]:
    """(status, worker) of GET /v2/ as ``user`` over a new TLS connection."""
    context = ssl.create_default_context(cafile=os.path.join(secure.cert_dir, "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", secure.node.tls_port, context=context, timeout=30)
    try:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        conn.request("GET", "/v2/", headers={"Authorization": f"Basic {token}"})
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.getheader(WORKER)
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_user_added_to_htpasswd_logs_in_on_every_worker(secure: Secure, tmp_path: Any) -> None:
    """A user added to the htpasswd file (and SIGHUP sent, as an operator does) logs in on both
    workers, and pushes and pulls with skopeo."""
    password = "added-Later-9"
    assert (await deferToThread(_tls_worker, secure, "late", password))[0] == 401
    with open(secure.htpasswd, "ab") as f:
        f.write(b"late:" + bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)) + b"\n")
    secure.node.process.send_signal(signal.SIGHUP)
    accepted: set[str | None] = set()
    deadline = time.monotonic() + 20
    while accepted != {"0", "1"}:
        assert time.monotonic() < deadline, f"only workers {accepted} know the new user"
        status, worker = await deferToThread(_tls_worker, secure, "late", password)
        if status == 200:
            accepted.add(worker)
    image = _image("late", [50_000])
    layout = oci.OCILayout(tmp_path / "src")
    layout.add_image(image, tag="1")
    skopeo = Skopeo(tmp_path / "skopeo")
    tls = ["--dest-cert-dir", secure.cert_dir, "--src-cert-dir", secure.cert_dir]
    await skopeo.run("copy", *tls, "--dest-creds", f"late:{password}", f"oci:{layout.root}:1",
                     f"docker://{secure.host}/team/late:1")
    out = tmp_path / "out"
    await skopeo.run("copy", *tls, "--src-creds", f"late:{password}", f"docker://{secure.host}/team/late:1",
                     f"oci:{out}:1")
    assert_pulled(out, "1", image.digest, expected_blobs(image))
