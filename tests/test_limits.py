"""What one client may hold of a node: memory, disk, connections, upload sessions.

Every test runs a real ``twistd -n registryd`` and speaks HTTP to it over
raw sockets (a body may be started and left unfinished, a head trickled a
byte at a time), so each limit is seen exactly as an abusive client meets it:

* bodies refused by credentials or access rules are answered before they
  are read (nothing in memory, nothing on disk), and manifest bodies in
  memory are bounded all together ([server] max_pending_body_bytes);
* request heads have a deadline ([server] header_timeout); connections are
  capped per client address and in all;
* a full disk is said so (507) before a body is taken or as soon as a
  write fails, and nothing half-written stays behind;
* upload sessions are capped per user or anonymous address, and in all;
* an over-long request line or header block gets 414 or 431.
"""
from __future__ import annotations

import base64
import contextlib
import json
import hashlib
import os
import select
import socket
import subprocess
import time
from typing import Any, Iterator

import bcrypt
import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from conftest import RunningRegistry, free_port, start_twistd, stop_process, wait_for_port
from registryd.config import ConfigError, load_config
from registryd.errors import RegistryError
from registryd.web.limits import RateLimitedLog, SessionQuota
from syncclient import push_blob, request, sha256

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# --- helpers -------------------------------------------------------------------------

@contextlib.contextmanager
def registryd(tmp_path: Any, toml: str = "", data_dir: str | None = None) -> Iterator[RunningRegistry]:
    """A ``twistd -n registryd`` with ``toml`` as its config file, stopped afterwards."""
    config = tmp_path / "registryd.toml"
    config.write_text(toml)
    process, server = start_twistd(data_dir or str(tmp_path / "data"), "--config", str(config))
    try:
        yield server
    finally:
        stop_process(process)


def htpasswd(tmp_path: Any, users: dict[str, str]) -> str:
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                            for user, pw in users.items()))
    return str(path)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def connect(server: RunningRegistry, timeout: float = 5) -> socket.socket:
    host, port = server.host.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


def head(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: registry"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body); raises socket.timeout if none comes."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a whole response: {data!r}")
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float = 5) -> bool:
    """Does the server close the connection within ``timeout`` (reading and dropping what it sends)?"""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise KeyError("VmRSS")


def files_under(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names)


def eventually_empty(path: str, wait: float = 2) -> list[str]:
    """The files under ``path`` once a refused request's clean-up (in the IO pool) had ``wait`` s."""
    deadline = time.monotonic() + wait
    while (found := files_under(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def manifest_for(server: RunningRegistry, repo: str) -> bytes:
    config = push_blob(server.host, repo, b"{}")
    layer = push_blob(server.host, repo, b"layer " + repo.encode())
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                                  "size": 2},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer,
                                   "size": len(b"layer " + repo.encode())}]}).encode()


# --- item 4: memory before authorization --------------------------------------------------

def test_anonymous_manifest_push_is_refused_before_its_body_is_read(tmp_path: Any) -> None:
    """With htpasswd, an anonymous 4 MiB manifest PUT gets its 401 before it sends its body."""
    toml = f'[auth]\nhtpasswd = "{htpasswd(tmp_path, {"alice": "alice-pw"})}"\n'
    with registryd(tmp_path, toml) as server:
        sock = connect(server)
        sock.sendall(head("PUT", "/v2/team/app/manifests/v1",
                          {"Content-Type": OCI_MANIFEST, "Content-Length": str(4 * MiB - 1)}) + b"{" * 1000)
        status, headers, body = read_response(sock, timeout=3)
        assert status == 401 and error_code(body) == "UNAUTHORIZED"
        assert headers["www-authenticate"] == 'Basic realm="registryd"'
        assert headers["connection"] == "close"
        assert closed_by_server(sock)
        # A wrong password is refused before the body too (after the bcrypt check).
        sock = connect(server)
        sock.sendall(head("PUT", "/v2/team/app/manifests/v1",
                          {"Content-Length": str(4 * MiB - 1), **basic("alice", "wrong")}) + b"{")
        status, _, body = read_response(sock, timeout=3)
        assert status == 401 and error_code(body) == "UNAUTHORIZED"


