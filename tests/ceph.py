"""A real S3 endpoint for the tests: a one-node Ceph with radosgw on loopback.

``scripts/ceph/start-ceph.sh`` (1 mon, 1 mgr, 1 RAM-backed memstore OSD,
radosgw; about 15 s) runs once per session on free ports, in a temporary
directory; at the end only the daemons it recorded are stopped. conftest.py
imports the fixture once, so every module shares that one cluster (a test
module importing it again would get a cluster of its own)::

    @pytest_twisted.ensureDeferred
    async def test_something(ceph_s3):
        client = await ceph_s3.new_bucket()     # an S3Client on a fresh bucket
        ...
        await client.close()

Missing Ceph packages fail the test (with the apt-get line to run); they
never skip it. Everything but ``new_bucket`` blocks.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Iterator

import attrs
import pytest

from registryd.storage.s3 import S3Client, S3Settings
from support.ports import free_port

#: The repository's own one-node Ceph launcher (scripts/ceph).
S3_TOOLS_DIR = os.environ.get("REGISTRYD_S3_TOOLS") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "ceph"))
START = os.path.join(S3_TOOLS_DIR, "start-ceph.sh")
#: What start-ceph.sh runs, and the Debian package that has it.
TOOLS = {
    "ceph-mon": "ceph-mon", "ceph-mgr": "ceph-mgr", "ceph-osd": "ceph-osd", "radosgw": "radosgw",
    "radosgw-admin": "ceph-common", "ceph": "ceph-common", "ceph-authtool": "ceph-common",
    "monmaptool": "ceph-base", "uuidgen": "uuid-runtime", "curl": "curl",
}
PACKAGES = "ceph-mon ceph-mgr ceph-osd radosgw ceph-common uuid-runtime curl"
#: The S3 user start-ceph.sh creates (see scripts/ceph/README.md).
ACCESS_KEY = "CIACCESSKEY0000000"
SECRET_KEY = "cisecretkey0000000000000000000000000000"
REGION = "us-east-1"
#: Unix socket paths (the daemons' admin sockets) must stay below 108 bytes.
MAX_DIR_LENGTH = 60
#: start-ceph.sh binds the OSD and mgr within [PMIN, PMIN + 100).
PORT_RANGE = 100

_bucket_numbers = itertools.count()


@attrs.define
class CephS3:
    """The running cluster's S3 endpoint and credentials."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    directory: str
    start_seconds: float

    def settings(self, bucket: str, **overrides: Any) -> S3Settings:
        """S3Settings for ``bucket`` on this endpoint (path-style, the test user)."""
        values: dict[str, Any] = {"endpoint": self.endpoint, "bucket": bucket, "access_key_id": self.access_key,
                                  "secret_access_key": self.secret_key, "region": self.region,
                                  "idle_timeout": 30, "request_timeout": 30}
        values.update(overrides)
        return S3Settings(**values)

    # -- outages: radosgw frozen or killed, then brought back --------------------------

    @property
    def _pid_file(self) -> str:
        return os.path.join(self.directory, "rgw.pid")

    def radosgw_pid(self) -> int:
        with open(self._pid_file) as f:
            return int(f.read().strip())

    def freeze(self) -> None:
        """SIGSTOP radosgw: it keeps its port and accepts connections, but answers nothing.

        Returns once every thread of it is stopped: the kernel wakes one thread to begin
        the stop, and until that thread has run the others go on serving (a request sent
        right after the signal was answered so, once, on a busy machine).
        """
        pid = self.radosgw_pid()
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while (running := _running_threads(pid)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"radosgw {pid} did not stop: threads {running} still run")
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL radosgw: connections are reset, new ones refused (``restore`` starts it again)."""
        pid = self.radosgw_pid()
        os.kill(pid, signal.SIGKILL)
        for process in [p for p in _children if p.pid == pid]:
            process.wait(10)
            _children.remove(process)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def restore(self) -> None:
        """Thaw a frozen radosgw or start a killed one again; returns once it answers."""
        pid = self.radosgw_pid()
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)
        else:
            port = self.endpoint.rsplit(":", 1)[1]
            _restart_rgw_nodelay({"CEPH_DIR": self.directory, "RGW_PORT": port})
        if not _wait_answers(self.endpoint):
            raise RuntimeError(f"radosgw did not come back on {self.endpoint}")

    @contextlib.contextmanager
    def outage(self, kind: str) -> Iterator[None]:
        """``with ceph_s3.outage("freeze" | "kill"):`` radosgw is down inside, and back
        (answering) after, whatever happened inside: the other tests share it."""
        if kind not in ("freeze", "kill"):
            raise ValueError(kind)
        try:
            self.freeze() if kind == "freeze" else self.kill()
            yield
        finally:
            self.restore()

    async def new_bucket(self, **overrides: Any) -> S3Client:
        """A client on a new, uniquely named bucket (created through the client).

        ``overrides`` go to S3Settings (``prefix``, ``part_size``, ...). Close
        the client when done.
        """
        from twisted.internet import reactor

        bucket = f"t{next(_bucket_numbers)}-{uuid.uuid4().hex[:12]}"
        client = S3Client(self.settings(bucket, **overrides), reactor)
        await client.create_bucket()
        return client


def _missing_tools() -> list[str]:
    return [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_range() -> int:
    """The first of PORT_RANGE free ports, below the kernel's ephemeral range
    (so that outgoing connections never take one of them later)."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - PORT_RANGE)
        if all(_port_is_free(port) for port in range(base, base + PORT_RANGE)):
            return base
    raise RuntimeError(f"no {PORT_RANGE} consecutive free ports found for the Ceph daemons")


