"""A node of several worker processes ([server] workers = 2): one real twistd on real ports.

Each response names its worker (X-Registryd-Worker, set only when the test
asks for it with REGISTRYD_WORKER_HEADER), so a test can see which process
answered, and which pids the supervisor runs (/proc).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread

from conftest import ROOT, VENV_BIN, stop_process
from support.pki import issue, make_ca
from support.ports import free_port
from support.wait import wait_for_port, wait_until
from fake_upstream import fake_upstream  # noqa: F401  (the fixture)
from syncclient import request, sha256
import test_mirror as mirror_test
from test_reuseport import default_queue, listen_queue

WORKER = "x-registryd-worker"


@attrs.define
class Node:
    process: subprocess.Popen[Any]
    host: str
    data_dir: str
    tls_port: int | None = None

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    def workers(self) -> list[int]:
        """The worker pids the supervisor runs now."""
        try:
            with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as f:
                return sorted(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            return []


def start_node(tmp_path: Any, extra: str = "", workers: int = 2, tls: Any = None, cwd: str = ROOT) -> Node:
    port = free_port()
    data_dir = str(tmp_path / "data")
    listen = [f'"tcp:{port}:interface=127.0.0.1"']
    tls_port = None
    if tls is not None:
        tls_port = free_port()
        listen.append(f'"tls:{tls_port}:interface=127.0.0.1:cert={tls[0]}:key={tls[1]}"')
    config = tmp_path / "registryd.toml"
    config.write_text(f"listen = [{', '.join(listen)}]\ndata_dir = \"{data_dir}\"\n"
                      f"[server]\nworkers = {workers}\nshutdown_timeout = 10\n{extra}")
    log = open(tmp_path / f"twistd-{port}.log", "ab")
    env = {**os.environ, "REGISTRYD_WORKER_HEADER": "1"}
    process = subprocess.Popen([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd", "-c", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    wait_for_port("127.0.0.1", port, process)
    node = Node(process, f"127.0.0.1:{port}", data_dir, tls_port)
    seen_workers(node, workers)
    return node


def seen_workers(node: Node, count: int, timeout: float = 30) -> set[str]:
    """Ask until ``count`` different workers answered."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only workers {seen} answered"
        response = request(node.host, "GET", "/v2/")
        assert response.status in (200, 401)    # 401: users are configured
        seen.add(response.header(WORKER) or "")
    return seen


@pytest.fixture
def node(tmp_path: Any) -> Any:
    running = start_node(tmp_path)
    yield running
    stop_process(running.process)


def until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# --- uploads --------------------------------------------------------------------------------

def test_the_chunks_of_one_upload_land_on_different_workers(node: Node) -> None:
    """A worker that took chunk 1 and sees chunk 3 after another worker took chunk 2 must go
    on from the session's end on disk, not from what it remembered (416 on the old code)."""
    location = request(node.host, "POST", "/v2/spread/chunks/blobs/uploads/").header("Location")
    assert location
    data = b""
    answered: list[str] = []
    for index in range(80):
        chunk = os.urandom(1000 + index)
        response = request(node.host, "PATCH", location, chunk,
                           {"Content-Type": "application/octet-stream",
                            "Content-Range": f"{len(data)}-{len(data) + len(chunk) - 1}"})
        assert response.status == 202, (index, answered, response.body)
        data += chunk
        assert response.header("Range") == f"0-{len(data) - 1}"
        location = response.header("Location") or location
        answered.append(response.header(WORKER) or "")
        # A worker came back to the session after the other one wrote to it.
        if len(answered) >= 3 and any(a == c != b for a, b, c in zip(answered, answered[1:], answered[2:])):
            break
    else:
        pytest.fail(f"the chunks never moved between workers: {answered}")
    digest = sha256(data)
    separator = "&" if "?" in location else "?"
    response = request(node.host, "PUT", f"{location}{separator}digest={digest}")
    assert response.status == 201, response.body
    assert request(node.host, "GET", f"/v2/spread/chunks/blobs/{digest}").body == data


