"""Run the real ``podman`` (Debian's 4.3) from reactor-driven tests, isolated from the host.

Every call gets a private storage root and run root (``--root``,
``--runroot``, ``--storage-driver vfs``: no overlay mounts), and an
environment whose ``registries.conf``, ``containers.conf``, auth file,
HOME and TMPDIR all live under one temporary directory; pushes and pulls
get a signature policy that accepts anything. Nothing from
``/etc/containers`` or ``/var/lib/containers`` is read or written.

podman runs as root here (the tests do), in a thread (``deferToThread``),
so the test's reactor keeps serving the in-process registryd. A missing
podman is a failure (AssertionError naming the Debian package), never a
skip.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import pytest

from twisted.internet.threads import deferToThread

from .containerd_daemon import Result, clean_env, find_binary, run_command, tail

PODMAN = "/usr/bin/podman"


class Podman:
    """A podman whose whole configuration and storage live in ``workdir``."""

    def __init__(self, workdir: str | os.PathLike[str], insecure_hosts: tuple[str, ...] = (),
                 timeout: float = 60) -> None:
        self.workdir = os.fspath(workdir)
        self.timeout = timeout
        for sub in ("root", "runroot", "home", "tmp", "run"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        self.registries_conf = os.path.join(self.workdir, "registries.conf")
        with open(self.registries_conf, "w") as f:
            for host in insecure_hosts:
                f.write(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n\n')
        self.containers_conf = os.path.join(self.workdir, "containers.conf")
        with open(self.containers_conf, "w") as f:
            f.write('[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n')
        self.policy = self._write("policy.json", {"default": [{"type": "insecureAcceptAnything"}]})
        self.authfile = self._write("auth.json", {"auths": {}})
        self.env = clean_env(os.path.join(self.workdir, "home"))
        self.env.update({
            "XDG_RUNTIME_DIR": os.path.join(self.workdir, "run"),
            "XDG_CONFIG_HOME": os.path.join(self.workdir, "home", ".config"),
            "CONTAINERS_REGISTRIES_CONF": self.registries_conf,
            "CONTAINERS_CONF": self.containers_conf,
            "REGISTRY_AUTH_FILE": self.authfile,
            "TMPDIR": os.path.join(self.workdir, "tmp"),
        })
        self.global_args = ["--root", os.path.join(self.workdir, "root"),
                            "--runroot", os.path.join(self.workdir, "runroot"), "--storage-driver", "vfs"]

    def _write(self, name: str, doc: Any) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def argv(self, *args: str) -> list[str]:
        """The full command line for ``podman ARGS`` (the signature policy goes to push and pull)."""
        binary = find_binary(PODMAN, "podman")
        extra = ["--signature-policy", self.policy] if args and args[0] in ("push", "pull") else []
        return [binary, *self.global_args, *args[:1], *extra, *args[1:]]

    async def run(self, *args: str, check: bool = True, stdin: str | None = None) -> Result:
        """``podman ARGS`` in a thread; raise if it fails and ``check``."""
        argv = self.argv(*args)
        if stdin is None:
            result: Result = await deferToThread(run_command, argv, self.env, self.timeout)
        else:
            result = await deferToThread(_run_with_input, argv, self.env, self.timeout, stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"podman failed (exit {result.returncode}): {' '.join(result.args)}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result


def _run_with_input(args: list[str], env: dict[str, str], timeout: float, stdin: str) -> Result:
    import subprocess

    try:
        done = subprocess.run(args, env=env, capture_output=True, timeout=timeout, input=stdin.encode())
    except subprocess.TimeoutExpired as e:
        return Result(args, -9, "", f"{e.stderr!r}\n[killed after {timeout}s]")
    return Result(args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


@pytest.fixture
def make_podman() -> Iterator[Callable[..., Podman]]:
    """Factory of Podmans in short directories under /tmp (podman refuses a
    run root longer than 50 characters), removed at teardown."""
    base = tempfile.mkdtemp(prefix="podman-", dir="/tmp")
    made: list[Podman] = []

    def make(insecure_hosts: tuple[str, ...] = ()) -> Podman:
        podman = Podman(os.path.join(base, str(len(made))), insecure_hosts)
        made.append(podman)
        return podman

    yield make
    shutil.rmtree(base, ignore_errors=True)


__all__ = ["Podman", "make_podman", "tail"]
