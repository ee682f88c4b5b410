"""A private ``dockerd`` (Debian's docker.io 20.10) for the mirror e2e tests.

``make_dockerd(mirrors=[...])`` (a fixture) returns an async factory; each
daemon it starts keeps everything under one temporary directory::

    DIR/daemon.json      storage-driver vfs, no bridge, no iptables, the mirrors
    DIR/data             --data-root
    DIR/exec             --exec-root
    DIR/docker.sock      -H unix://DIR/docker.sock
    DIR/docker.pid       --pidfile
    DIR/key.json         "deprecated-key-path" (else it writes /etc/docker/key.json)
    DIR/containerd/      a private containerd (``containerd_daemon``), --containerd

dockerd is given its own containerd rather than left to start one: the one
dockerd would start writes ``/opt/containerd`` and is orphaned if dockerd is
killed; ours lives under DIR and is stopped by pid after dockerd. The only
path outside DIR that dockerd 20.10 insists on is ``/run/docker/plugins``
(hard-coded, for socket path length); it is removed again at teardown when
it was not there before and is still empty.

The daemon's environment points every proxy variable at a closed port (Go
never proxies 127.0.0.1), so if the mirror fails and dockerd falls back to
Docker Hub it fails at once instead of reaching, or waiting for, the
internet. ``max-download-attempts`` is 1 so a failing layer is not retried.

Everything blocking runs in a thread (``deferToThread``): the test's reactor
serves the in-process registryd meanwhile. A missing dockerd or docker CLI,
or a daemon that does not come up, is an AssertionError with the command and
the daemon's log: the test fails, it never skips.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Awaitable, Callable, Iterator, Sequence

import pytest
from twisted.internet.threads import deferToThread

from .containerd_daemon import (
    ContainerdDaemon, Result, clean_env, find_binary, require_root, run_command, stop_pid, tail,
    unmount_under,
)

DOCKERD = "/usr/sbin/dockerd"
#: Debian's client (``/usr/local/bin/docker`` may be another one, first on PATH).
DOCKER = "/usr/bin/docker"
PLUGINS_DIR = "/run/docker/plugins"


def daemon_json(mirrors: Sequence[str], key_path: str) -> dict[str, Any]:
    """The daemon.json for a dockerd that can pull, and nothing more, in a container."""
    return {
        "registry-mirrors": list(mirrors),
        "storage-driver": "vfs",
        "bridge": "none",
        "iptables": False,
        "ip6tables": False,
        "ip-forward": False,
        "ip-masq": False,
        "max-download-attempts": 1,
        "debug": True,
        # A daemon.json key only (no flag in 20.10); default /etc/docker/key.json.
        "deprecated-key-path": key_path,
    }


class DockerDaemon:
    """One private dockerd; ``docker()`` runs Debian's CLI against it from a thread."""

    def __init__(self, directory: str, mirrors: Sequence[str]) -> None:
        self.directory = directory
        self.mirrors = list(mirrors)
        self.config_path = os.path.join(directory, "daemon.json")
        self.data_root = os.path.join(directory, "data")
        self.exec_root = os.path.join(directory, "exec")
        self.socket = os.path.join(directory, "docker.sock")
        self.host = f"unix://{self.socket}"
        self.pidfile = os.path.join(directory, "docker.pid")
        self.key_path = os.path.join(directory, "key.json")
        self.log_path = os.path.join(directory, "dockerd.log")
        self.home = os.path.join(directory, "home")
        self.env = clean_env(self.home)
        self.client_env = dict(self.env, DOCKER_CONFIG=os.path.join(self.home, ".docker"))
        self.containerd = ContainerdDaemon(os.path.join(directory, "containerd"))
        self.process: subprocess.Popen[Any] | None = None
        self._made_plugins_dir = False

    def start(self, timeout: float = 30) -> None:
        """Blocking: start containerd, then dockerd; wait until ``docker version`` answers."""
        require_root("dockerd")
        binary = find_binary(DOCKERD, "docker.io")
        find_binary(DOCKER, "docker.io", search_path=False)
        for path in (self.data_root, self.exec_root, self.home, os.path.join(self.home, ".docker")):
            os.makedirs(path, exist_ok=True)
        with open(self.config_path, "w") as f:
            json.dump(daemon_json(self.mirrors, self.key_path), f, indent=2)
        self.containerd.start()
        self._made_plugins_dir = not os.path.exists(PLUGINS_DIR)
        command = [
            binary, "--config-file", self.config_path, "--data-root", self.data_root,
            "--exec-root", self.exec_root, "-H", self.host, "--pidfile", self.pidfile,
            "--containerd", self.containerd.address,
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            cwd=self.directory, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"dockerd exited with {self.process.returncode}: "
                                     f"{' '.join(command)}\n{tail(self.log_path)}")
            if os.path.exists(self.socket):
                version = self.docker_blocking("version", timeout=5)
                if version.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not answer on {self.host} within {timeout}s: "
                                     f"{' '.join(command)}\n{tail(self.log_path)}")
            time.sleep(0.1)

    def stop(self) -> None:
        """dockerd first (it unmounts and lets go of containerd), then containerd."""
        stop_pid(self.process, grace=20)
        self.containerd.stop()
        unmount_under(self.directory)
        if self._made_plugins_dir:
            for path in (PLUGINS_DIR, os.path.dirname(PLUGINS_DIR)):
                try:
                    os.rmdir(path)   # only when empty: another dockerd may use it
                except OSError:
                    break

    def docker_blocking(self, *args: str, timeout: float = 45) -> Result:
        argv = [find_binary(DOCKER, "docker.io", search_path=False), "-H", self.host, *args]
        return run_command(argv, self.client_env, timeout)

    async def docker(self, *args: str, timeout: float = 45, check: bool = True) -> Result:
        """``docker -H unix://SOCK ARGS`` in a thread; raise if it fails and ``check``."""
        result: Result = await deferToThread(self.docker_blocking, *args, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker failed (exit {result.returncode}): {' '.join(result.args)}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
                                 f"dockerd log (tail):\n{tail(self.log_path, 3000)}")
        return result

    def vfs_file(self, relative: str) -> list[str]:
        """The contents of ``relative`` in every vfs layer directory that has it.

        The vfs driver keeps each layer as a full plain copy under data/vfs/dir.
        """
        found = []
        for path in sorted(glob.glob(os.path.join(self.data_root, "vfs", "dir", "*", relative))):
            with open(path) as f:
                found.append(f.read())
        return found


@pytest.fixture
def make_dockerd(tmp_path: Any) -> Iterator[Callable[..., Awaitable[DockerDaemon]]]:
    """Async factory ``await make_dockerd(mirrors=[url])``; each daemon stopped at teardown."""
    started: list[DockerDaemon] = []
    # Unix socket paths are limited to 108 bytes: keep them short.
    base = tempfile.mkdtemp(prefix="dockerd-", dir="/tmp")

    async def make(mirrors: Sequence[str] = ()) -> DockerDaemon:
        daemon = DockerDaemon(os.path.join(base, str(len(started))), mirrors)
        started.append(daemon)
        await deferToThread(daemon.start)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()
    logs = tmp_path / "dockerd-logs"
    logs.mkdir(exist_ok=True)
    for index, daemon in enumerate(started):
        for path, name in ((daemon.log_path, f"dockerd{index}.log"),
                           (daemon.containerd.log_path, f"containerd{index}.log")):
            if os.path.exists(path):
                shutil.copy(path, logs / name)
    shutil.rmtree(base, ignore_errors=True)