def _lock_holder(path: str) -> int | None:
    """The pid holding an flock on ``path`` (/proc/locks names locks by device and inode)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line has "->" after
            # "1:" (another process's on this machine too): it holds nothing.
            if "FLOCK" in fields and "->" not in fields and int(fields[5].rsplit(":", 1)[1]) == inode:
                return int(fields[4])
    return None


def test_a_worker_killed_during_a_push_is_restarted_and_the_push_goes_on(node: Node) -> None:
    location = request(node.host, "POST", "/v2/killed/push/blobs/uploads/").header("Location") or ""
    upload_id = location.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    data_file = os.path.join(node.data_dir, "uploads", upload_id, "data")
    first = os.urandom(300_000)
    assert request(node.host, "PATCH", location, first, {"Content-Range": f"0-{len(first) - 1}"}).status == 202
    # A second chunk sent half-way: the worker writing it holds the session's lock.
    conn = socket.create_connection(("127.0.0.1", node.port))
    conn.sendall((f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                  f"Content-Range: {len(first)}-{len(first) + 999_999}\r\n\r\n").encode() + os.urandom(200_000))
    until(lambda: _lock_holder(data_file) is not None, 10, "no worker took the chunk")
    victim = _lock_holder(data_file)
    before = node.workers()
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    conn.settimeout(10)
    assert conn.recv(100) == b""    # cut off, never answered
    conn.close()
    until(lambda: len(node.workers()) == 2 and victim not in node.workers(), 15, "the worker was not restarted")
    seen_workers(node, 2)
    # The client asks where the session stands and sends the rest from there.
    status = request(node.host, "GET", location)
    assert status.status == 204
    end = int((status.header("Range") or "0-0").split("-")[1]) + 1
    assert end >= len(first)
    with open(data_file, "rb") as f:
        kept = f.read(end)
    assert kept[:len(first)] == first
    rest = os.urandom(100_000)
    response = request(node.host, "PATCH", location, rest, {"Content-Range": f"{end}-{end + len(rest) - 1}"})
    assert response.status == 202, response.body
    blob = kept + rest
    response = request(node.host, "PUT", f"{location}{'&' if '?' in location else '?'}digest={sha256(blob)}")
    assert response.status == 201, response.body
    assert request(node.host, "GET", f"/v2/killed/push/blobs/{sha256(blob)}").body == blob


# --- the supervisor -------------------------------------------------------------------------

def test_a_killed_worker_is_started_again_and_a_crash_loop_backs_off(node: Node) -> None:
    first = node.workers()
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)
    until(lambda: len(node.workers()) == 2 and first[0] not in node.workers(), 15, "no new worker")
    assert seen_workers(node, 2) == {"0", "1"}
    # Killed again at once: the next start waits (backoff) instead of spinning.
    again = [pid for pid in node.workers() if pid not in first][0]
    os.kill(again, signal.SIGKILL)
    until(lambda: again not in node.workers(), 5, "the worker did not die")
    time.sleep(0.2)
    assert len(node.workers()) == 1, "restarted without a pause"
    until(lambda: len(node.workers()) == 2, 15, "not restarted after the backoff")
    assert seen_workers(node, 2) == {"0", "1"}


def test_sigterm_drains_every_worker_then_the_supervisor_exits(node: Node) -> None:
    data = os.urandom(16 * 1024 * 1024)
    digest = sha256(data)
    response = request(node.host, "POST", f"/v2/shut/down/blobs/uploads/?digest={digest}", data)
    assert response.status == 201
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=60)
    conn.request("GET", f"/v2/shut/down/blobs/{digest}")
    reply = conn.getresponse()
    hasher = hashlib.sha256(reply.read(1024 * 1024))
    workers = node.workers()
    node.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", node.port)) != 0, "still accepting"
    while chunk := reply.read(1024 * 1024):
        hasher.update(chunk)
        time.sleep(0.01)
    conn.close()
    assert "sha256:" + hasher.hexdigest() == digest
    assert node.process.wait(30) in (0, -signal.SIGTERM)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


def _served_certificate(port: int, ca: str) -> tuple[str, str]:
    """(the certificate's common name, the worker) of one new TLS connection."""
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    worker = next(line.split(b":", 1)[1].strip().decode() for line in answer.split(b"\r\n")
                  if line.lower().startswith(WORKER.encode()))
    return subject["commonName"], worker


def test_sighup_reloads_the_certificates_in_every_worker(tmp_path: Any) -> None:
    ca = make_ca()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem())
    cert, key = issue(ca, "old", hosts=["localhost", "127.0.0.1"]).write(str(tmp_path), "live")
    node = start_node(tmp_path, tls=(cert, key))
    try:
        assert node.tls_port is not None
        served = {_served_certificate(node.tls_port, str(ca_file)) for _ in range(6)}
        assert {name for name, _ in served} == {"old"}
        issue(ca, "new", hosts=["localhost", "127.0.0.1"]).write(str(tmp_path), "live")
        node.process.send_signal(signal.SIGHUP)
        workers: set[str] = set()
        deadline = time.monotonic() + 20
        while workers != {"0", "1"}:
            assert time.monotonic() < deadline, f"only workers {workers} answered over TLS"
            name, worker = _served_certificate(node.tls_port, str(ca_file))
            if name == "old":
                time.sleep(0.1)     # the signal is on its way to that worker
                continue
            assert name == "new"
            workers.add(worker)
        # Once reloaded, a worker never serves the old certificate again.
        for _ in range(10):
            assert _served_certificate(node.tls_port, str(ca_file))[0] == "new"
    finally:
        stop_process(node.process)


