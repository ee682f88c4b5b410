"""Scale-out: three ``twistd -n registryd`` nodes on one S3 bucket, behind HAProxy.

Each node is its own process, started with ``--config`` of a TOML file whose
``[storage]`` table puts everything in one bucket of a real radosgw (the
session's ``ceph_s3``; a fresh bucket per test). The nodes share nothing
else: no process memory, no local files (their data directories must hold
nothing but empty ``tmp/`` folders at the end). Debian's HAProxy (``e2e.haproxy``) balances them.

Every node runs with::

    [storage]
    driver = "s3"
    redirect = false            # true on the redirect test's second node

    [storage.s3]
    endpoint = "http://127.0.0.1:PORT"
    bucket = "t0-..."
    region = "us-east-1"
    access_key_id = "..."
    secret_access_key = "..."
    prefix = "site/"
    part_size = 5242880         # the S3 minimum, so uploads cross part boundaries

HAProxy runs the ``haproxy.cfg`` of README.md ("Several nodes on one S3
bucket"), byte for byte but for the ``bind`` and ``server`` addresses
(``e2e/haproxy.py`` extracts it; ``test_the_readme_haproxy_config_is_valid_as_written``
checks it as an operator would copy it). It routes by path::

        balance uri path-only
        hash-type consistent

``balance uri`` hashes the request path without its query string, so every
GET of ``/v2/<namespace>/<repo>/blobs/<digest>`` lands on one node, which
runs one upstream transfer however many clients ask; ``path-only`` ignores
the scheme and authority of an absolute URI (HTTP/2 clients send one), and
``hash-type consistent`` moves only the paths of a node that leaves or comes
back, not everyone's. The key is the whole path: the same digest asked for
under two repository names may land on two nodes (each fills it once). A
blob one node filled is in the bucket as soon as that node has stored it
(just after its clients got the last byte): from then on every other node
serves it without asking the upstream.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

import attrs
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from conftest import ROOT, VENV_BIN, RunningRegistry, free_port, stop_process, wait_for_port
from raw_http import RawGet, open_get
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Client, descriptor, digest_of, encode, with_query
from registryd.digest import parse_digest
from registryd.storage.s3 import S3Client, S3Settings
from registryd.storage.layout import blob_key, repositories_root
from registryd.storage.repositories import Repositories
from registryd.storage.s3.driver import S3Driver
from upstreams import SeededBlob, blob_path, push_blob, push_image, reference_upstream  # noqa: F401

from . import oci_layout as oci
from .haproxy import HAProxy, find_haproxy, make_haproxy, readme_config, with_addresses  # noqa: F401  (fixture)
from .skopeo_cli import Skopeo
from .test_skopeo import assert_pulled, expected_blobs, image_with_layers

pytestmark = pytest.mark.timeout(600)

MiB = 1024 * 1024
PART_SIZE = 5 * MiB
NS = "upstream.test"
ACCEPT = ", ".join([OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])


# -- nodes -----------------------------------------------------------------------

@attrs.define
class Node:
    """One ``twistd -n registryd`` process of the cluster."""

    name: str
    process: subprocess.Popen[Any]
    registry: RunningRegistry
    config_path: str

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def data_dir(self) -> str:
        return self.registry.data_dir

    @property
    def client(self) -> Client:
        return Client(self.url)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to anyone."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)   # a TOML basic string for what we put in here


def node_config(s3: S3Settings, *, redirect: bool = False, upstream_url: str | None = None) -> str:
    """The TOML a node runs with: every node of a cluster gets the same but ``redirect``."""
    lines = ["[storage]", 'driver = "s3"', f"redirect = {_toml(redirect)}", "", "[storage.s3]"]
    for key in ("endpoint", "bucket", "region", "access_key_id", "secret_access_key", "prefix", "part_size"):
        value = getattr(s3, key)
        if value != "":
            lines.append(f"{key} = {_toml(value)}")
    if upstream_url is not None:
        lines += ["", "[[upstream]]", f"namespace = {_toml(NS)}", f"url = {_toml(upstream_url)}"]
    return "\n".join(lines) + "\n"


@pytest_twisted.async_yield_fixture
async def bucket(ceph_s3: Any) -> AsyncIterator[S3Client]:
    """A fresh bucket for this test's nodes (under a prefix, as a shared bucket would be)."""
    client = await ceph_s3.new_bucket(prefix="site/", part_size=PART_SIZE)
    yield client
    await client.close()


