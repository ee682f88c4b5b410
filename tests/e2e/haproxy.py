"""Debian's HAProxy in front of several registryd nodes, for the scale-out tests.

``make_haproxy(servers)`` writes an ``haproxy.cfg`` into the test's
temporary directory and runs ``haproxy -db -f haproxy.cfg -f stats.cfg``
(the foreground, no daemon) on a free loopback port; the fixture stops
exactly the processes it started, never any other haproxy. Use it from a
test module with ``from e2e.haproxy import make_haproxy`` (the fixture has
to be imported to be found)::

    proxy = make_haproxy({"a": "127.0.0.1:5001", "b": "127.0.0.1:5002", "c": "127.0.0.1:5003"})
    proxy.url                         # http://127.0.0.1:PORT
    proxy.wait_down("a")              # the health checks' view, read from the stats socket

``haproxy.cfg`` is the one README.md gives operators ("Several nodes on one
S3 bucket"), byte for byte but for the addresses: the ``bind`` line gets a
free loopback port and each ``server`` line its node's address. Routing by
path with consistent hashing, ``GET /readyz`` health checks every half
second, ``retries`` with ``option redispatch 1`` (a request whose connection
to a dead node fails goes to another node before the health checks have
noticed), httplog lines on stdout and an ``X-Served-By`` response header
naming the node that answered. ``stats.cfg`` adds only a ``global`` stats
socket, which the tests read server states from. A missing haproxy fails
the test with the apt-get line to run; it never skips it.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import attrs
import pytest

from support.ports import free_port

HAPROXY = "/usr/sbin/haproxy"
PACKAGE = "haproxy"

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")
_BLOCK = re.compile(r"^```haproxy\n(.*?)^```$", re.S | re.M)
_BIND = re.compile(r"^(    bind )(\S+)(.*)$", re.M)
_SERVER = re.compile(r"^(    server )(\S+) (\S+)(.*)$", re.M)


def readme_config() -> str:
    """The haproxy.cfg README.md gives operators (its one ``haproxy`` code block)."""
    with open(README, encoding="utf-8") as f:
        blocks = _BLOCK.findall(f.read())
    assert len(blocks) == 1, f"README.md should hold one haproxy code block, not {len(blocks)}"
    return blocks[0]


def with_addresses(config: str, bind: str, servers: Mapping[str, str]) -> str:
    """``config`` with its ``bind`` address and each named server's address replaced, nothing else."""
    config, binds = _BIND.subn(lambda m: f"{m[1]}{bind}{m[3]}", config)
    assert binds == 1, f"the README's haproxy.cfg should bind once, not {binds} times"
    named = [m[2] for m in _SERVER.finditer(config)]
    assert sorted(named) == sorted(servers), f"the README names servers {named}; the test has {list(servers)}"
    return _SERVER.sub(lambda m: f"{m[1]}{m[2]} {servers[m[2]]}{m[4]}", config)


def find_haproxy() -> str:
    """The haproxy binary; fails the test (never skips it) when it is not installed."""
    path = HAPROXY if os.access(HAPROXY, os.X_OK) else shutil.which("haproxy")
    if not path:
        pytest.fail(f"haproxy is not installed: the scale-out tests need it "
                    f"(apt-get install -y --no-install-recommends {PACKAGE})", pytrace=False)
    return path


@attrs.define
class HAProxy:
    """One haproxy process; see the module docstring."""

    directory: str
    servers: Mapping[str, str]      # name -> host:port, the names the README's servers have
    port: int = 0
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
    def stats_config_path(self) -> str:
        return os.path.join(self.directory, "stats.cfg")

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
        """The whole haproxy.cfg: README.md's, with our addresses."""
        return with_addresses(readme_config(), f"127.0.0.1:{self.port}", self.servers)

    def stats_config_text(self) -> str:
        return f"global\n    stats socket {self.stats_socket} mode 600 level admin\n"

    def start(self, timeout: float = 20) -> None:
        binary = find_haproxy()
        os.makedirs(self.directory, exist_ok=True)
        for attempt in range(3):   # a free port can be taken before haproxy binds it
            self.port = free_port()
            with open(self.config_path, "w") as f:
                f.write(self.config_text())
            with open(self.stats_config_path, "w") as f:
                f.write(self.stats_config_text())
            files = ["-f", self.config_path, "-f", self.stats_config_path]
            check = subprocess.run([binary, "-c", *files], capture_output=True,
                                   stdin=subprocess.DEVNULL, timeout=30)
            if check.returncode != 0:
                raise RuntimeError(f"haproxy refused {self.config_path}:\n"
                                   f"{(check.stdout + check.stderr).decode(errors='replace')}")
            self._log = open(self.log_path, "ab")
            self.process = subprocess.Popen([binary, "-db", *files], stdout=self._log,
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
                # The stats socket's file exists once it is bound, a moment before it listens
                # (a connect then is refused): ready is when it accepts.
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(0.5)
                    s.connect(self.stats_socket)
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
    """Factory: ``make(servers) -> HAProxy`` (README.md's haproxy.cfg), started, every
    server seen UP by a health check; each stopped at teardown."""
    # Not looked up here: a missing haproxy must fail the test that needs it
    # (in its call, like a missing skopeo), not error its set-up or skip it.
    started: list[HAProxy] = []

    def make(servers: Mapping[str, str], wait_up: bool = True) -> HAProxy:
        proxy = HAProxy(str(tmp_path / f"haproxy{len(started)}"), dict(servers))
        started.append(proxy)
        proxy.start()
        if wait_up:
            proxy.wait_all_up()
        return proxy

    yield make
    for proxy in started:
        proxy.close()