def test_every_workers_plain_and_tls_sockets_queue_a_burst_of_connections(tmp_path: Any) -> None:
    cert, key = issue(make_ca(), "node", hosts=["127.0.0.1"]).write(str(tmp_path), "node")
    node = start_node(tmp_path, tls=(cert, key))
    try:
        assert node.tls_port is not None
        for port in (int(node.host.rsplit(":", 1)[1]), node.tls_port):
            assert listen_queue(port) == [default_queue()] * 2, port
    finally:
        stop_process(node.process)


def test_one_worker_is_one_process(tmp_path: Any) -> None:
    node = start_node(tmp_path, workers=1)
    try:
        assert node.workers() == []
        assert request(node.host, "GET", "/v2/").header(WORKER) is None
    finally:
        stop_process(node.process)


# --- one upstream fetch per blob across the workers ----------------------------------------

NS = "upstream.test"


class Download(mirror_test.Download):
    """A raw GET that hashes its body as it streams in and notes the worker that answered."""

    @property
    def worker(self) -> str | None:
        return self.headers.get(WORKER)

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.length is not None and self.body == self.length


async def start_download(node: Node, path: str) -> Download:
    from twisted.internet import reactor

    protocol = Download(path)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", node.port), protocol)
    return protocol


async def downloads_on_both_workers(node: Node, path: str, count: int) -> list[Download]:
    """``count`` downloads of ``path`` at once, and more (up to 40) until both workers have some."""
    downloads = [await start_download(node, path) for _ in range(count)]
    while True:
        await wait_until(lambda: all(d.status or d.done.called for d in downloads), 20, "answers")
        if {d.worker for d in downloads} == {"0", "1"}:
            return downloads
        assert len(downloads) < 40, "one worker took every client"
        downloads.append(await start_download(node, path))


def mirror_config(fake: Any) -> str:
    return f'[[upstream]]\nnamespace = "{NS}"\nurl = "{fake.url}"\nidle_timeout = 5\n'


@pytest_twisted.ensureDeferred
async def test_sixteen_clients_on_both_workers_share_one_upstream_get(tmp_path: Any, fake_upstream: Any) -> None:
    blob = os.urandom(2 * 1024 * 1024)
    digest = fake_upstream.add_blob("lib/app", blob)
    upstream_path = fake_upstream.blob_path("lib/app", digest)
    fake_upstream.slow(upstream_path, 32 * 1024, tick=0.01)    # about a second: every client comes during it
    node = await deferToThread(start_node, tmp_path, mirror_config(fake_upstream))
    try:
        path = f"/v2/{NS}/lib/app/blobs/{digest}"
        downloads = await downloads_on_both_workers(node, path, 16)
        await DeferredList([d.done for d in downloads])
        for d in downloads:
            assert (d.status, d.body, d.digest) == (200, len(blob), digest), vars(d)
        assert fake_upstream.count("GET", upstream_path) == 1
        # Cached now, in every worker.
        again = [await start_download(node, path) for _ in range(6)]
        await DeferredList([d.done for d in again])
        assert all(d.digest == digest for d in again)
        assert fake_upstream.count("GET", upstream_path) == 1
    finally:
        await deferToThread(stop_process, node.process)