@pytest.fixture
def start_nodes(tmp_path: Any) -> Iterator[Callable[..., list[Node]]]:
    """Factory: ``start(s3_settings, names, redirect=(), upstream_url=None) -> [Node]``.

    The nodes start in parallel, each as ``twistd -n registryd --config FILE``
    (what ``conftest.start_twistd`` runs), on a free port, retried if taken.
    At teardown each is stopped (SIGTERM) and its data directory must hold
    nothing but empty ``tmp/`` folders: nothing a client can see may live on
    a node's own disk (a node that was SIGKILLed is let off).
    """
    started: list[Node] = []

    def start_one(name: str, s3: S3Settings, redirect: bool, upstream_url: str | None) -> Node:
        directory = tmp_path / f"node-{name}"
        directory.mkdir()
        config = directory / "registryd.toml"
        config.write_text(node_config(s3, redirect=redirect, upstream_url=upstream_url))
        for attempt in range(3):
            port = free_port()
            log_path = directory / f"twistd-{port}.log"
            # start_twistd's command line, with the process in hand if it does not come up.
            command = [os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd", "--listen",
                       f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(directory / "data"),
                       "--config", str(config)]
            with open(log_path, "ab") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                           stdin=subprocess.DEVNULL)
            try:
                wait_for_port("127.0.0.1", port, process, timeout=60)
            except RuntimeError:
                stop_process(process)
                # Most likely someone took the free port first. Keep this log out of
                # the traceback check, under a name that says what happened.
                log_path.rename(directory / f"failed-start-{port}.log")
                if attempt == 2:
                    raise
                continue
            host = f"127.0.0.1:{port}"
            return Node(name, process, RunningRegistry(f"http://{host}", host, str(directory / "data"),
                                                       process=process), str(config))
        raise AssertionError("unreachable")

    def start(s3: S3Settings, names: tuple[str, ...] = ("a", "b", "c"), redirect: tuple[str, ...] = (),
              upstream_url: str | None = None) -> list[Node]:
        with ThreadPoolExecutor(len(names)) as pool:
            futures = [pool.submit(start_one, name, s3, name in redirect, upstream_url) for name in names]
        # Every node that came up is stopped at teardown, even if another did not.
        started.extend(future.result() for future in futures if future.exception() is None)
        return [future.result() for future in futures]

    yield start
    killed = {node.name for node in started if node.process.poll() == -signal.SIGKILL}
    for node in started:    # all at once: each takes a moment to shut down
        if node.process.poll() is None:
            node.process.terminate()
    leftovers = []
    for node in started:
        # Exactly one SIGTERM each: twistd logs a traceback for a second one
        # (ReactorNotRunning), which the log check would rightly call an error.
        try:
            node.process.wait(30)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
        if node.name not in killed:
            leftovers += local_files(node)
    assert not leftovers, f"nodes kept something on their own disk: {leftovers}"


def local_files(node: Node) -> list[str]:
    """What a node keeps on its own disk beyond empty ``tmp/`` folders: spools and
    fills are gone once their request is, and everything else lives in the bucket."""
    found = [f"{node.name}: {name}" for name in os.listdir(node.data_dir) if name != "tmp"]
    for folder, _, files in os.walk(os.path.join(node.data_dir, "tmp")):
        found += [f"{node.name}: {os.path.relpath(os.path.join(folder, name), node.data_dir)}" for name in files]
    return found


def servers(*nodes: Node) -> dict[str, str]:
    return {node.name: node.host for node in nodes}


# -- HTTP helpers ----------------------------------------------------------------

async def fetch(host: str, path: str, method: str = "GET", headers: dict[str, str] | None = None,
                hasher: Any = None) -> RawGet:
    """A whole request; the body hashed, not kept."""
    protocol = await open_get(host, path, method, headers, hasher)
    return await protocol.done


@pytest.fixture
def http() -> HTTPClient:
    """treq that keeps no connection open after a test (for presigned URLs)."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def seeded(seed: str, size: int) -> bytes:
    return SeededBlob(seed, size).data()


async def push_small_image(client: Client, repo: str, seed: str, layer_size: int = 4000) -> tuple[bytes, str]:
    """A config and one layer as blobs, and the OCI manifest over them (not pushed)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    layer = seeded(f"{seed}/layer", layer_size)
    await client.push_blob(repo, config)
    await client.push_blob(repo, layer)
    manifest = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": descriptor(OCI_CONFIG, config), "layers": [descriptor(OCI_LAYER, layer)]})
    return manifest, digest_of(manifest)


