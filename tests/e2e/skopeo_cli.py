"""Run the real ``skopeo`` from reactor-driven tests, isolated from the host.

The in-process registryd runs on the test's own reactor, so skopeo must run
without blocking it: every call goes through ``deferToThread`` around a
``subprocess.run`` with a timeout.

Nothing from the host's container configuration is read or written: the
process gets a bare environment with a temporary HOME holding an empty
``registries.conf``, an empty auth file, a policy that accepts anything, an
empty certificate directory and its own registries.d and tmpdir.

The blob-info cache (what makes skopeo try cross-repository mounts) would
live in ``/var/lib/containers/cache`` for root; ``_CONTAINERS_ROOTLESS_UID``
makes containers/image treat the process as rootless, so the cache goes to
``$XDG_DATA_HOME/containers/cache`` under the temporary directory instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from twisted.internet.threads import deferToThread

SKOPEO = "/usr/bin/skopeo"


class SkopeoError(AssertionError):
    """skopeo exited non-zero; the message carries its command and stderr."""

    def __init__(self, result: "Result") -> None:
        super().__init__(
            f"skopeo exited {result.returncode}: {' '.join(result.args)}\n"
            f"stderr:\n{result.stderr.decode(errors='replace')}"
        )
        self.result = result


@dataclass(frozen=True)
class Result:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stderr.decode(errors="replace")


def find_skopeo() -> str:
    """The skopeo binary; an AssertionError (a failure, not a skip) if absent."""
    path = SKOPEO if os.access(SKOPEO, os.X_OK) else shutil.which("skopeo")
    if not path:
        raise AssertionError("skopeo is not installed: the e2e tests need /usr/bin/skopeo (apt install skopeo)")
    return path


class Skopeo:
    """A skopeo whose whole configuration lives in ``workdir``."""

    def __init__(self, workdir: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.workdir = os.fspath(workdir)
        self.timeout = timeout
        home = os.path.join(self.workdir, "home")
        for sub in ("home", "home/.config", "home/data", "home/run", "registries.d", "tmp", "certs.d"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        self.policy = self._write("policy.json", {"default": [{"type": "insecureAcceptAnything"}]})
        self.authfile = self._write("auth.json", {"auths": {}})
        # skopeo 1.9 does not read CONTAINERS_REGISTRIES_CONF (only podman
        # and buildah do); it reads $HOME/.config/containers/registries.conf
        # when that exists, and then neither /etc/containers/registries.conf
        # nor /etc/containers/registries.conf.d/. The variable is set as well,
        # for newer versions.
        os.makedirs(os.path.join(home, ".config", "containers"), exist_ok=True)
        self.registries_conf = os.path.join(home, ".config", "containers", "registries.conf")
        open(self.registries_conf, "w").close()
        containers_conf = os.path.join(self.workdir, "containers.conf")
        open(containers_conf, "w").close()
        self.env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": home,
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_DATA_HOME": os.path.join(home, "data"),
            "XDG_RUNTIME_DIR": os.path.join(home, "run"),
            "DOCKER_CONFIG": os.path.join(home, ".docker"),
            "REGISTRY_AUTH_FILE": self.authfile,
            "CONTAINERS_REGISTRIES_CONF": self.registries_conf,
            "CONTAINERS_CONF": containers_conf,
            "_CONTAINERS_ROOTLESS_UID": "1000",
            "LANG": "C.UTF-8",
        }
        # An empty --cert-dir, so /etc/docker/certs.d/<host:port> is not read.
        self.cert_dir = os.path.join(self.workdir, "certs.d")
        self.global_args = [
            "--policy", self.policy,
            "--registries.d", os.path.join(self.workdir, "registries.d"),
            "--tmpdir", os.path.join(self.workdir, "tmp"),
            "--command-timeout", f"{int(timeout)}s",
        ]

    def _write(self, name: str, doc: Any) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def _run_blocking(self, args: list[str]) -> Result:
        try:
            done = subprocess.run(args, env=self.env, cwd=self.workdir, capture_output=True,
                                  timeout=self.timeout + 15, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            return Result(args, -9, e.stdout or b"", (e.stderr or b"") + b"\n[timed out]")
        return Result(args, done.returncode, done.stdout, done.stderr)

    async def run(self, *args: str, check: bool = True, debug: bool = False) -> Result:
        """Run ``skopeo [global options] ARGS`` in a thread; raise if it fails and ``check``."""
        # Looked up here, inside the test: a missing skopeo is a test failure
        # (an AssertionError in the call), never a skip or a setup error.
        argv = [find_skopeo(), *self.global_args, *(["--debug"] if debug else []), *args]
        result: Result = await deferToThread(self._run_blocking, argv)
        if check and result.returncode != 0:
            raise SkopeoError(result)
        return result

    async def copy(self, src: str, dest: str, *options: str, debug: bool = False, check: bool = True) -> Result:
        """``skopeo copy`` with TLS verification off on both sides (plain http)."""
        return await self.run("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                              "--src-cert-dir", self.cert_dir, "--dest-cert-dir", self.cert_dir,
                              *options, src, dest, debug=debug, check=check)

    async def copy_digest(self, src: str, dest: str, *options: str, debug: bool = False) -> str:
        """``skopeo copy`` and return the digest of the manifest it wrote."""
        digestfile = os.path.join(self.workdir, "tmp", "digestfile")
        if os.path.exists(digestfile):
            os.unlink(digestfile)
        await self.copy(src, dest, "--digestfile", digestfile, *options, debug=debug)
        with open(digestfile) as f:
            return f.read().strip()

    def _registry_options(self) -> list[str]:
        return ["--tls-verify=false", "--cert-dir", self.cert_dir]

    async def inspect_raw(self, ref: str, *options: str) -> bytes:
        """``skopeo inspect --raw``: the manifest (or with ``--config``, config) bytes."""
        return (await self.run("inspect", *self._registry_options(), "--raw", *options, ref)).stdout

    async def inspect(self, ref: str, *options: str) -> dict[str, Any]:
        result = await self.run("inspect", *self._registry_options(), *options, ref)
        return json.loads(result.stdout)

    async def list_tags(self, ref: str) -> dict[str, Any]:
        """``skopeo list-tags docker://HOST/REPO`` (no tag in ``ref``)."""
        return json.loads((await self.run("list-tags", *self._registry_options(), ref)).stdout)

    async def delete(self, ref: str) -> Result:
        return await self.run("delete", *self._registry_options(), ref)