@pytest_twisted.ensureDeferred
async def test_a_worker_killed_during_a_fill_cuts_every_client_short_and_the_fill_starts_again(
        tmp_path: Any, fake_upstream: Any) -> None:
    blob = os.urandom(4 * 1024 * 1024)
    digest = fake_upstream.add_blob("lib/app", blob)
    upstream_path = fake_upstream.blob_path("lib/app", digest)
    fake_upstream.slow(upstream_path, 16 * 1024, tick=0.01, times=1)
    node = await deferToThread(start_node, tmp_path, mirror_config(fake_upstream))
    try:
        path = f"/v2/{NS}/lib/app/blobs/{digest}"
        downloads = await downloads_on_both_workers(node, path, 10)
        await wait_until(lambda: all(d.body > 0 for d in downloads), 20, "every client gets its first bytes")
        fills = os.path.join(node.data_dir, "tmp", "fills")
        locks = [os.path.join(fills, name) for name in os.listdir(fills) if name.endswith(".lock")]
        assert len(locks) == 1
        filler = _lock_holder(locks[0])
        assert filler in node.workers()
        os.kill(filler, signal.SIGKILL)
        await DeferredList([d.done for d in downloads])
        # Every client of both workers was cut off: none holds a body that looks complete.
        assert not any(d.complete for d in downloads), [vars(d) for d in downloads]
        assert sum(d.body for d in downloads) > 0
        await wait_until(lambda: len(node.workers()) == 2 and filler not in node.workers(), 15, "restart")
        # The next request fetches it again, in full, and it is served from the cache after that.
        retry = [await start_download(node, path) for _ in range(4)]
        await DeferredList([d.done for d in retry])
        for d in retry:
            assert (d.status, d.body, d.digest) == (200, len(blob), digest), vars(d)
        assert fake_upstream.count("GET", upstream_path) == 2
    finally:
        await deferToThread(stop_process, node.process)


# --- collections while every worker takes pushes --------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": LAYER, "digest": d, "size": s} for d, s in layers],
    }).encode()