async def put_manifest(client: Client, repo: str, reference: str, manifest: bytes) -> None:
    reply = await client.push_manifest(repo, reference, manifest, OCI_MANIFEST)
    assert reply.status == 201, str(reply)


async def tags_of(client: Client, repo: str) -> list[str] | None:
    reply = await client.get(f"/v2/{repo}/tags/list")
    if reply.status == 404:
        return None
    assert reply.status == 200, str(reply)
    return sorted(reply.json()["tags"] or [])


async def wait_for_fill_commit(bucket: S3Client, remote: str, digest: str, timeout: float = 120) -> None:
    """Until a mirror fill of ``digest`` is in the bucket: the blob and the mirrored repository's link."""
    parsed = parse_digest(digest)
    mirrored = Repositories(S3Driver(bucket), repositories_root(NS))
    deadline = time.monotonic() + timeout
    while not (await bucket.head_object(blob_key(parsed)) is not None
               and await mirrored.has_blob(remote, parsed)):
        assert time.monotonic() < deadline, f"the fill of {digest} never reached the bucket"
        await deferLater(reactor, 0.05, lambda: None)


def retries_field(line: str) -> str:
    """The retries of an httplog line (the last of ``actconn/feconn/beconn/srv_conn/retries``;
    ``+N`` when the request was redispatched to another server), or ""."""
    fields = line.split()
    return fields[10].rsplit("/", 1)[-1] if len(fields) > 10 and fields[10].count("/") == 4 else ""


def served_by(log_text: str, path_part: str) -> set[str]:
    """Servers named in HAProxy's httplog lines for requests whose line contains ``path_part``."""
    names = set()
    for line in log_text.splitlines():
        if path_part in line and " registryd/" in line:
            names.add(line.split(" registryd/", 1)[1].split()[0])
    return names


# -- 0. the README's haproxy.cfg ----------------------------------------------------

