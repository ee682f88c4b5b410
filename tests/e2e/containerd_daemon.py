"""A private ``containerd`` daemon (Debian's 1.6) for the mirror e2e tests.

``make_containerd()`` (a fixture) returns an async factory; each daemon it
starts lives entirely under one short temporary directory (``/tmp/ctrd-*``:
unix socket paths must stay under 108 bytes): its own ``root``, ``state``,
gRPC and ttrpc sockets and ``opt`` directory, written into a minimal
``config.toml``. Its log is copied to the test's ``tmp_path`` at teardown. It never reads ``/etc/containerd`` and never
touches ``/var/lib/containerd`` or ``/run/containerd``::

    async def test_x(make_containerd):
        daemon = await make_containerd()
        await daemon.ctr("images", "pull", "--hosts-dir", hosts, "--snapshotter", "native", ref)

Plugins that need kernel features or host state this test does not use are
disabled (CRI, btrfs, aufs, devmapper, zfs, and overlayfs: the ``native``
snapshotter unpacks into plain directories with temporary bind mounts).
``ctr`` does the registry traffic itself (the daemon only stores content),
so its environment is scrubbed and any proxy points at a closed port: a
request that escapes the hosts.toml mirror fails at once, never reaching a
real network.

The daemon runs as root (it must, to bind-mount while unpacking), is started
and stopped from a thread (``deferToThread``) because the test's reactor
serves the in-process registryd meanwhile, and is stopped at teardown:
SIGTERM, then SIGKILL of that one pid, then any mount it left under its root
is unmounted. A missing binary or a daemon that does not come up is a test
failure (AssertionError) with the command and the daemon's log, never a skip.

``RequestTap`` is a TCP forwarder on the test's reactor, put between a
client and registryd to record the request lines the client sent (to see
``?ns=`` exactly as containerd wrote it).

``push_unpackable_image`` pushes a small image whose layer is a real gzipped
tar, so that containerd and dockerd can unpack it (``push_image`` layers are
random bytes and only good for registries).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

import pytest
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.python.failure import Failure

from upstreams import (
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST,
    client_for, push_blob, push_manifest, sha256_digest,
)

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
#: Nothing listens here: registry traffic that bypasses the mirror fails fast.
DEAD_PROXY = "http://127.0.0.1:9"

DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
)


def find_binary(path: str, package: str, search_path: bool = True) -> str:
    """``path`` if executable, else (``search_path``) the same name on PATH;
    else an AssertionError naming the Debian package: a failure, not a skip."""
    found: str | None = path if os.access(path, os.X_OK) else None
    if found is None and search_path:
        found = shutil.which(os.path.basename(path))
    if not found:
        raise AssertionError(f"{os.path.basename(path)} is not installed: this test needs {path} "
                             f"(Debian package {package})")
    return found


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise AssertionError(f"{what} must run as root for this test (it mounts and owns its state); "
                             f"running as uid {os.geteuid()}")


@dataclass(frozen=True)
class Result:
    """A finished command: argv, exit status and output."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_command(args: list[str], env: dict[str, str], timeout: float) -> Result:
    """Blocking: run ``args``, never longer than ``timeout`` seconds."""
    try:
        done = subprocess.run(args, env=env, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if e.stdout else ""
        err = e.stderr.decode(errors="replace") if e.stderr else ""
        return Result(args, -9, out, err + f"\n[killed after {timeout}s]")
    return Result(args, done.returncode, done.stdout.decode(errors="replace"),
                  done.stderr.decode(errors="replace"))


def clean_env(home: str) -> dict[str, str]:
    """A bare environment: private HOME, and proxies that lead nowhere.

    Go never proxies loopback addresses, so 127.0.0.1 mirrors still work.
    """
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY,
        "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }


def tail(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"[cannot read {path}: {e}]"


def stop_pid(process: subprocess.Popen[Any] | None, grace: float = 15) -> None:
    """SIGTERM the process we started, then SIGKILL it; reap it either way."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def unmount_under(directory: str) -> None:
    """Lazily unmount whatever a killed daemon left mounted below ``directory``."""
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


# -- containerd ------------------------------------------------------------------

class ContainerdDaemon:
    """One private containerd; ``ctr()`` talks to it from a thread."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.root = os.path.join(directory, "root")
        self.state = os.path.join(directory, "state")
        self.address = os.path.join(directory, "containerd.sock")
        self.config_path = os.path.join(directory, "config.toml")
        self.log_path = os.path.join(directory, "containerd.log")
        self.home = os.path.join(directory, "home")
        self.env = clean_env(self.home)
        # ctr's default for --snapshotter (pull, images check, snapshots ...).
        self.env["CONTAINERD_SNAPSHOTTER"] = "native"
        self.process: subprocess.Popen[Any] | None = None

    def write_config(self) -> None:
        disabled = ", ".join(json.dumps(p) for p in DISABLED_PLUGINS)
        text = f"""\
version = 2
root = {json.dumps(self.root)}
state = {json.dumps(self.state)}
disabled_plugins = [{disabled}]

[grpc]
  address = {json.dumps(self.address)}

[ttrpc]
  address = {json.dumps(self.address + ".ttrpc")}

[debug]
  level = "debug"

# Each namespace sees only the blobs it fetched itself, so a pull into a
# fresh namespace must download every blob again.
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"

[plugins."io.containerd.internal.v1.opt"]
  path = {json.dumps(os.path.join(self.directory, "opt"))}
"""
        with open(self.config_path, "w") as f:
            f.write(text)

    def start(self, timeout: float = 20) -> None:
        """Blocking: start containerd and wait until ``ctr version`` answers."""
        require_root("containerd")
        binary = find_binary(CONTAINERD, "containerd")
        find_binary(CTR, "containerd")
        for path in (self.root, self.state, self.home):
            os.makedirs(path, exist_ok=True)
        self.write_config()
        command = [binary, "--config", self.config_path]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            cwd=self.directory, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"containerd exited with {self.process.returncode}: "
                                     f"{' '.join(command)}\n{tail(self.log_path)}")
            if os.path.exists(self.address):
                version = self.ctr_blocking("version", timeout=5)
                if version.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd did not answer on {self.address} within {timeout}s: "
                                     f"{' '.join(command)}\n{tail(self.log_path)}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_pid(self.process)
        unmount_under(self.directory)

    def ctr_blocking(self, *args: str, namespace: str = "default", timeout: float = 45) -> Result:
        argv = [find_binary(CTR, "containerd"), "--address", self.address, "--namespace", namespace, *args]
        return run_command(argv, self.env, timeout)

    async def ctr(self, *args: str, namespace: str = "default", timeout: float = 45,
                  check: bool = True) -> Result:
        """``ctr --address SOCK -n NAMESPACE ARGS`` in a thread; raise if it fails and ``check``."""
        result: Result = await deferToThread(self.ctr_blocking, *args, namespace=namespace,
                                             timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ctr failed (exit {result.returncode}): {' '.join(result.args)}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
                                 f"containerd log (tail):\n{tail(self.log_path, 1500)}")
        return result

    def image_digests(self, listing: str) -> dict[str, str]:
        """Parse ``ctr images ls``: reference -> manifest digest."""
        digests = {}
        for line in listing.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                digests[fields[0]] = fields[2]
        return digests

    def native_snapshot_file(self, relative: str) -> list[str]:
        """The contents of ``relative`` in every native snapshot that has it.

        The native snapshotter keeps each snapshot as a plain directory, so an
        unpacked layer can be read straight from disk.
        """
        base = os.path.join(self.root, "io.containerd.snapshotter.v1.native", "snapshots")
        found = []
        for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            path = os.path.join(base, entry, relative)
            if os.path.isfile(path):
                with open(path) as f:
                    found.append(f.read())
        return found


@pytest.fixture
def make_containerd(tmp_path: Any) -> Iterator[Callable[[], Awaitable[ContainerdDaemon]]]:
    """Async factory of private containerd daemons, each stopped at teardown."""
    started: list[ContainerdDaemon] = []
    # Unix socket paths are limited to 108 bytes: keep them short.
    base = tempfile.mkdtemp(prefix="ctrd-", dir="/tmp")

    async def make() -> ContainerdDaemon:
        daemon = ContainerdDaemon(os.path.join(base, str(len(started))))
        started.append(daemon)
        await deferToThread(daemon.start)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()
    logs = tmp_path / "containerd-logs"
    logs.mkdir(exist_ok=True)
    for index, daemon in enumerate(started):
        if os.path.exists(daemon.log_path):
            shutil.copy(daemon.log_path, logs / f"containerd{index}.log")
    shutil.rmtree(base, ignore_errors=True)


# -- an image that can be unpacked ------------------------------------------------

def go_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)