def _push(host: str, repo: str, data: bytes) -> tuple[str, int]:
    digest = sha256(data)
    response = request(host, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", data)
    assert response.status == 201, response.body
    return digest, len(data)


def _connections_to_both_workers(node: Node) -> dict[str, http.client.HTTPConnection]:
    """One open connection to each worker (asked with GET /v2/, which claims nothing)."""
    found: dict[str, http.client.HTTPConnection] = {}
    for _ in range(100):
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        conn.request("GET", "/v2/")
        reply = conn.getresponse()
        reply.read()
        worker = reply.getheader(WORKER) or ""
        if worker in found:
            conn.close()
        else:
            found[worker] = conn
        if len(found) == 2:
            return found
    pytest.fail(f"only workers {set(found)} answered")


def _ask(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    reply = conn.getresponse()
    return reply.status, reply.read()


def test_a_blob_claimed_in_one_worker_is_kept_by_a_collection_in_the_other(node: Node) -> None:
    """An old unreferenced blob a client just found (HEAD) in worker 0, then a collection in
    worker 1, then the manifest naming it: pushed (on the old code worker 1 removed it: 400)."""
    config = _push(node.host, "gc/race", b'{"architecture": "amd64", "os": "linux"}')
    layer = _push(node.host, "gc/race", os.urandom(5000))
    workers = _connections_to_both_workers(node)
    time.sleep(1.2)     # older than the collection's delay below, and referenced by nothing
    for digest, _size in (config, layer):
        assert _ask(workers["0"], "HEAD", f"/v2/gc/race/blobs/{digest}")[0] == 200
    status, body = _ask(workers["1"], "POST", "/admin/gc?delay=1", b"{}", {"Content-Type": "application/json"})
    assert status == 200, body
    assert json.loads(body)["removed_blobs"] == []
    response = request(node.host, "PUT", "/v2/gc/race/manifests/v1", _manifest(config, [layer]),
                       {"Content-Type": OCI_MANIFEST})
    assert response.status == 201, response.body
    for conn in workers.values():
        conn.close()


def test_collections_during_pushes_on_every_worker_lose_nothing(node: Node) -> None:
    """Pushes on both workers, reusing old unreferenced layers and uploading new ones, while
    collections run over and over: every push succeeds and every blob it names stays."""
    contents = {}
    for data in [b'{"architecture": "amd64", "os": "linux"}', *(os.urandom(3000 + i) for i in range(6))]:
        contents[_push(node.host, "gc/busy", data)] = data
    config, *old = contents
    time.sleep(1.2)
    pushed: list[tuple[str, list[tuple[str, int]]]] = []
    failures: list[str] = []
    done = threading.Event()

    def pusher(worker_index: int) -> None:
        try:
            for n in range(6):
                tag = f"w{worker_index}-{n}"
                conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
                for blob in (config, *old):
                    conn.request("HEAD", f"/v2/gc/busy/blobs/{blob[0]}")
                    reply = conn.getresponse()
                    reply.read()
                    if reply.status == 404:     # collected meanwhile: as a client does, upload it again
                        _push(node.host, "gc/busy", contents[blob])
                    elif reply.status != 200:
                        failures.append(f"{tag}: HEAD {blob[0]} {reply.status}")
                conn.close()
                layers = [*old, _push(node.host, "gc/busy", os.urandom(2000))]
                response = request(node.host, "PUT", f"/v2/gc/busy/manifests/{tag}", _manifest(config, layers),
                                   {"Content-Type": OCI_MANIFEST})
                if response.status != 201:
                    failures.append(f"{tag}: {response.status} {response.body[:200]!r}")
                pushed.append((tag, layers))
        except Exception as e:   # reported below, with the rest
            failures.append(repr(e))

    def collector() -> None:
        while not done.is_set():
            gc = request(node.host, "POST", "/admin/gc?delay=1", b"{}", {"Content-Type": "application/json"})
            if gc.status != 200:
                failures.append(f"gc {gc.status}")

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(4)]
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    gc_thread.join(60)
    assert failures == []
    assert len(pushed) == 24
    for tag, layers in pushed:
        assert request(node.host, "GET", f"/v2/gc/busy/manifests/{tag}", headers={"Accept": OCI_MANIFEST}).status == 200
        for digest, _size in (config, *layers):
            assert request(node.host, "HEAD", f"/v2/gc/busy/blobs/{digest}").status == 200, (tag, digest)


# --- the whole node in /metrics -------------------------------------------------------------

def _base_requests(metrics: bytes) -> float:
    for line in metrics.decode().splitlines():
        if line.startswith("registryd_http_requests_total{") and 'route="base"' in line \
                and 'method="GET"' in line and 'status="200"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_of_any_worker_count_the_requests_of_every_worker(node: Node) -> None:
    workers = _connections_to_both_workers(node)
    for conn in workers.values():
        for _ in range(3):
            assert _ask(conn, "GET", "/v2/")[0] == 200
    counts = {}
    for name, conn in workers.items():
        status, body = _ask(conn, "GET", "/metrics")
        assert status == 200
        counts[name] = _base_requests(body)
    # Each worker answered at least four GET /v2/ here: each sees the other's too.
    assert counts["0"] == counts["1"] >= 8, counts
    for conn in workers.values():
        conn.close()


# --- the login throttle counts per node -----------------------------------------------------

def test_failed_logins_on_both_workers_meet_one_count(tmp_path: Any) -> None:
    """Three free failures per user: two on each worker are four for the node, so the next
    attempt waits (one count per worker would let it through at once)."""
    import base64

    import bcrypt

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(b"alice:" + bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4)) + b"\n")
    node = start_node(tmp_path, f'[auth]\nhtpasswd = "{htpasswd}"\nfailures_before_delay = 3\n')
    try:
        wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
        workers = _connections_to_both_workers(node)
        for conn in workers.values():
            for _ in range(2):
                assert _ask(conn, "GET", "/v2/", headers=wrong)[0] == 401
        for conn in workers.values():
            started = time.monotonic()
            assert _ask(conn, "GET", "/v2/", headers=wrong)[0] == 401
            assert time.monotonic() - started >= 0.9, "the node's count was not met"
            conn.close()
    finally:
        stop_process(node.process)