def test_the_readme_haproxy_config_is_valid_as_written(tmp_path: Any) -> None:
    """An operator copies README.md's haproxy.cfg: ``haproxy -c`` accepts it without a
    warning, and the tests' copy differs from it in addresses only."""
    config = readme_config()
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run([find_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "WARNING" not in check.stdout + check.stderr, check
    assert "frontend registry" in config and "bind " in config and "option httpchk GET /readyz" in config
    ours = with_addresses(config, "127.0.0.1:1", {"a": "127.0.0.1:2", "b": "127.0.0.1:3", "c": "127.0.0.1:4"})
    changed = [(theirs, mine) for theirs, mine in zip(config.splitlines(), ours.splitlines()) if theirs != mine]
    assert len(ours.splitlines()) == len(config.splitlines()) and len(changed) == 4, changed
    assert all(mine.split()[:-1] == theirs.split()[:-1] or mine.split()[0] == "bind"
               for theirs, mine in changed), changed


# -- 1. skopeo across nodes --------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_skopeo_push_through_one_node_pull_through_another(bucket: S3Client, start_nodes: Any,
                                                                 make_haproxy: Any, tmp_path: Any) -> None:
    """Push through A, pull through B, and through HAProxy (routing by path over A, B, C)."""
    a, b, c = start_nodes(bucket.settings)
    proxy: HAProxy = make_haproxy(servers(a, b, c))
    layout = oci.OCILayout(tmp_path / "src")
    # 6 MiB crosses the 5 MiB part size: a multipart upload on A's side.
    image = layout.add_image(image_with_layers("scale", [1500, 3 * MiB, 700_000, 6 * MiB + 17, 20_000]), tag="v1")
    skopeo = Skopeo(tmp_path / "skopeo", timeout=240)

    pushed = await skopeo.copy_digest(f"oci:{layout.root}:v1", f"docker://{a.host}/scale/app:v1",
                                      "--preserve-digests")
    assert pushed == image.digest

    for target in (b, proxy):
        out = tmp_path / f"out-{target.host.replace(':', '-')}"
        await skopeo.copy(f"docker://{target.host}/scale/app:v1", f"oci:{out}:v1", "--preserve-digests")
        assert_pulled(out, "v1", image.digest, expected_blobs(image))
        raw = await skopeo.inspect_raw(f"docker://{target.host}/scale/app@{image.digest}")
        assert raw == image.manifest.data

    # Routing by path spread skopeo's blob GETs (six digests): more than one node answered them.
    assert len(served_by(proxy.log_tail(200_000), "/v2/scale/app/blobs/")) >= 2, proxy.log_tail()


# -- 2. one upload, chunk by chunk on every node -------------------------------------

@pytest_twisted.ensureDeferred
async def test_chunked_upload_alternates_nodes(bucket: S3Client, start_nodes: Any, make_haproxy: Any) -> None:
    """POST on A, PATCH on B, PATCH on C, final PUT (with the last chunk) on A; then read everywhere."""
    a, b, c = start_nodes(bucket.settings)
    repo = "scale/chunked"
    # 3 + 4 + 3 MiB (and a few odd bytes): the session crosses the 5 MiB part
    # size on C and again at the commit on A, each time on a node that saw none
    # of the earlier bytes (A must verify the digest from the bucket).
    sizes = [3 * MiB, 4 * MiB + 123, 3 * MiB + 8]
    data = seeded("chunked-across-nodes", sum(sizes))
    chunks, offset = [], 0
    for size in sizes:
        chunks.append(data[offset:offset + size])
        offset += size
    digest = digest_of(data)

    location = await a.client.start_upload(repo)
    path = a.client.path_of(location)
    # The new, empty session is known everywhere at once, and described alike.
    fresh = [await node.client.get(path) for node in (a, b, c)]
    assert [reply.status for reply in fresh] == [204] * 3, "\n".join(map(str, fresh))
    assert len({reply.header("Range") for reply in fresh}) == 1, "\n".join(map(str, fresh))
    end = 0
    for node, chunk in ((b, chunks[0]), (c, chunks[1])):
        reply = await node.client.patch(path, chunk, headers={
            "Content-Type": "application/octet-stream", "Content-Range": f"{end}-{end + len(chunk) - 1}"})
        assert reply.status == 202, f"PATCH on {node.name}\n{reply}"
        end += len(chunk)
        assert reply.header("Range") == f"0-{end - 1}", str(reply)
        path = node.client.path_of(reply.location)
        # Every node sees where the session is.
        for other in (a, b, c):
            status = await other.client.get(path)
            assert status.status == 204, f"upload status on {other.name}\n{status}"
            assert status.header("Range") == f"0-{end - 1}", str(status)

    reply = await a.client.put(with_query(path, digest=digest), chunks[2], headers={
        "Content-Type": "application/octet-stream", "Content-Range": f"{end}-{end + len(chunks[2]) - 1}"})
    assert reply.status == 201, str(reply)
    assert reply.header("Docker-Content-Digest") == digest
    for node in (a, b, c):
        assert (await node.client.get(path)).status == 404, f"the session outlived its commit on {node.name}"

    # A session cancelled through one node is gone for the others.
    doomed = b.client.path_of(await b.client.start_upload(repo))
    reply = await b.client.patch(doomed, chunks[0][:1000], headers={
        "Content-Type": "application/octet-stream", "Content-Range": "0-999"})
    assert reply.status == 202, str(reply)
    doomed = b.client.path_of(reply.location)
    assert (await c.client.delete(doomed)).status == 204
    for node in (a, b, c):
        gone = await node.client.get(doomed)
        assert gone.status == 404 and "BLOB_UPLOAD_UNKNOWN" in gone.codes, f"{node.name}\n{gone}"

    # A manifest over it, through C.
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    await c.client.push_blob(repo, config)
    manifest = encode({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
                       "layers": [{"mediaType": OCI_LAYER, "digest": digest, "size": len(data)}]})
    await put_manifest(c.client, repo, "v1", manifest)

    proxy: HAProxy = make_haproxy(servers(a, b, c))
    for client in (a.client, b.client, c.client, Client(proxy.url), Client(proxy.url), Client(proxy.url)):
        blob = await client.get(f"/v2/{repo}/blobs/{digest}")
        assert blob.status == 200 and blob.header("Docker-Content-Digest") == digest, str(blob)
        assert blob.body == data, f"{client.base_url} served other bytes"
        head = await client.head(f"/v2/{repo}/blobs/{digest}")
        assert head.status == 200 and head.header("Content-Length") == str(len(data)), str(head)
        middle = await client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={5 * MiB - 3}-{5 * MiB + 2}"})
        assert middle.status == 206 and middle.body == data[5 * MiB - 3:5 * MiB + 3], str(middle)
        got = await client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": ACCEPT})
        assert got.status == 200 and got.body == manifest, str(got)
        assert got.header("Docker-Content-Digest") == digest_of(manifest)


# -- 3. tags and deletes are seen by every node at once --------------------------------

@pytest_twisted.ensureDeferred
async def test_tags_and_deletes_are_seen_by_every_node_at_once(bucket: S3Client, start_nodes: Any) -> None:
    a, b, c = start_nodes(bucket.settings)
    nodes = (a, b, c)
    repo = "scale/tags"
    first, first_digest = await push_small_image(a.client, repo, "first")
    second, second_digest = await push_small_image(b.client, repo, "second")

    async def everyone_sees(reference: str, body: bytes | None) -> None:
        for node in nodes:
            reply = await node.client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT})
            head = await node.client.head(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT})
            if body is None:
                assert reply.status == 404 and "MANIFEST_UNKNOWN" in reply.codes, f"{node.name}\n{reply}"
                assert head.status == 404, f"{node.name}\n{head}"
            else:
                assert reply.status == 200 and reply.body == body, f"{node.name}\n{reply}"
                assert reply.header("Docker-Content-Digest") == digest_of(body)
                assert head.status == 200 and head.header("Docker-Content-Digest") == digest_of(body), str(head)

    async def everyone_lists(expected: list[str] | None) -> None:
        for node in nodes:
            assert await tags_of(node.client, repo) == expected, f"tags on {node.name}"

    # Read on every node first, so a node that cached anything would show it below.
    # (The repository exists since its blobs do, without tags.)
    await everyone_lists([])
    await everyone_sees("v1", None)

    await put_manifest(a.client, repo, "v1", first)
    await everyone_lists(["v1"])
    await everyone_sees("v1", first)
    await everyone_sees(first_digest, first)

    await put_manifest(b.client, repo, "v2", second)
    await everyone_lists(["v1", "v2"])
    await everyone_sees("v2", second)

    # v1 moves to the second image, through the third node.
    await put_manifest(c.client, repo, "v1", second)
    await everyone_sees("v1", second)
    await everyone_sees(first_digest, first)    # untagged, still there by digest

    # Deleting the second image through A removes it, and both its tags, for everyone.
    reply = await a.client.delete(f"/v2/{repo}/manifests/{second_digest}")
    assert reply.status == 202, str(reply)
    await everyone_sees(second_digest, None)
    await everyone_sees("v1", None)
    await everyone_sees("v2", None)
    await everyone_lists([])
    await everyone_sees(first_digest, first)

    # A tag deleted through C (by tag) is gone for A and B.
    await put_manifest(b.client, repo, "v3", first)
    await everyone_lists(["v3"])
    reply = await c.client.delete(f"/v2/{repo}/manifests/v3")
    assert reply.status == 202, str(reply)
    await everyone_sees("v3", None)
    await everyone_lists([])
    await everyone_sees(first_digest, first)