def _hold_manifest_bodies(server: RunningRegistry, count: int, headers: dict[str, str]) -> list[socket.socket]:
    """``count`` connections, each sending all but the last byte of a 4 MiB - 1 manifest, held open."""
    length = 4 * MiB - 1
    sockets = []
    for i in range(count):
        sock = connect(server, timeout=10)
        try:
            sock.sendall(head("PUT", f"/v2/flood/m{i}/manifests/v1",
                              {"Content-Type": OCI_MANIFEST, "Content-Length": str(length), **headers}))
            sock.sendall(b" " * (length - 1))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while still sending: what it was told is checked below
        sockets.append(sock)
    return sockets


def test_held_manifest_bodies_stay_within_the_memory_budget(tmp_path: Any) -> None:
    """100 unfinished 4 MiB manifests: RSS rises by about [server] max_pending_body_bytes, not 400 MiB;
    the bodies past the budget are told 503 (retry) at once."""
    toml = "[server]\nmax_pending_body_bytes = 16777216\n"
    with registryd(tmp_path, toml) as server:
        assert request(server.host, "GET", "/v2/").status == 200
        pid = server.process.pid
        before = rss_kib(pid)
        sockets = _hold_manifest_bodies(server, 100, {})
        time.sleep(0.5)
        rise = (rss_kib(pid) - before) / 1024
        print(f"RSS with 100 held 4 MiB - 1 manifest bodies: {before / 1024:.0f} MiB -> "
              f"{rss_kib(pid) / 1024:.0f} MiB (+{rise:.0f} MiB)")
        statuses = []
        for sock in sockets[4:]:
            status, headers, body = read_response(sock, timeout=5)
            statuses.append(status)
            assert status == 503 and headers["retry-after"] == "1" and error_code(body) == "UNAVAILABLE"
        assert len(statuses) == 96
        assert rise < 16 + 24, f"RSS rose by {rise:.0f} MiB"
        # The four admitted bodies complete normally once their last byte comes.
        for sock in sockets[:4]:
            sock.sendall(b" ")
            status, _, body = read_response(sock, timeout=5)
            assert status == 400 and error_code(body) == "MANIFEST_INVALID"
        for sock in sockets:
            sock.close()
        # Their memory is given back: the budget admits a new one.
        manifest = manifest_for(server, "after/flood")
        reply = request(server.host, "PUT", "/v2/after/flood/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        assert reply.status == 201, reply.body


def test_held_anonymous_bodies_under_htpasswd_cost_no_memory(tmp_path: Any) -> None:
    toml = f'[auth]\nhtpasswd = "{htpasswd(tmp_path, {"alice": "alice-pw"})}"\n'
    with registryd(tmp_path, toml) as server:
        assert request(server.host, "GET", "/v2/").status == 401
        pid = server.process.pid
        before = rss_kib(pid)
        sockets = _hold_manifest_bodies(server, 100, {})
        time.sleep(0.5)
        rise = (rss_kib(pid) - before) / 1024
        print(f"RSS with 100 held anonymous 4 MiB - 1 bodies: +{rise:.0f} MiB")
        assert rise < 24, f"RSS rose by {rise:.0f} MiB"
        for sock in sockets:
            status, _, _ = read_response(sock, timeout=5)
            assert status == 401
            sock.close()


# --- item 6: disk writes before authorization ----------------------------------------------

def test_upload_denied_by_access_rules_is_refused_before_its_body(tmp_path: Any) -> None:
    """No htpasswd, rules that let anonymous only pull: a 200 MB upload is refused before any byte
    of it is written."""
    toml = ('[[access]]\nusers = ["anonymous"]\nrepositories = ["**"]\nactions = ["pull"]\n')
    with registryd(tmp_path, toml) as server:
        digest = "sha256:" + "0" * 64
        for method, path, length in (("POST", f"/v2/team/app/blobs/uploads/?digest={digest}", 200 * 1000 * 1000),
                                     ("PUT", "/v2/team/app/manifests/v1", 4 * MiB - 1)):
            sock = connect(server)
            sock.sendall(head(method, path, {"Content-Length": str(length)}) + b"x" * MiB)
            status, _, body = read_response(sock, timeout=3)
            assert status == 403 and error_code(body) == "DENIED", (method, status, body)
            assert closed_by_server(sock)
        assert files_under(os.path.join(server.data_dir, "uploads")) == []
        assert files_under(os.path.join(server.data_dir, "tmp")) == []
        assert files_under(os.path.join(server.data_dir, "repositories")) == []


# --- item 5: slow heads and connection floods ----------------------------------------------

def test_a_trickled_request_head_gets_408_at_the_header_deadline(tmp_path: Any) -> None:
    with registryd(tmp_path, "[server]\nheader_timeout = 1\n") as server:
        trickler, idle = connect(server), connect(server)
        started = time.monotonic()
        for byte in head("GET", "/v2/_catalog", {"X-Slow": "a" * 50}):
            if select.select([trickler], [], [], 0)[0] or time.monotonic() - started > 3:
                break  # answered (or never will be)
            trickler.send(bytes([byte]))
            time.sleep(0.05)
        status, _, body = read_response(trickler, timeout=3)
        assert status == 408, body
        assert time.monotonic() - started < 2
        assert closed_by_server(trickler)
        # An idle connection is closed quietly at the deadline.
        assert closed_by_server(idle, timeout=3)
        # A keep-alive connection that asks in time goes on serving.
        busy = connect(server)
        for _ in range(3):
            busy.sendall(head("GET", "/v2/"))
            status, _, _ = read_response(busy)
            assert status == 200
            time.sleep(0.5)
    log = (tmp_path / f"twistd-{server.host.rsplit(':', 1)[1]}.log").read_text()
    assert log.count("header_timeout") == 1, "the deadline is logged once a minute, not once a socket"


def test_a_trickled_request_body_gets_408_under_the_body_rate_floor(tmp_path: Any) -> None:
    """A byte now and then would keep an idle timer alive forever: below [server]
    min_body_rate over a header_timeout window, the request is answered 408 and
    dropped, and nothing of its body stays; a body at a decent pace is taken."""
    toml = "[server]\nheader_timeout = 1\nmin_body_rate = 200\n"
    with registryd(tmp_path, toml) as server:
        data = os.urandom(20_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        trickler = connect(server)
        trickler.sendall(head("POST", f"/v2/team/slow/blobs/uploads/?digest={digest}",
                              {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}))
        started = time.monotonic()
        sent = 0
        while not select.select([trickler], [], [], 0)[0] and time.monotonic() - started < 5:
            trickler.send(data[sent:sent + 20])          # 100 bytes/s: half the floor
            sent += 20
            time.sleep(0.2)
        status, _, body = read_response(trickler, timeout=3)
        assert status == 408 and b"slower than 200 bytes/s" in body, body
        assert time.monotonic() - started < 3.5
        assert closed_by_server(trickler)
        assert eventually_empty(os.path.join(server.data_dir, "uploads")) == []
        assert files_under(os.path.join(server.data_dir, "repositories")) == []
        # The same body at a pace above the floor (5 KB/s, over several windows) is stored.
        steady = connect(server)
        steady.sendall(head("POST", f"/v2/team/steady/blobs/uploads/?digest={digest}",
                            {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"}))
        for offset in range(0, len(data), 1000):
            steady.sendall(data[offset:offset + 1000])
            time.sleep(0.2)
        status, _, body = read_response(steady)
        assert status == 201, body
    log = (tmp_path / f"twistd-{server.host.rsplit(':', 1)[1]}.log").read_text()
    assert log.count("min_body_rate") == 1, log


def test_connections_are_capped_per_client_and_in_all(tmp_path: Any) -> None:
    toml = "[server]\nmax_connections = 8\nmax_connections_per_client = 3\nheader_timeout = 30\n"
    with registryd(tmp_path, toml) as server:
        held = [connect(server) for _ in range(3)]
        for sock in held:
            sock.sendall(b"G")  # a client is counted from its first byte
        time.sleep(0.2)
        extra = connect(server)
        extra.sendall(head("GET", "/v2/"))
        status, _, body = read_response(extra)
        assert status == 503 and error_code(body) == "UNAVAILABLE" and b"your address" in body
        assert closed_by_server(extra)
        # One of the three finishes its request and leaves: there is room again.
        held[0].sendall(head("GET", "/v2/")[1:] )
        assert read_response(held[0])[0] == 200
        held[0].close()
        time.sleep(0.2)
        again = connect(server)
        again.sendall(head("GET", "/v2/"))
        assert read_response(again)[0] == 200
        again.close()
        # Silent connections count against the total at once.
        silent = [connect(server) for _ in range(6)]
        time.sleep(0.2)
        refused = connect(server)
        status, _, body = read_response(refused)
        assert status == 503 and b"too many connections" in body
        for sock in silent + held[1:]:
            sock.close()
        time.sleep(0.3)
        assert request(server.host, "GET", "/v2/").status == 200
    log = (tmp_path / f"twistd-{server.host.rsplit(':', 1)[1]}.log").read_text()
    assert "max_connections_per_client" in log and "max_connections limit" in log


# --- item 14: over-long heads ------------------------------------------------------------------

def test_an_overlong_url_gets_414_and_overlong_headers_431(tmp_path: Any) -> None:
    with registryd(tmp_path) as server:
        sock = connect(server)
        sock.sendall(head("GET", "/v2/" + "a" * 17000 + "/tags/list"))
        status, headers, body = read_response(sock)
        assert status == 414 and error_code(body) == "UNSUPPORTED" and headers["connection"] == "close"
        sock = connect(server)
        sock.sendall(head("GET", "/v2/", {f"X-Filler-{i}": "b" * 1000 for i in range(20)}))
        status, headers, body = read_response(sock)
        assert status == 431 and error_code(body) == "UNSUPPORTED"
        sock = connect(server)
        sock.sendall(head("GET", "/v2/", {"X-One-Huge": "c" * 17000}))
        assert read_response(sock)[0] == 431
        assert request(server.host, "GET", "/v2/").status == 200


# --- item 11: a full disk -----------------------------------------------------------------------

def test_upload_past_the_free_space_reserve_is_refused_before_its_body(tmp_path: Any) -> None:
    with registryd(tmp_path, "[server]\nmin_free_bytes = 1000000000000000\n") as server:
        sock = connect(server)
        digest = "sha256:" + "0" * 64
        sock.sendall(head("POST", f"/v2/team/app/blobs/uploads/?digest={digest}",
                          {"Content-Length": str(50 * MiB)}) + b"x" * MiB)
        status, _, body = read_response(sock, timeout=3)
        assert status == 507 and b"storage is full" in body, body
        assert files_under(os.path.join(server.data_dir, "uploads")) == []
        assert files_under(os.path.join(server.data_dir, "tmp")) == []


@pytest.fixture
def small_disk(tmp_path: Any) -> Iterator[str]:
    """An 8 MiB tmpfs (tests run as root)."""
    path = tmp_path / "data"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _chunked(sock: socket.socket, size: int) -> None:
    block = os.urandom(256 * 1024)
    sent = 0
    try:
        while sent < size:
            sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            sent += len(block)
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass


def test_a_disk_that_fills_up_mid_write_answers_507_and_keeps_nothing(tmp_path: Any, small_disk: str) -> None:
    with registryd(tmp_path, "[server]\nmin_free_bytes = 1\n", data_dir=small_disk) as server:
        manifest = manifest_for(server, "team/app")
        digest = "sha256:" + "0" * 64
        # A monolithic upload with no Content-Length, larger than the disk.
        sock = connect(server)
        sock.sendall(head("POST", f"/v2/team/app/blobs/uploads/?digest={digest}",
                          {"Transfer-Encoding": "chunked"}))
        _chunked(sock, 12 * MiB)
        status, _, body = read_response(sock)
        assert status == 507 and b"storage is full" in body, body
        assert eventually_empty(os.path.join(small_disk, "uploads")) == []
        assert files_under(os.path.join(small_disk, "tmp")) == []
        # A chunk of an open session: refused, the session stays as it was acknowledged.
        location = request(server.host, "POST", "/v2/team/app/blobs/uploads/").header("location")
        sock = connect(server)
        sock.sendall(head("PATCH", location, {"Transfer-Encoding": "chunked"}))
        _chunked(sock, 12 * MiB)
        status, _, body = read_response(sock)
        assert status == 507, body
        session = os.path.join(small_disk, "uploads", location.rsplit("/", 1)[1])
        assert os.path.getsize(os.path.join(session, "data")) == 0
        assert request(server.host, "GET", location).header("range") == "0-0"
        # A manifest on a disk with no byte left.
        filler = os.open(os.path.join(small_disk, "filler"), os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(filler, b"\0" * 65536)
        os.close(filler)
        reply = request(server.host, "PUT", "/v2/team/app/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        assert reply.status == 507 and b"storage is full" in reply.body, reply.body
        sessions = sorted(os.listdir(os.path.join(small_disk, "uploads")))
        reply = request(server.host, "POST", "/v2/team/app/blobs/uploads/")
        assert reply.status == 507 and b"storage is full" in reply.body, reply.body
        assert sorted(os.listdir(os.path.join(small_disk, "uploads"))) == sessions
        assert request(server.host, "GET", "/readyz").status == 503
        assert files_under(os.path.join(small_disk, "tmp")) == []
        # Room again: the same push works.
        os.unlink(os.path.join(small_disk, "filler"))
        reply = request(server.host, "PUT", "/v2/team/app/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        assert reply.status == 201, reply.body


# --- item 13: upload sessions ---------------------------------------------------------------

def test_upload_sessions_are_capped_per_client_and_in_all(tmp_path: Any) -> None:
    users = {"alice": "alice-pw", "bob": "bob-pw"}
    toml = (f'[auth]\nhtpasswd = "{htpasswd(tmp_path, users)}"\n'
            '[[access]]\nusers = ["*", "anonymous"]\nrepositories = ["**"]\nactions = ["pull", "push"]\n'
            "[uploads]\nmax_sessions_per_client = 3\nmax_sessions = 5\n")
    with registryd(tmp_path, toml) as server:
        def start(auth: dict[str, str]) -> Any:
            return request(server.host, "POST", "/v2/team/app/blobs/uploads/", headers=auth)

        alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
        sessions = [start(alice).header("location") for _ in range(3)]
        refused = start(alice)
        assert refused.status == 429 and error_code(refused.body) == "TOOMANYREQUESTS", refused.body
        assert b"too many upload sessions" in refused.body
        # Another user has sessions of their own, up to the total.
        assert start(bob).status == 202
        assert start({}).status == 202      # anonymous, counted by address
        refused = start(bob)
        assert refused.status == 429 and b"the registry has too many upload sessions" in refused.body
        # A finished or cancelled session frees its place.
        assert request(server.host, "DELETE", sessions[0], headers=alice).status == 204
        data = b"finished"
        assert request(server.host, "PUT", f"{sessions[1]}?digest={sha256(data)}", data, alice).status == 201
        assert start(alice).status == 202
        assert start(bob).status == 202
        assert start(alice).status == 429
    log = (tmp_path / f"twistd-{server.host.rsplit(':', 1)[1]}.log").read_text()
    assert "max_sessions_per_client" in log and "max_sessions limit" in log


def test_behind_the_proxy_protocol_connections_count_per_real_client(tmp_path: Any) -> None:
    """README: with a ``haproxy:`` listener the per-address cap applies to each client, not the proxy."""
    port = free_port()
    config = tmp_path / "registryd.toml"
    config.write_text("[server]\nmax_connections_per_client = 2\n")
    process, _ = start_twistd(str(tmp_path / "data"), "--config", str(config),
                              "--listen", f"haproxy:tcp:{port}:interface=127.0.0.1")
    try:
        wait_for_port("127.0.0.1", port, process)
        def via_proxy(client: str) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(f"PROXY TCP4 {client} 10.0.0.254 40000 5000\r\n".encode() + b"G")
            return sock

        first = [via_proxy("10.0.0.1") for _ in range(2)]
        time.sleep(0.2)
        third = via_proxy("10.0.0.1")
        third.sendall(head("GET", "/v2/")[1:])
        assert read_response(third)[0] == 503
        other = via_proxy("10.0.0.2")
        other.sendall(head("GET", "/v2/")[1:])
        assert read_response(other)[0] == 200
        for sock in first:
            sock.close()
    finally:
        stop_process(process)


# --- the counters themselves ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_session_quota_frees_places_of_sessions_the_store_no_longer_knows() -> None:
    alive = {("r", "a"), ("r", "b")}
    quota = SessionQuota(3, 2, lambda repo, upload_id: (repo, upload_id) in alive, RateLimitedLog(time.monotonic))
    for upload_id in ("a", "b"):
        await quota.bind(await quota.claim("alice"), "r", upload_id)
    with pytest.raises(RegistryError) as refused:
        await quota.claim("alice")
    assert refused.value.status == 429 and refused.value.code == "TOOMANYREQUESTS"
    ticket = await quota.claim("bob")
    with pytest.raises(RegistryError):
        await quota.claim("carol")        # three in all, one of them not yet created
    quota.drop(ticket)
    alive.discard(("r", "a"))       # committed or cancelled
    await quota.bind(await quota.claim("alice"), "r", "c")
    assert await quota.open_sessions() == 2


@pytest_twisted.ensureDeferred
async def test_the_node_wide_ledger_is_read_and_written_in_the_pool_and_claims_are_judged_one_at_a_time(
        tmp_path: Any, monkeypatch: Any) -> None:
    """SharedSessionQuota (workers) lists, reads and writes <data>/run/sessions in its pool,
    never on the reactor; two claims at once for the last place: one gets it, one a 429."""
    import threading

    from twisted.internet import reactor

    from registryd.threads import BlockingPool
    from registryd.web import shared_sessions

    reactor_thread = threading.get_ident()
    seen_on: set[str] = set()
    real_listdir = os.listdir

    def listdir(path: Any) -> list[str]:
        if str(path).startswith(str(tmp_path)):
            seen_on.add("reactor" if threading.get_ident() == reactor_thread else "pool")
        return real_listdir(path)

    monkeypatch.setattr(shared_sessions.os, "listdir", listdir)
    pool = BlockingPool(reactor, 2, name="test-quota")
    pool.start()
    alive = {("r", "a")}
    quota = shared_sessions.SharedSessionQuota(
        str(tmp_path / "sessions"), 2, 2, lambda repo, upload_id: (repo, upload_id) in alive,
        RateLimitedLog(time.monotonic), pool)
    try:
        await quota.bind(await quota.claim("alice"), "r", "a")
        assert len(real_listdir(tmp_path / "sessions")) == 1 and seen_on == {"pool"}
        outcomes: list[Any] = []
        from twisted.internet.defer import ensureDeferred
        claims = [ensureDeferred(quota.claim("bob")), ensureDeferred(quota.claim("carol"))]   # both at once
        for claim in claims:
            try:
                outcomes.append(await claim)
            except RegistryError as e:
                outcomes.append(e.status)
        assert outcomes[1] == 429 and not isinstance(outcomes[0], int), outcomes
        quota.drop(outcomes[0])
        alive.discard(("r", "a"))     # that session ended: its entry goes once a limit is reached
        await quota.bind(await quota.claim("dave"), "r", "d")
        alive.add(("r", "d"))
        await quota.bind(await quota.claim("erin"), "r", "e")
        assert sorted(n.partition(".")[2] for n in real_listdir(tmp_path / "sessions")) == ["d", "e"]
        assert seen_on == {"pool"}
    finally:
        pool.stop()


def test_limit_warnings_are_rate_limited() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    now = [0.0]
    try:
        warnings = RateLimitedLog(lambda: now[0], interval=60)
        for second in range(0, 130):
            now[0] = float(second)
            warnings.warn("max_connections", "too many")
        warnings.warn("header_timeout", "slow")
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events if e.get("limit_kind")]
    assert texts == ["too many", "too many (59 more since the last report)",
                     "too many (59 more since the last report)", "slow"]


@pytest.mark.parametrize("toml,message", [
    ("[server]\nheader_timeout = 0\n", "'server.header_timeout' must be greater than zero"),
    ("[server]\nmin_body_rate = -5\n", "'server.min_body_rate' must not be negative"),
    ("[server]\nmax_connections = \"many\"\n", "'server.max_connections' must be an integer"),
    ("[uploads]\nmax_sessions_per_client = -1\n", "'uploads.max_sessions_per_client' must be greater than zero"),
    ("[server]\nmax_pending_body_bytes = 1000\n", "'server.max_pending_body_bytes' (1000) must be at least"),
])
def test_bad_limits_are_refused_with_one_line(tmp_path: Any, toml: str, message: str) -> None:
    path = tmp_path / "registryd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)