def _short_directory(tmp_path_factory: Any) -> str:
    directory = str(tmp_path_factory.mktemp("ceph"))
    if len(directory) > MAX_DIR_LENGTH:
        directory = tempfile.mkdtemp(prefix="registryd-ceph-")
    return directory


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _start(directory: str, attempt: int) -> tuple[dict[str, str], str | None, str]:
    """Run start-ceph.sh once; returns (env, error or None, endpoint)."""
    rgw_port = free_port()
    env = {**os.environ, "CEPH_DIR": os.path.join(directory, f"cluster{attempt}"), "RGW_PORT": str(rgw_port),
           "MON1": str(free_port()), "MON2": str(free_port()), "PMIN": str(_free_range())}
    endpoint = f"http://127.0.0.1:{rgw_port}"
    log_path = os.path.join(directory, f"start{attempt}.log")
    with open(log_path, "wb") as log:
        try:
            result = subprocess.run(["bash", START], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=240)
        except subprocess.TimeoutExpired:
            return env, f"start-ceph.sh did not finish in 240 s:\n{_tail(log_path)}", endpoint
    if result.returncode != 0:
        return env, f"start-ceph.sh exited with {result.returncode}:\n{_tail(log_path)}", endpoint
    if not _wait_answers(endpoint):
        rgw_log = os.path.join(env["CEPH_DIR"], "log", "client.rgw.a.log")
        return env, f"radosgw did not answer on {endpoint}:\n{_tail(rgw_log)}", endpoint
    _shorten_watch_timeout(env)
    _restart_rgw_nodelay(env)
    if not _wait_answers(endpoint):
        return env, f"radosgw with tcp_nodelay=1 did not answer on {endpoint}:\n" \
                    f"{_tail(os.path.join(env['CEPH_DIR'], 'log', 'rgw-nodelay.out'))}", endpoint
    return env, None, endpoint