# -- 4. a node dies in the middle of a pull ---------------------------------------------

@pytest_twisted.ensureDeferred
async def test_node_killed_mid_pull_client_retry_succeeds(bucket: S3Client, start_nodes: Any,
                                                          make_haproxy: Any) -> None:
    """SIGKILL the node that is streaming a 64 MiB blob to a slow client behind
    HAProxy; the client's retry (a Range request for the rest) succeeds through
    another node, and every byte verifies.

    The path hashes to the dead node, which HAProxy believes alive until two
    health checks failed (about a second): ``option redispatch 1`` must carry
    the requests that meet it meanwhile.
    """
    a, b, c = start_nodes(bucket.settings)
    repo = "scale/big"
    blob = SeededBlob("killed-mid-pull", 64 * MiB)
    await deferToThread(push_blob, a.registry, repo, blob)
    proxy: HAProxy = make_haproxy(servers(a, b, c))
    path = f"/v2/{repo}/blobs/{blob.digest}"
    nodes = {node.name: node for node in (a, b, c)}

    hasher = hashlib.sha256()
    slow = await open_get(proxy.host, path, hasher=hasher, pause_after=4 * MiB)
    await slow.paused
    assert slow.status == 200 and slow.length == blob.size, str(slow)
    victim = nodes[slow.headers["x-served-by"]]
    victim.kill()
    slow.resume()
    await slow.done
    assert not slow.complete, f"the body should have been cut when {victim.name} died: {slow}"
    received = slow.received
    assert 4 * MiB <= received < blob.size

    # The client resumes where it was cut off (as containerd and skopeo do); HAProxy
    # may first pick the dead node (it looks alive for a few seconds more), then redispatches.
    rest = await fetch(proxy.host, path, headers={"Range": f"bytes={received}-"}, hasher=hasher)
    assert rest.status == 206, str(rest)
    assert rest.headers["content-range"] == f"bytes {received}-{blob.size - 1}/{blob.size}"
    assert rest.complete and received + rest.received == blob.size
    assert hasher.hexdigest() == blob.digest.split(":")[1], "the resumed download does not verify"
    assert rest.headers["x-served-by"] != victim.name

    # More requests right away: while the dead node looks alive they hash to it, and every one succeeds elsewhere.
    log_before = len(proxy.log_tail(1 << 30))
    for _ in range(6):
        head = await fetch(proxy.host, path, method="HEAD")
        assert head.status == 200 and head.length == blob.size, str(head)
        assert head.headers["x-served-by"] != victim.name
        piece = await fetch(proxy.host, path, headers={"Range": "bytes=0-1048575"})
        assert piece.status == 206 and piece.received == MiB, str(piece)
        assert piece.headers["x-served-by"] != victim.name
    if proxy.server_states()[victim.name]["status"].startswith("UP"):
        # HAProxy listed the dead node all along: the path hashed to it for
        # those 12 requests, and each of them was redispatched.
        redispatched = [line for line in proxy.log_tail(1 << 30)[log_before:].splitlines()
                        if retries_field(line).startswith("+")]
        assert redispatched, proxy.log_tail()
    proxy.wait_down(victim.name)

    # A whole fresh download through the survivors verifies too.
    whole = await fetch(proxy.host, path)
    assert whole.status == 200 and whole.complete and whole.digest == blob.digest, str(whole)


