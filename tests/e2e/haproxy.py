"""Debian's HAProxy in front of several registryd nodes, for the scale-out tests.

``make_haproxy(servers, balance=...)`` writes an ``haproxy.cfg`` into the
test's temporary directory and runs ``haproxy -db -f haproxy.cfg`` (the
foreground, no daemon) on a free loopback port; the fixture stops exactly
the processes it started, never any other haproxy. Use it from a test module
with ``from e2e.haproxy import make_haproxy`` (the fixture has to be
imported to be found)::

    proxy = make_haproxy({"a": "127.0.0.1:5001", "b": "127.0.0.1:5002"}, balance="roundrobin")
    proxy.url                         # http://127.0.0.1:PORT
    proxy.wait_until("a", "DOWN")     # the health checks' view, read from the stats socket

The configuration is what we would tell an operator to run (see
``config_text``): HTTP mode, ``GET /readyz`` health checks every half
second, ``retries`` with ``option redispatch 1`` so that a request whose
connection to a dead node fails is sent to another node before the health
checks have noticed, and an ``X-Served-By`` response header naming the node
that answered (for the tests only). A missing haproxy fails the test with
the apt-get line to run; it never skips it.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import attrs
import pytest

HAPROXY = "/usr/sbin/haproxy"
PACKAGE = "haproxy"

#: Balance lines the tests use. ``uri`` hashes the path (without the query
#: string); ``hash-type consistent`` keeps most paths on their node when a
#: node leaves or comes back.
ROUNDROBIN = "balance roundrobin"
BY_PATH = "balance uri path-only\n    hash-type consistent"


def find_haproxy() -> str:
    """The haproxy binary; fails the test (never skips it) when it is not installed."""
    path = HAPROXY if os.access(HAPROXY, os.X_OK) else shutil.which("haproxy")
    if not path:
        pytest.fail(f"haproxy is not installed: the scale-out tests need it "
                    f"(apt-get install -y --no-install-recommends {PACKAGE})", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.define
class HAProxy:
    """One haproxy process; see the module docstring."""

    directory: str
    servers: Mapping[str, str]      # name -> host:port
    balance: str = ROUNDROBIN
    port: int = 0
    check_interval_ms: int = 500
    process: subprocess.Popen[Any] | None = None
    _log: Any = None
    _socket_dir: str | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "haproxy.cfg")

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "haproxy.log")

    @property
    def stats_socket(self) -> str:
        # A Unix socket path must stay below 108 bytes; pytest's can be longer.
        path = os.path.join(self.directory, "admin.sock")
        if len(path) < 100:
            return path
        if self._socket_dir is None:
            self._socket_dir = tempfile.mkdtemp(prefix="registryd-haproxy-")
        return os.path.join(self._socket_dir, "admin.sock")

    def config_text(self) -> str:
        """The whole haproxy.cfg."""
        servers = "\n".join(f"    server {name} {address}" for name, address in self.servers.items())
        return f"""\
global
    maxconn 1024
    log stdout format raw local0 info
    stats socket {self.stats_socket} mode 600 level admin

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout http-request 30s
    timeout queue 30s
    # A request whose connection to a node fails (a dead node that the health
    # checks have not marked down yet) is tried again, on another node at once.
    retries 3
    option redispatch 1

frontend registry
    bind 127.0.0.1:{self.port}
    default_backend registryd

backend registryd
    {self.balance}
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter {self.check_interval_ms}ms fall 2 rise 1
    # For the tests: which node answered.
    http-response set-header X-Served-By %[srv_name]
{servers}
"""

    def start(self, timeout: float = 20) -> None:
        binary = find_haproxy()
        os.makedirs(self.directory, exist_ok=True)
        for attempt in range(3):   # a free port can be taken before haproxy binds it
            self.port = _free_port()
            with open(self.config_path, "w") as f:
                f.write(self.config_text())
            check = subprocess.run([binary, "-c", "-f", self.config_path], capture_output=True,
                                   stdin=subprocess.DEVNULL, timeout=30)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy refused {self.config_path}:\n"
                                   f"{(check.stdout + check.stderr).decode(errors='replace')}")
            self._log = open(self.log_path, "ab")
            self.process = subprocess.Popen([binary, "-db", "-f", self.config_path], stdout=self._log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                self._wait_listening(timeout)
                return
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise

    def _wait_listening(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                if os.path.exists(self.stats_socket):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not listen on {self.host} within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """``stop``, and remove the short directory of the stats socket if one was made."""
        self.stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def log_tail(self, size: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode(errors="replace")
        except OSError:
            return "(no log)"

    # -- the stats socket --------------------------------------------------------

    def command(self, line: str) -> str:
        """One command on the admin socket (``show stat``, ``show servers state``, ...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def server_states(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name -> row (``status``, ``check_status``, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row.get("pxname") == "registryd" and row.get("svname") in self.servers}

    def wait_until(self, predicate: Callable[[dict[str, dict[str, str]]], bool], what: str,
                   timeout: float = 30) -> None:
        """Poll the stats socket until ``predicate(server_states())`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.server_states()
            if predicate(states):
                return
            if time.monotonic() > deadline:
                summary = {name: (row.get("status"), row.get("check_status")) for name, row in states.items()}
                raise AssertionError(f"haproxy: {what} not reached within {timeout}s: {summary}")
            time.sleep(0.05)

    def wait_all_up(self, timeout: float = 30) -> None:
        """Every server has passed a health check (not merely started as UP)."""
        self.wait_until(lambda states: len(states) == len(self.servers) and all(
            row["status"] == "UP" and row["check_status"] == "L7OK" for row in states.values()),
            "every server UP after a passed check", timeout)

    def wait_down(self, name: str, timeout: float = 30) -> None:
        self.wait_until(lambda states: states.get(name, {}).get("status") == "DOWN", f"{name} DOWN", timeout)


@pytest.fixture
def make_haproxy(tmp_path: Any) -> Iterator[Callable[..., HAProxy]]:
    """Factory: ``make(servers, balance=ROUNDROBIN, check_interval_ms=500) -> HAProxy``,
    started, every server seen UP by a health check; each stopped at teardown."""
    # Not looked up here: a missing haproxy must fail the test that needs it
    # (in its call, like a missing skopeo), not error its set-up or skip it.
    started: list[HAProxy] = []

    def make(servers: Mapping[str, str], balance: str = ROUNDROBIN, check_interval_ms: int = 500,
             wait_up: bool = True) -> HAProxy:
        proxy = HAProxy(str(tmp_path / f"haproxy{len(started)}"), dict(servers), balance,
                        check_interval_ms=check_interval_ms)
        started.append(proxy)
        proxy.start()
        if wait_up:
            proxy.wait_all_up()
        return proxy

    yield make
    for proxy in started:
        proxy.close()