def test_a_port_in_use_stops_the_supervisor_with_one_line(tmp_path: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "registryd.toml"
        config.write_text("[server]\nworkers = 2\n")
        result = subprocess.run([os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "registryd", "-c", str(config),
                                 "--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path / "data")],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert f"registryd: cannot listen on tcp:{port}:interface=127.0.0.1" in output


def test_each_worker_of_an_s3_node_keeps_its_share_of_the_hot_cache(tmp_path: Any) -> None:
    """One index per folder, as with one process: worker i gets cache_size / N in a folder of its own."""
    import attrs as attrs_

    from registryd.config import Config, StorageSettings
    from registryd.listeners import WorkerRole
    from registryd.tap import own_hot_cache

    config = Config(data_dir=str(tmp_path), storage=StorageSettings(driver="s3", cache_size=1000))
    second = own_hot_cache(config, WorkerRole(1, (), count=2))
    assert (second.storage.cache_dir, second.storage.cache_size) == (str(tmp_path / "cache" / "worker-1"), 500)
    chosen = attrs_.evolve(config, storage=attrs_.evolve(config.storage, cache_dir=str(tmp_path / "hot")))
    first = own_hot_cache(chosen, WorkerRole(0, (), count=2))
    assert first.storage.cache_dir == str(tmp_path / "hot" / "worker-0")


@pytest_twisted.ensureDeferred
async def test_the_partial_file_of_a_worker_killed_mid_fill_is_swept(tmp_path: Any, fake_upstream: Any) -> None:
    """Nobody asks for the blob again: worker 0's timer removes what the dead worker left."""
    blob = os.urandom(4 * 1024 * 1024)
    digest = fake_upstream.add_blob("lib/app", blob)
    fake_upstream.slow(fake_upstream.blob_path("lib/app", digest), 16 * 1024, tick=0.01)
    node = await deferToThread(start_node, tmp_path, "[uploads]\nreap_interval = 1\n" + mirror_config(fake_upstream))
    try:
        download = await start_download(node, f"/v2/{NS}/lib/app/blobs/{digest}")
        await wait_until(lambda: download.body > 0, 20, "the first bytes")
        fills = os.path.join(node.data_dir, "tmp", "fills")
        parts = [name for name in os.listdir(fills) if name.endswith(".part")]
        assert len(parts) == 1
        lock = [os.path.join(fills, name) for name in os.listdir(fills) if name.endswith(".lock")][0]
        filler = _lock_holder(lock)
        assert filler is not None
        os.kill(filler, signal.SIGKILL)
        await download.done
        assert not download.complete
        await wait_until(lambda: not any(name.endswith(".part") for name in os.listdir(fills)), 15,
                         "the dead worker's partial file is swept")
    finally:
        await deferToThread(stop_process, node.process)


def test_a_worker_runs_twistd_with_the_same_options_in_the_foreground_without_the_pid_file() -> None:
    from registryd.supervisor import worker_command

    command = worker_command(["twistd", "--prefix", "registryd", "--pidfile", "/run/registryd.pid", "-l", "registryd",
                              "--logger=registryd.logs.json_lines", "registryd", "-c", "/etc/registryd.toml"])
    assert command[command.index("-n"):] == ["-n", "--pidfile=", "--prefix", "registryd", "-l", "registryd",
                                             "--logger=registryd.logs.json_lines", "registryd", "-c",
                                             "/etc/registryd.toml"]
    short = worker_command(["twistd", "-n", "--pidfile=/run/x.pid", "registryd"])
    assert short[short.index("-n"):] == ["-n", "--pidfile=", "registryd"]
    # The interpreter's own options: the installed registryd, without docstrings (idle RSS).
    assert command[:command.index("-c")] == [sys.executable, "-P", "-OO"]


def test_workers_import_the_installed_registryd_not_one_in_the_working_directory(tmp_path: Any) -> None:
    """Started where a registryd source tree is (a clone after ``pip install .``, whose build-time
    modules only the installed copy has), the workers still run what the supervisor runs."""
    decoy = tmp_path / "clone"
    (decoy / "registryd").mkdir(parents=True)
    (decoy / "registryd" / "__init__.py").write_text('raise ImportError("the registryd of the working directory")\n')
    node = start_node(tmp_path, cwd=str(decoy))    # waits until both workers answered /v2/
    try:
        assert len(seen_workers(node, 2)) == 2
    finally:
        stop_process(node.process)


def test_upload_session_limits_count_the_sessions_of_every_worker(tmp_path: Any) -> None:
    """max_sessions_per_client = 3: two sessions started on each worker are four for the node, so
    the fourth is refused (per worker it was let in); one ended on the other worker makes room."""
    node = start_node(tmp_path, "[uploads]\nmax_sessions_per_client = 3\n")
    try:
        workers = _connections_to_both_workers(node)
        answers = []
        for name in ("0", "1"):
            for _ in range(2):
                workers[name].request("POST", "/v2/quota/app/blobs/uploads/")
                reply = workers[name].getresponse()
                reply.read()
                answers.append((name, reply.status, reply.getheader("Location")))
        assert [status for _, status, _ in answers] == [202, 202, 202, 429], answers
        # The first session (started on worker 0) is cancelled through worker 1: room for one more.
        assert _ask(workers["1"], "DELETE", answers[0][2] or "")[0] == 204
        assert _ask(workers["1"], "POST", "/v2/quota/app/blobs/uploads/")[0] == 202
        assert _ask(workers["0"], "POST", "/v2/quota/app/blobs/uploads/")[0] == 429
        for conn in workers.values():
            conn.close()
    finally:
        stop_process(node.process)