# -- 5. pull-through coalescing across nodes ----------------------------------------------

@pytest_twisted.ensureDeferred
async def test_pull_through_coalesces_across_nodes(bucket: S3Client, start_nodes: Any, make_haproxy: Any,
                                                   reference_upstream: Any) -> None:
    """12 concurrent cold GETs of one blob through HAProxy (routing by path) make
    one upstream GET; then another node serves it from the bucket, asking no one."""
    up = reference_upstream("open")
    image = await deferToThread(push_image, up, "lib/big", "v1", [32 * MiB])
    layer = image["layers"][0]
    digest, size = layer["digest"], layer["size"]
    a, b, c = start_nodes(bucket.settings, upstream_url=up.url)
    nodes = {node.name: node for node in (a, b, c)}
    proxy: HAProxy = make_haproxy(servers(a, b, c))
    path = f"/v2/{NS}/lib/big/blobs/{digest}"
    upstream_blob = blob_path("lib/big", digest)
    pushed = await up.acount(None, upstream_blob)     # push_image's own HEAD and upload
    assert await up.acount("GET", upstream_blob) == 0

    downloads = await gatherResults([Deferred.fromCoroutine(fetch(proxy.host, path)) for _ in range(12)])
    for download in downloads:
        assert download.status == 200 and download.complete, str(download)
        assert download.digest == digest, str(download)
    serving = {download.headers["x-served-by"] for download in downloads}
    assert len(serving) == 1, f"HAProxy spread one path over {serving}"
    assert await up.acount("GET", upstream_blob) == 1, up.requests()
    before = await up.acount(None, upstream_blob)
    assert before == pushed + 1, f"the nodes asked the upstream more than one GET: {up.requests()}"

    # The clients had every byte as soon as the upstream sent it; the serving node
    # puts the blob into the bucket after that. Wait for it there (blob and mirror link).
    await wait_for_fill_commit(bucket, "lib/big", digest)

    # Another node, by its own port: the blob is in the bucket, the upstream is not asked.
    for other in sorted(set(nodes) - serving):
        node = nodes[other]
        got = await fetch(node.host, path)
        assert got.status == 200 and got.complete and got.digest == digest, f"{other}: {got}"
        head = await fetch(node.host, path, method="HEAD")
        assert head.status == 200 and head.length == size, f"{other}: {head}"
    assert await up.acount(None, upstream_blob) == before, up.requests()