def _wait_answers(endpoint: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not _answers(endpoint):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _shorten_watch_timeout(env: dict[str, str]) -> None:
    """Let the OSD forget a killed radosgw's watches after 3 s, not 30.

    radosgw watches its metadata objects; until a dead instance's watches
    time out, every bucket creation waits for it (25 s after a SIGKILL,
    measured), which the outage tests would pass on to every later test.
    Set before radosgw restarts below, so its watches get the short timeout.
    """
    subprocess.run(["ceph", "-c", os.path.join(env["CEPH_DIR"], "ceph.conf"), "config", "set", "osd",
                    "osd_client_watch_timeout", "3"], check=True, capture_output=True, timeout=60)


def _restart_rgw_nodelay(env: dict[str, str]) -> None:
    """Run radosgw again with ``tcp_nodelay=1`` on its beast frontend.

    Ceph 16 leaves Nagle on, so every small response on a kept-alive
    connection waits about 40 ms for the client's delayed ACK: thousands of
    S3 calls in the suite would spend minutes asleep. The new PID goes where
    start-ceph.sh recorded the old one, so only what it started is stopped.
    """
    directory = env["CEPH_DIR"]
    pid_file = os.path.join(directory, "rgw.pid")
    with open(pid_file) as f:
        old = int(f.read().strip())
    if _alive(old):
        os.kill(old, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _alive(old) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(old):
        os.kill(old, signal.SIGKILL)
    with open(os.path.join(directory, "log", "rgw-nodelay.out"), "ab") as log:
        process = subprocess.Popen(
            ["radosgw", "-c", os.path.join(directory, "ceph.conf"), "-n", "client.rgw.a", "-f",
             "--rgw_frontends", f"beast endpoint=127.0.0.1:{env['RGW_PORT']} tcp_nodelay=1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _children.append(process)
    with open(pid_file, "w") as f:
        f.write(str(process.pid))


#: radosgw processes this module started itself, reaped at the end.
_children: list[subprocess.Popen[bytes]] = []


def _state(stat_path: str) -> str | None:
    """The state letter in a /proc .../stat file (R, S, D, T, Z...), or None once it is gone."""
    try:
        with open(stat_path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Running and not a zombie (a container's PID 1 may never reap the daemons)."""
    return _state(f"/proc/{pid}/stat") not in (None, "Z")


def _running_threads(pid: int) -> list[str]:
    """The threads of ``pid`` not stopped (state T) yet, with their states (ended ones left out)."""
    states = {task: _state(f"/proc/{pid}/task/{task}/stat") for task in os.listdir(f"/proc/{pid}/task")}
    return [f"{task}:{state}" for task, state in states.items() if state not in (None, "T", "t")]


def _stop(env: dict[str, str]) -> None:
    """What stop-ceph.sh does (only the PIDs start-ceph.sh recorded), but all daemons at once.

    stop-ceph.sh waits up to 10 s per daemon and counts a zombie as alive,
    which can take longer than a test's timeout at the end of the session.
    """
    directory = env["CEPH_DIR"]
    pids = []
    for name in ("rgw", "osd", "mgr", "mon"):
        path = os.path.join(directory, f"{name}.pid")
        try:
            with open(path) as f:
                pids.append(int(f.read().strip()))
        except (OSError, ValueError):
            continue
        os.unlink(path)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for process in [p for p in _children if p.pid in pids]:
        process.wait(10)
        _children.remove(process)


@pytest.fixture(scope="session")
def ceph_s3(tmp_path_factory: Any) -> Iterator[CephS3]:
    """One Ceph cluster with radosgw for the whole session, stopped at its end."""
    missing = _missing_tools()
    if missing or not os.path.exists(START):
        pytest.fail(f"the S3 tests need a local Ceph: missing {', '.join(missing) or START}; "
                    f"install with `apt-get install -y --no-install-recommends {PACKAGES}`", pytrace=False)
    directory = _short_directory(tmp_path_factory)
    began = time.monotonic()
    errors = []
    for attempt in range(3):  # a free port can be taken before a daemon binds it
        env, error, endpoint = _start(directory, attempt)
        if error is None:
            break
        _stop(env)
        errors.append(error)
    else:
        pytest.fail("Ceph did not start:\n" + "\n---\n".join(errors), pytrace=False)
    try:
        yield CephS3(endpoint, ACCESS_KEY, SECRET_KEY, REGION, env["CEPH_DIR"], time.monotonic() - began)
    finally:
        _stop(env)