def _tar(files: dict[str, bytes]) -> bytes:
    """A deterministic tar of ``files`` (path -> bytes), parent directories first."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(files[path]), 0o644, 1700000000
            tar.addfile(info, io.BytesIO(files[path]))
    return out.getvalue()


def build_unpackable_image(marker: str, payload_size: int = 256 * 1024,
                           docker: bool = False) -> dict[str, Any]:
    """One real gzipped-tar layer holding ``etc/registryd-e2e`` (= ``marker``)
    and ``data.bin`` (``payload_size`` incompressible bytes), its config with
    the right ``diff_ids`` for this machine's platform, and the manifest.
    """
    payload = b"".join(hashlib.sha256(f"{marker}:{i}".encode()).digest()
                       for i in range((payload_size + 31) // 32))[:payload_size]
    tar = _tar({"etc/registryd-e2e": marker.encode(), "data.bin": payload})
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps({
        "architecture": go_arch(),
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/data.bin"], "Labels": {"registryd.e2e": marker}},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "registryd e2e test"}],
    }, sort_keys=True).encode()
    layer_type, config_type, manifest_type = ((DOCKER_LAYER, DOCKER_CONFIG, DOCKER_MANIFEST) if docker
                                              else (OCI_LAYER, OCI_CONFIG, OCI_MANIFEST))
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": sha256_digest(layer), "size": len(layer)}],
    }, indent=2).encode()
    return {
        "manifest": manifest, "digest": sha256_digest(manifest), "media_type": manifest_type,
        "config": {"digest": sha256_digest(config), "size": len(config), "data": config},
        "layers": [{"digest": sha256_digest(layer), "size": len(layer), "data": layer,
                    "diff_id": sha256_digest(tar)}],
        "marker": marker,
    }


def push_unpackable_image(upstream: Any, repo: str, tag: str, marker: str, docker: bool = False,
                          payload_size: int = 256 * 1024) -> dict[str, Any]:
    """Blocking: push ``build_unpackable_image`` to ``upstream`` as ``repo:tag``."""
    image = build_unpackable_image(marker, payload_size, docker)
    client = client_for(upstream)
    for blob in (*image["layers"], image["config"]):
        pushed = push_blob(upstream, repo, blob["data"], client)
        assert pushed["digest"] == blob["digest"]
    push_manifest(upstream, repo, tag, image["manifest"], image["media_type"], client)
    image.update(repo=repo, tag=tag)
    return image


# -- seeing what reached registryd ------------------------------------------------

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")


_WORKER_HEADER = re.compile(rb"\r\nx-registryd-worker: *(\w+)\r\n", re.I)


class _WorkerNotingClient(portforward.ProxyClient):
    """registryd's side of one tapped connection: notes the worker that answers it (a node of
    several workers started with REGISTRYD_WORKER_HEADER names it in every response)."""

    _head = b""

    def dataReceived(self, data: bytes) -> None:
        server = self.peer
        if getattr(server, "worker", None) is None and len(self._head) < 65536:
            self._head = self._head[-256:] + data[:65536]
            match = _WORKER_HEADER.search(self._head)
            if match:
                server.worker = match.group(1).decode()
                server.factory.workers[server.index] = server.worker
        super().dataReceived(data)


class _QuietClientFactory(portforward.ProxyClientFactory):
    noisy = False
    protocol = _WorkerNotingClient


class _TapServer(portforward.ProxyServer):
    """Forwards bytes untouched, noting every request line the client sends."""

    clientProtocolFactory = _QuietClientFactory
    noisy = False
    factory: "_TapFactory"  # type: ignore[assignment]
    _pending = b""
    worker: str | None = None
    index = -1

    def dataReceived(self, data: bytes) -> None:
        # Pull requests carry no bodies, so every CRLF-terminated line that
        # looks like a request line is one.
        lines = (self._pending + data).split(b"\r\n")
        self._pending = lines.pop()[-8192:]
        for line in lines:
            match = _REQUEST_LINE.match(line)
            if match:
                self.factory.requests.append((match.group(1).decode(), match.group(2).decode()))
                self.factory.connection_of.append(self.index)
        super().dataReceived(data)

    def connectionMade(self) -> None:
        self.index = self.factory.connections
        self.factory.connections += 1
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.live.discard(self)
        super().connectionLost(reason)


class _TapFactory(portforward.ProxyFactory):
    protocol = _TapServer
    noisy = False

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.requests: list[tuple[str, str]] = []
        self.connection_of: list[int] = []     # per request: the index of its connection
        self.workers: dict[int, str] = {}       # connection index -> the worker that answered it
        self.connections = 0
        self.live: set[_TapServer] = set()


class RequestTap:
    """``127.0.0.1:PORT`` forwarding to ``target_host:target_port``.

    ``requests`` lists (method, request-target) in arrival order; ``close()``
    stops listening and drops the connections still open (daemons keep
    theirs alive), which closes the forwarded ones to registryd too.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        from twisted.internet import reactor

        self._factory = _TapFactory(target_host, target_port)
        factory: Any = self._factory
        self._port: IListeningPort = reactor.listenTCP(  # type: ignore[attr-defined]
            0, factory, interface="127.0.0.1")
        self.port: int = self._port.getHost().port  # type: ignore[attr-defined]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(self._factory.requests)

    def served(self) -> list[tuple[str, str, str | None]]:
        """(method, target, worker) of every request so far: the worker that answered its
        connection (None when no response named one)."""
        factory = self._factory
        return [(method, target, factory.workers.get(index))
                for (method, target), index in zip(factory.requests, factory.connection_of)]

    def close(self) -> Any:
        for server in list(self._factory.live):
            server.transport.loseConnection()
        return self._port.stopListening()


@pytest.fixture
def request_tap() -> Iterator[Callable[[str], RequestTap]]:
    """Factory: ``request_tap("127.0.0.1:5000") -> RequestTap``, closed at teardown."""
    import pytest_twisted

    taps: list[RequestTap] = []

    def make(target: str) -> RequestTap:
        host, _, port = target.rpartition(":")
        tap = RequestTap(host, int(port))
        taps.append(tap)
        return tap

    yield make
    for tap in taps:
        pytest_twisted.blockon(tap.close())