# -- 6. presigned redirects -----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_redirect_node_hands_out_presigned_urls(bucket: S3Client, ceph_s3: Any, start_nodes: Any,
                                                      http: HTTPClient, tmp_path: Any) -> None:
    """``[storage] redirect = true`` on B: blob GETs answer 307 to radosgw; HEAD answers 200."""
    a, b = start_nodes(bucket.settings, names=("a", "b"), redirect=("b",))
    repo = "scale/redirect"
    data = seeded("redirected", 6 * MiB + 5)
    digest = await a.client.push_blob(repo, data)
    path = f"/v2/{repo}/blobs/{digest}"

    plain = await fetch(a.host, path)
    assert plain.status == 200 and plain.digest == digest, str(plain)

    reply = await b.client.get(path)
    assert reply.status == 307, str(reply)
    assert reply.body == b""
    location = reply.location
    assert location.startswith(ceph_s3.endpoint + "/"), location
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=600" in location, location
    presigned = await http.get(location)
    assert presigned.code == 200
    assert digest_of(await treq.content(presigned)) == digest

    head = await b.client.head(path)
    assert head.status == 200, str(head)
    assert head.header("Content-Length") == str(len(data))
    assert head.header("Docker-Content-Digest") == digest

    # A ranged GET is redirected too; the client asks the object store for its range.
    ranged = await b.client.get(path, headers={"Range": "bytes=100-199"})
    assert ranged.status == 307, str(ranged)
    piece = await http.get(ranged.location, headers=Headers({"Range": ["bytes=100-199"]}))
    assert piece.code == 206
    assert await treq.content(piece) == data[100:200]

    # curl -L follows the redirect to the same bytes.
    out = tmp_path / "curl.out"
    result = await deferToThread(subprocess.run, ["curl", "-sSfL", "--max-time", "120", "-o", str(out),
                                                  f"{b.url}{path}"], capture_output=True, timeout=150)
    assert result.returncode == 0, result.stderr
    assert digest_of(out.read_bytes()) == digest

    # So does a real client pulling a whole image.
    manifest, manifest_digest = await push_small_image(a.client, repo, "redirect-image")
    await put_manifest(a.client, repo, "v1", manifest)
    skopeo = Skopeo(tmp_path / "skopeo", timeout=240)
    await skopeo.copy(f"docker://{b.host}/{repo}:v1", f"oci:{tmp_path / 'pulled'}:v1", "--preserve-digests")
    assert oci.resolve_tag(tmp_path / "pulled", "v1")["digest"] == manifest_digest
    for descriptor_ in json.loads(manifest)["layers"] + [json.loads(manifest)["config"]]:
        blob_file = tmp_path / "pulled" / "blobs" / "sha256" / descriptor_["digest"].split(":")[1]
        assert digest_of(blob_file.read_bytes()) == descriptor_["digest"]


# -- 7. the object store fails under the cluster ------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_frozen_store_takes_every_node_out_of_the_balancer(bucket: S3Client, ceph_s3: Any,
                                                                   start_nodes: Any, make_haproxy: Any) -> None:
    """radosgw frozen: every node's /readyz fails within the health checks' time, so HAProxy
    sends no request to a node that cannot serve; once radosgw is back, they all return."""
    a, b, c = start_nodes(bucket.settings)
    log_path = os.path.join(os.path.dirname(a.data_dir), f"twistd-{a.host.split(':')[1]}.log")
    serving = f"registryd serving s3://{bucket.settings.bucket}/site/"   # the bucket, not its data_dir
    for _ in range(100):
        with open(log_path) as f:
            if serving in f.read():
                break
        await deferLater(reactor, 0.05, lambda: None)
    else:
        raise AssertionError(f"{log_path} never said {serving!r}")
    proxy: HAProxy = make_haproxy(servers(a, b, c))
    repo = "scale/outage"
    data = seeded("outage", 100_000)
    digest = await Client(proxy.url).push_blob(repo, data)
    with ceph_s3.outage("freeze"):
        began = time.monotonic()
        await deferToThread(proxy.wait_until, lambda states: len(states) == 3 and all(
            row["status"] == "DOWN" for row in states.values()), "every node DOWN", 15)
        took = time.monotonic() - began
        reply = await a.client.get("/readyz")
        assert reply.status == 503 and "within 3s" in reply.json()["reason"], str(reply)
    assert took < 5, f"HAProxy took {took:.1f}s to take the nodes out"
    await deferToThread(proxy.wait_all_up)
    got = await Client(proxy.url).get(f"/v2/{repo}/blobs/{digest}")
    assert got.status == 200 and got.body == data, str(got)
