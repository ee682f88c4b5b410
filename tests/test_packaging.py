"""The .deb and the .rpm as an operator meets them (issue 6).

Builds both packages with scripts/build-packages, then, in a clean Debian
root made by debootstrap: installs the .deb with apt, runs the unit's
ExecStart as the registryd user (there is no systemd as PID 1 in CI) and
pushes and pulls an image with skopeo over loopback; upgrades to a package
built with the next version; purges and compares file lists. The .rpm is
checked with rpm -qlp and unpacked with rpm --root (with and without its
scriptlets). The unit passes systemd-analyze verify, and it also runs under
a real systemd: the root booted with systemd-nspawn starts it at boot,
hardened. lintian finds no error in the .deb.

These tests are slow (about five minutes) and need root, debootstrap, the
packaging tools and network access to Debian's and PyPI's mirrors; a missing
tool is a failure, never a skip. The Debian packages they need:
dpkg-dev debhelper dh-virtualenv python3-venv rpm debootstrap lintian
systemd systemd-container skopeo.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import pytest

from conftest import free_port
from support.wait import wait_for_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD_SCRIPT = os.path.join(ROOT, "scripts", "build-packages")
MKIMAGE = os.path.join(ROOT, "benchmarks", "tools", "mkimage.py")
UNIT_SOURCE = os.path.join(ROOT, "etc", "registryd", "registryd.service")
PACKAGED_CONFIG = os.path.join(ROOT, "packaging", "common", "registryd.toml")
SUITE = "bookworm"
DEB_VENV = "/opt/venvs/registryd"
RPM_VENV = "/opt/registryd"
EXEC_START = "{venv}/bin/twistd -n --pidfile= registryd --config /etc/registryd/registryd.toml"
BUILD_BUDGET = 300  # seconds for both packages, on 2 cores
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Building and installing takes minutes, not the suite's default 300 s.
pytestmark = pytest.mark.timeout(1200)


def _load_build_script() -> Any:
    """scripts/build-packages as a module (no byte code written next to it)."""
    module = types.ModuleType("build_packages")
    module.__file__ = BUILD_SCRIPT
    with open(BUILD_SCRIPT, encoding="utf-8") as f:
        exec(compile(f.read(), BUILD_SCRIPT, "exec"), module.__dict__)
    return module


build_packages = _load_build_script()
VERSION = build_packages.read_version(ROOT)
UPSTREAM = build_packages.upstream_version(VERSION)


def need_tool(name: str) -> str:
    """The tool's path; a failure (not a skip) when it is not installed."""
    path = shutil.which(name, path=CLEAN_PATH)
    assert path, f"{name} is not installed (run-tests.sh installs the packaging tools)"
    return path


def run(cmd: list[str], *, timeout: float = 600, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def next_version(version: str) -> str:
    """The next patch release: 0.1.0 -> 0.1.1 (what an upgrade brings)."""
    parts = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", version)
    assert parts, version
    major, minor, patch = int(parts[1]), int(parts[2]), int(parts[3] or 0)
    return f"{major}.{minor}.{patch + 1}"


# -- clean Debian roots ---------------------------------------------------------

class DebianRoot:
    """A debootstrapped Debian, driven with chroot from the outside."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __truediv__(self, rel: str) -> str:
        return os.path.join(self.path, rel.lstrip("/"))

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/root",
                "DEBIAN_FRONTEND": "noninteractive", **extra}

    def run(self, *cmd: str, check: bool = True, timeout: float = 600,
            user: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        prefix = ["chroot"] + ([f"--userspec={user}"] if user else []) + [self.path]
        return run(prefix + list(cmd), check=check, timeout=timeout, env=env or self.env())

    def apt_install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("apt-get", "install", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args, timeout=900)

    def copy_in(self, path: str) -> str:
        """Put a host file in the root's /tmp; returns its path inside."""
        inside = os.path.join("/tmp", os.path.basename(path))
        shutil.copy(path, self / inside)
        return inside

    def read(self, rel: str) -> str:
        with open(self / rel, encoding="utf-8") as f:
            return f.read()

    def write(self, rel: str, text: str) -> None:
        with open(self / rel, "w", encoding="utf-8") as f:
            f.write(text)

    def passwd(self, name: str) -> tuple[int, int, str, str]:
        """(uid, gid, home, shell) of a user of the root, from its /etc/passwd."""
        for line in self.read("/etc/passwd").splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2]), int(fields[3]), fields[5], fields[6]
        raise AssertionError(f"no user {name} in {self.path}/etc/passwd")

    def group_id(self, name: str) -> int:
        for line in self.read("/etc/group").splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2])
        raise AssertionError(f"no group {name} in {self.path}/etc/group")

    def clone(self, path: str) -> "DebianRoot":
        run(["cp", "-a", "--reflink=auto", self.path, path])
        return DebianRoot(path)


def host_debian_mirror() -> str:
    """The Debian mirror the host's apt uses (debootstrap should use it too)."""
    for path in glob.glob("/etc/apt/sources.list.d/*.sources") + ["/etc/apt/sources.list"]:
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        for uri in re.findall(r"^\s*URIs:\s*(\S+)", text, re.M) + re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def copy_host_settings(root: DebianRoot) -> None:
    """What a fresh root lacks to reach the mirrors the host reaches.

    The apt sources (and the keyrings they name), apt's settings, the CA
    bundle, pip's configuration and DNS.
    """
    sources = [p for p in glob.glob("/etc/apt/sources.list.d/*") if p.endswith((".list", ".sources"))]
    if os.path.exists("/etc/apt/sources.list"):
        sources.append("/etc/apt/sources.list")
    assert sources, "the host has no apt sources to copy"
    if os.path.exists(root / "/etc/apt/sources.list"):
        os.unlink(root / "/etc/apt/sources.list")
    for path in sources:
        shutil.copy(path, root / path)
        for keyring in re.findall(r"(?:Signed-By:\s*|signed-by=)(/\S+?)[\]\s]", open(path).read() + "\n"):
            if os.path.exists(keyring) and not os.path.exists(root / keyring):
                os.makedirs(os.path.dirname(root / keyring), exist_ok=True)
                shutil.copy(keyring, root / keyring)
    for folder in ("/etc/apt/apt.conf.d", "/etc/apt/trusted.gpg.d"):
        for path in glob.glob(os.path.join(folder, "*")):
            if os.path.isfile(path) and not os.path.exists(root / path):
                shutil.copy(path, root / path)
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf", "/etc/resolv.conf"):
        if os.path.exists(path):
            os.makedirs(os.path.dirname(root / path), exist_ok=True)
            if os.path.lexists(root / path):
                os.unlink(root / path)
            shutil.copy(path, root / path)


# Left out of file-list comparisons: state of dpkg and apt themselves, logs,
# caches, virtual and temporary file systems.
VOLATILE = ("proc", "sys", "dev", "run", "tmp", "var/tmp", "var/log", "var/cache",
            "var/lib/dpkg", "var/lib/apt", "root/.cache")


def file_list(root: DebianRoot) -> set[str]:
    """Every file, directory and link in the root, but the volatile ones."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root.path):
        rel = os.path.relpath(dirpath, root.path)
        if any(rel == v or rel.startswith(v + "/") for v in VOLATILE):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            found.add(os.path.normpath(os.path.join("/", rel, name)))
    return found


# -- the service, as systemd would start it ------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` settings of a unit file (all sections), in order."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class Service:
    """The unit's ExecStart run inside a root as its User (no systemd in CI)."""

    def __init__(self, root: DebianRoot, unit: str, log_path: str) -> None:
        settings = unit_settings(root.read(unit))
        self.argv = shlex.split(settings["ExecStart"][-1])
        user, group = settings["User"][-1], settings["Group"][-1]
        env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": root.passwd(user)[2],
               "USER": user, "LOGNAME": user}
        for assignment in settings.get("Environment", []):
            for item in shlex.split(assignment):
                key, _, value = item.partition("=")
                env[key] = value
        self.log_path = log_path
        self.root = root
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(["chroot", f"--userspec={user}:{group}", root.path, *self.argv],
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)

    def wait_for_port(self, port: int, timeout: float = 60) -> None:
        try:
            wait_for_port("127.0.0.1", port, self.process, timeout)
        except RuntimeError as e:
            raise AssertionError(f"{shlex.join(self.argv)}: {e}:\n{self.output()}") from None

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def set_listen(root: DebianRoot, port: int) -> None:
    """Point the installed config at a free loopback port (the operator's edit)."""
    text = root.read("/etc/registryd/registryd.toml")
    text, count = re.subn(r"^listen\s*=.*$", f'listen = ["tcp:{port}:interface=127.0.0.1"]', text, flags=re.M)
    assert count == 1, "the packaged config has no top-level listen line"
    root.write("/etc/registryd/registryd.toml", text)


# -- images, with skopeo from outside the root ---------------------------------

class Skopeo:
    """skopeo with its whole configuration in a temporary folder."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        home = os.path.join(workdir, "home")
        os.makedirs(os.path.join(home, ".config", "containers"), exist_ok=True)
        for sub in ("tmp", "registries.d", "certs.d", "data", "run"):
            os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        open(os.path.join(home, ".config", "containers", "registries.conf"), "w").close()
        self.policy = os.path.join(workdir, "policy.json")
        with open(self.policy, "w") as f:
            json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
        self.env = {"PATH": CLEAN_PATH, "HOME": home, "LANG": "C.UTF-8",
                    "XDG_CONFIG_HOME": os.path.join(home, ".config"),
                    "XDG_DATA_HOME": os.path.join(workdir, "data"),
                    "XDG_RUNTIME_DIR": os.path.join(workdir, "run"),
                    "REGISTRY_AUTH_FILE": os.path.join(workdir, "auth.json"),
                    "_CONTAINERS_ROOTLESS_UID": "1000"}
        with open(self.env["REGISTRY_AUTH_FILE"], "w") as f:
            json.dump({"auths": {}}, f)

    def __call__(self, *args: str) -> str:
        cmd = [need_tool("skopeo"), "--policy", self.policy, "--tmpdir", os.path.join(self.workdir, "tmp"),
               "--registries.d", os.path.join(self.workdir, "registries.d"), *args]
        return run(cmd, env=self.env, timeout=180).stdout

    # --preserve-digests: the layers go and come back as they are (skopeo
    # would otherwise compress them on the way), so bytes can be compared.
    def push(self, layout: str, tag: str, ref: str) -> None:
        self("copy", "--preserve-digests", "--dest-tls-verify=false",
             "--dest-cert-dir", os.path.join(self.workdir, "certs.d"), f"oci:{layout}:{tag}", ref)

    def pull(self, ref: str, layout: str, tag: str) -> None:
        self("copy", "--preserve-digests", "--dest-oci-accept-uncompressed-layers", "--src-tls-verify=false",
             "--src-cert-dir", os.path.join(self.workdir, "certs.d"), ref, f"oci:{layout}:{tag}")

    def manifest(self, ref: str) -> bytes:
        return self("inspect", "--tls-verify=false", "--raw", ref).encode()

    def registries_conf(self, text: str) -> None:
        """What containers-registries.conf(5) says: skopeo reads it like
        podman and cri-o do (the same containers/image library)."""
        with open(os.path.join(self.env["HOME"], ".config", "containers", "registries.conf"), "w") as f:
            f.write(text)


# README, "Install as a service": how users are added to the packaged htpasswd.
HTPASSWD_COMMAND = "registryd htpasswd --password-stdin /etc/registryd/htpasswd {user}"

# README, "Install as a service": the packaged registry speaks plain HTTP, and
# this is how podman, cri-o and skopeo are told so
# (/etc/containers/registries.conf.d/registryd.conf).
REGISTRIES_CONF = """\
[[registry]]
location = "{host}"
insecure = true
"""


def make_image(path: str, tag: str) -> dict[str, Any]:
    """A small OCI layout (two layers), made with benchmarks/tools/mkimage.py."""
    assert os.path.exists(MKIMAGE), f"{MKIMAGE} is missing"
    out = run([sys.executable, MKIMAGE, path, tag, "64K", "300K"]).stdout
    return json.loads(out.strip().splitlines()[-1])


def layout_blobs(path: str) -> dict[str, bytes]:
    blobs = {}
    for blob in glob.glob(os.path.join(path, "blobs", "sha256", "*")):
        with open(blob, "rb") as f:
            blobs[os.path.basename(blob)] = f.read()
    return blobs


def assert_image_served(skopeo: Skopeo, ref: str, image: dict[str, Any], layout: str, workdir: str) -> None:
    """The registry gives back exactly the manifest and blobs that were pushed."""
    manifest = skopeo.manifest(ref)
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image["manifest"]
    pulled = os.path.join(workdir, f"pulled-{time.monotonic_ns()}")
    skopeo.pull(ref, pulled, "pulled")
    assert layout_blobs(pulled) == layout_blobs(layout)


# -- fixtures (one build and one debootstrap per test session) ------------------

def repo_entries() -> set[str]:
    """Top-level entries and everything under packaging/ and scripts/, but for what the tests
    themselves write while the build runs (caches, and test-artifacts/: the browser test's
    screenshots)."""
    entries = {e for e in os.listdir(ROOT) if e not in ("__pycache__", ".pytest_cache", "test-artifacts")}
    for folder in ("packaging", "scripts"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            entries |= {os.path.relpath(os.path.join(dirpath, n), ROOT) for n in dirnames + filenames}
    return entries


def build(kind: str, out: str, version: str | None = None) -> str:
    for tool in ("dpkg-buildpackage", "dh_virtualenv", "rpmbuild"):
        need_tool(tool)
    cmd = [sys.executable, BUILD_SCRIPT, kind, "--out", out] + (["--version", version] if version else [])
    result = run(cmd, timeout=900)
    return result.stdout


def build_current(out: str) -> dict[str, Any]:
    """Both packages of the tree's version, timed, with the tree listed before and after."""
    before = repo_entries()
    started = time.monotonic()
    build("all", out)
    seconds = time.monotonic() - started
    debs = glob.glob(os.path.join(out, "registryd_*.deb"))
    rpms = glob.glob(os.path.join(out, "registryd-*.rpm"))
    assert len(debs) == 1 and len(rpms) == 1, os.listdir(out)
    return {"deb": debs[0], "rpm": rpms[0], "seconds": seconds, "out": out,
            "repo_before": before, "repo_after": repo_entries()}


def build_next(out: str, current: Future[dict[str, Any]]) -> str:
    """The .deb of the next version, built from the same tree (left unchanged), after the
    tree's own build (so that build's time is its own)."""
    current.result()
    build("deb", out, next_version(VERSION))
    debs = glob.glob(os.path.join(out, "registryd_*.deb"))
    assert len(debs) == 1, os.listdir(out)
    return debs[0]


def bootstrap(path: str) -> DebianRoot:
    """debootstrap --variant=minbase, with the host's apt and pip settings and systemd
    (for systemd-analyze --root), beside the tree's build (mostly downloads and unpacking);
    the .deb's dependencies come once it is built."""
    run(["debootstrap", "--variant=minbase", SUITE, path, host_debian_mirror()], timeout=900)
    root = DebianRoot(path)
    copy_host_settings(root)
    root.run("apt-get", "update", "-q", timeout=600)
    root.apt_install("--no-install-recommends", "systemd")
    return root


@pytest.fixture(scope="session")
def background(request: Any, tmp_path_factory: Any) -> Iterator[dict[str, Future[Any]]]:
    """The session's builds and debootstrap, in threads, started as soon as a test needs one:
    the tree's two packages (build-packages all builds both at once: one core each, and
    timed) beside the debootstrap, then the next version's .deb and lintian, while the tests
    of the built packages run. Only what the selected tests use is started."""
    needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    jobs: dict[str, Future[Any]] = {}
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="packaging") as pool:
        jobs["packages"] = pool.submit(build_current, str(tmp_path_factory.mktemp("packages")))
        if "lintian_report" in needed:
            jobs["lintian"] = pool.submit(lintian, jobs["packages"])
        if "next_deb" in needed:
            jobs["next_deb"] = pool.submit(build_next, str(tmp_path_factory.mktemp("next")), jobs["packages"])
        if "base_root" in needed and os.geteuid() == 0 and shutil.which("debootstrap"):
            jobs["root"] = pool.submit(bootstrap, str(tmp_path_factory.mktemp("debootstrap") / SUITE))
        try:
            yield jobs
        finally:
            for job in jobs.values():
                job.cancel()


def lintian(built: Future[Any]) -> subprocess.CompletedProcess[str]:
    """lintian's report on the .deb (about 90 s of one core: it runs beside the debootstrap)."""
    return run([need_tool("lintian"), "--no-tag-display-limit", built.result()["deb"]], check=False, timeout=600)


@pytest.fixture(scope="session")
def lintian_report(background: dict[str, Future[Any]]) -> subprocess.CompletedProcess[str]:
    return background["lintian"].result()


@pytest.fixture(scope="session")
def packages(background: dict[str, Future[Any]]) -> dict[str, Any]:
    """Both packages of the tree's version, built once per test session."""
    return background["packages"].result()


@pytest.fixture(scope="session")
def next_deb(background: dict[str, Future[Any]]) -> str:
    """The .deb of the next version, built from the same tree (left unchanged)."""
    return background["next_deb"].result()


@pytest.fixture(scope="session")
def base_root(background: dict[str, Future[Any]], packages: dict[str, Any]) -> Iterator[DebianRoot]:
    """The debootstrapped root with the .deb's dependencies installed, so that each
    test starts from a copy of it."""
    assert os.geteuid() == 0, "the install tests need root (debootstrap, chroot)"
    need_tool("debootstrap")
    root = background["root"].result()
    depends = run(["dpkg-deb", "-f", packages["deb"], "Depends"]).stdout.strip()
    root.run("apt-get", "satisfy", "-y", "-q", depends, timeout=900)
    root.run("apt-get", "clean")
    yield root
    shutil.rmtree(root.path, ignore_errors=True)


@pytest.fixture
def debian_root(base_root: DebianRoot, tmp_path: Any) -> Iterator[DebianRoot]:
    """A fresh copy of the session's Debian root for one test."""
    root = base_root.clone(str(tmp_path / "root"))
    yield root
    shutil.rmtree(root.path, ignore_errors=True)


def install_deb(root: DebianRoot, deb: str) -> None:
    inside = root.copy_in(deb)
    root.apt_install(inside)
    os.unlink(root / inside)


def start_deb_service(root: DebianRoot, tmp_path: Any, port: int) -> Service:
    service = Service(root, "/lib/systemd/system/registryd.service", str(tmp_path / f"service-{port}.log"))
    try:
        service.wait_for_port(port)
    except BaseException:
        service.stop()
        raise
    return service


# -- versions --------------------------------------------------------------------

def test_versions_agree() -> None:
    """__version__, the debian changelog and the spec say the same version."""
    assert build_packages.version_problems(ROOT) == []
    changelog = os.path.join(ROOT, "packaging", "deb", "debian", "changelog")
    deb_version = run([need_tool("dpkg-parsechangelog"), "-l", changelog, "-S", "Version"]).stdout.strip()
    assert re.fullmatch(re.escape(UPSTREAM) + r"-\d+", deb_version), deb_version
    spec = os.path.join(ROOT, "packaging", "rpm", "registryd.spec")
    rpm_version = run([need_tool("rpmspec"), "-q", "--srpm", "--qf", "%{VERSION}", spec]).stdout.strip()
    assert rpm_version == UPSTREAM


def test_version_drift_is_caught(tmp_path: Any) -> None:
    """The check above fails when one place is bumped alone, and set-version
    brings all three along."""
    tree = str(tmp_path / "tree")
    for rel in (build_packages.INIT, build_packages.CHANGELOG, build_packages.SPEC):
        os.makedirs(os.path.dirname(os.path.join(tree, rel)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), os.path.join(tree, rel))
    init = os.path.join(tree, build_packages.INIT)
    text = open(init).read()
    open(init, "w").write(re.sub(r'__version__ = .*', '__version__ = "9.9.9"', text))
    assert len(build_packages.version_problems(tree)) == 2
    run([sys.executable, BUILD_SCRIPT, "set-version", "9.9.9rc1", "--tree", tree])
    assert build_packages.version_problems(tree) == []
    assert build_packages.changelog_version(tree) == "9.9.9~rc1-1"
    assert build_packages.spec_version(tree) == "9.9.9~rc1"


def test_packaged_config_is_valid() -> None:
    """The config the packages install loads, and stores where the unit allows."""
    from registryd.config import load_config

    config = load_config(PACKAGED_CONFIG)
    assert config.data_dir == "/var/lib/registryd"
    assert config.listen == ("tcp:5000",)


# -- the .deb ----------------------------------------------------------------------

def test_deb_builds_within_budget_and_leaves_the_tree_alone(packages: dict[str, Any]) -> None:
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    assert os.path.basename(packages["deb"]) == f"registryd_{UPSTREAM}-1_{arch}.deb"
    assert packages["seconds"] < BUILD_BUDGET, f"both packages took {packages['seconds']:.0f} s"
    assert packages["repo_after"] == packages["repo_before"]


def test_deb_contents(packages: dict[str, Any]) -> None:
    deb = packages["deb"]
    listing = run(["dpkg-deb", "-c", deb]).stdout
    # "perms owner/group size date time ./path[ -> target]"; folders end in /.
    paths = {line.split(maxsplit=5)[5].split(" -> ")[0].lstrip(".").rstrip("/")
             for line in listing.splitlines()}
    site = fnmatch.filter(paths, f"{DEB_VENV}/lib/python3.*/site-packages")
    assert len(site) == 1, "one site-packages in the venv"
    site_packages = site[0]
    expected = {
        f"{DEB_VENV}/bin/twistd", f"{DEB_VENV}/bin/registryd", "/usr/bin/registryd",
        "/lib/systemd/system/registryd.service", "/etc/registryd/registryd.toml",
        "/etc/registryd/htpasswd", "/var/lib/registryd",
        f"{site_packages}/twisted/plugins/registryd_plugin.py",
        "/usr/share/doc/registryd/examples/low-port.conf",
        "/usr/share/doc/registryd/examples/registryd.toml",
    }
    assert expected - paths == set()
    # Every module of the source tree is in the package (a subpackage left
    # out of setup.cfg's packages would be missing here).
    modules = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "registryd", "**", "*.py"), recursive=True)}
    assert {m for m in modules if f"{site_packages}/{m}" not in paths} == set()
    # Byte code and the plugin cache are written on the target, not shipped.
    assert not [p for p in paths if "__pycache__" in p or p.endswith(("dropin.cache", ".pyc"))]
    # The venv names its install path, never the build directory.
    workdir = os.path.join(packages["out"], "contents")
    run(["dpkg-deb", "-x", deb, workdir])
    with open(os.path.join(workdir, DEB_VENV.lstrip("/"), "bin", "twistd")) as f:
        assert f.readline() == f"#!{DEB_VENV}/bin/python\n"
    assert os.readlink(os.path.join(workdir, DEB_VENV.lstrip("/"), "bin", "python3")) == "/usr/bin/python3"
    grep = run(["grep", "-rl", "/tmp/registryd-deb-", workdir], check=False)
    shutil.rmtree(workdir)
    assert grep.stdout == ""

    control = os.path.join(packages["out"], "control")
    run(["dpkg-deb", "-e", deb, control])
    with open(os.path.join(control, "conffiles")) as f:
        assert sorted(f.read().split()) == ["/etc/registryd/htpasswd", "/etc/registryd/registryd.toml"]
    # The venv works with the minor version of Debian's python3 it was built with.
    depends = run(["dpkg-deb", "-f", deb, "Depends"]).stdout
    major, minor = run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"]).stdout.split()
    assert f"python3 (>= {major}.{minor}~), python3 (<< {major}.{int(minor) + 1}~)" in depends, depends
    assert "adduser" in depends


def test_deb_unit_is_the_repository_unit(packages: dict[str, Any]) -> None:
    workdir = os.path.join(packages["out"], "unit")
    run(["dpkg-deb", "-x", packages["deb"], workdir])
    with open(os.path.join(workdir, "lib/systemd/system/registryd.service")) as f, open(UNIT_SOURCE) as g:
        installed, source = f.read(), g.read()
    shutil.rmtree(workdir)
    assert installed == source
    settings = unit_settings(source)
    assert settings["ExecStart"] == [EXEC_START.format(venv=DEB_VENV)]
    assert settings["User"] == ["registryd"] and settings["Group"] == ["registryd"]
    assert settings["Restart"] == ["on-failure"]
    for key, value in [("ProtectSystem", "strict"), ("ReadWritePaths", "/var/lib/registryd"),
                       ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("CapabilityBoundingSet", ""),
                       ("AmbientCapabilities", "")]:
        assert settings[key] == [value], key


def test_deb_installs_runs_and_serves_images(debian_root: DebianRoot, packages: dict[str, Any], tmp_path: Any) -> None:
    """apt installs the .deb; its ExecStart, run as registryd, takes a push
    and a pull from skopeo outside the root."""
    root = debian_root
    install_deb(root, packages["deb"])

    uid, gid, home, shell = root.passwd("registryd")
    assert gid == root.group_id("registryd") and uid < 1000, "a system user"
    assert (home, shell) == ("/var/lib/registryd", "/usr/sbin/nologin")
    for path, owner, group, mode in [("/var/lib/registryd", uid, gid, 0o750),
                                     ("/etc/registryd", 0, gid, 0o750),
                                     ("/etc/registryd/registryd.toml", 0, gid, 0o640),
                                     ("/etc/registryd/htpasswd", 0, gid, 0o640)]:
        st = os.stat(root / path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (owner, group, mode), path
    with open(PACKAGED_CONFIG) as f:
        assert root.read("/etc/registryd/registryd.toml") == f.read()

    assert root.run("registryd", "--version").stdout.strip() == f"registryd {VERSION}"
    # README: users go into the packaged htpasswd with the admin command; the
    # file stays root:registryd 0640, readable by the service.
    root.run("sh", "-c", f"echo s3cret | {HTPASSWD_COMMAND.format(user='alice')}")
    st = os.stat(root / "/etc/registryd/htpasswd")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o640)
    assert root.run("cat", "/etc/registryd/htpasswd", user="registryd:registryd").stdout.startswith("alice:$2")
    # The plugin cache was written as root; the service user lists the plugin.
    help_text = root.run(f"{DEB_VENV}/bin/twistd", "--help", user="registryd:registryd").stdout
    assert re.search(r"^\s+registryd\s", help_text, re.M), help_text
    assert glob.glob(root / f"{DEB_VENV}/lib/python3.*/site-packages/twisted/plugins/dropin.cache")

    port = free_port()
    set_listen(root, port)
    service = start_deb_service(root, tmp_path, port)
    try:
        layout = str(tmp_path / "image")
        image = make_image(layout, "v1")
        skopeo = Skopeo(str(tmp_path / "skopeo"))
        ref = f"docker://127.0.0.1:{port}/packaging/hello:v1"
        skopeo.push(layout, "v1", ref)
        assert_image_served(skopeo, ref, image, layout, str(tmp_path))
        # Without --tls-verify=false: refused until registries.conf says
        # the registry is insecure (plain HTTP), then served.
        plain = run([need_tool("skopeo"), "--policy", skopeo.policy, "inspect", "--raw", ref],
                    env=skopeo.env, check=False, timeout=120)
        assert plain.returncode != 0
        skopeo.registries_conf(REGISTRIES_CONF.format(host=f"127.0.0.1:{port}"))
        manifest = skopeo("inspect", "--raw", ref).encode()
        assert "sha256:" + hashlib.sha256(manifest).hexdigest() == image["manifest"]
    finally:
        service.stop()
    # What the service wrote belongs to it, under its data directory.
    blob = image["layers"][0].split(":")[1]
    path = root / f"/var/lib/registryd/blobs/sha256/{blob[:2]}/{blob}"
    assert os.stat(path).st_uid == uid


def test_deb_purge_leaves_nothing_behind(debian_root: DebianRoot, packages: dict[str, Any], tmp_path: Any) -> None:
    """After use (data pushed, byte code and plugin cache written) and
    purge, the root holds the same files as before the install."""
    root = debian_root
    before = file_list(root)
    install_deb(root, packages["deb"])
    # postinst's byte code: plain, and without docstrings for the workers (python -OO).
    pyc = sorted(glob.glob(root / f"{DEB_VENV}/lib/python3.*/site-packages/registryd/__pycache__/tap.*.pyc"))
    assert [os.path.basename(p).split(".", 2)[2] for p in pyc] == ["opt-2.pyc", "pyc"], pyc
    port = free_port()
    set_listen(root, port)
    service = start_deb_service(root, tmp_path, port)
    try:
        layout = str(tmp_path / "image")
        make_image(layout, "v1")
        Skopeo(str(tmp_path / "skopeo")).push(layout, "v1", f"docker://127.0.0.1:{port}/packaging/purge:v1")
    finally:
        service.stop()
    root.write("/etc/registryd/tls.pem", "an operator's own file\n")
    root.run("apt-get", "purge", "-y", "-q", "registryd")

    after = file_list(root)
    # The system user stays, as Debian packages leave theirs (files elsewhere
    # may still belong to it); shadow's backup files of the user databases
    # are what creating it leaves.
    user_db_backups = {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-"}
    assert after - before - user_db_backups == set()
    assert before - after == set()
    overrides = root.run("dpkg-statoverride", "--list", check=False)  # exits 1 when there are none
    assert "registryd" not in overrides.stdout


# -- the .rpm ------------------------------------------------------------------------

def test_rpm_lists_expected_files(packages: dict[str, Any]) -> None:
    rpm = packages["rpm"]
    assert os.path.basename(rpm).startswith(f"registryd-{UPSTREAM}-1")
    query = run([need_tool("rpm"), "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE}", rpm]).stdout
    assert query.split()[:2] == ["registryd", UPSTREAM]
    files = set(run(["rpm", "-qlp", rpm]).stdout.split())
    site = [p for p in files if re.fullmatch(rf"{RPM_VENV}/lib/python3\.\d+/site-packages", p)]
    assert len(site) == 1
    expected = {
        f"{RPM_VENV}/bin/twistd", f"{RPM_VENV}/bin/registryd", f"{RPM_VENV}/bin/python",
        "/usr/bin/registryd", "/usr/lib/systemd/system/registryd.service",
        "/usr/lib/sysusers.d/registryd.conf",
        "/etc/registryd", "/etc/registryd/registryd.toml", "/etc/registryd/htpasswd", "/var/lib/registryd",
        f"{site[0]}/twisted/plugins/registryd_plugin.py", f"{site[0]}/twisted/plugins/dropin.cache",
        "/usr/share/doc/registryd/examples/low-port.conf",
    }
    assert expected - files == set()
    modules = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "registryd", "**", "*.py"), recursive=True)}
    assert {m for m in modules if f"{site[0]}/{m}" not in files} == set()
    configs = set(run(["rpm", "-qcp", rpm]).stdout.split())
    assert configs == {"/etc/registryd/registryd.toml", "/etc/registryd/htpasswd"}
    # path size mode ... owner group isconfig isdoc rdev symlink
    dump = {line.split()[0]: line.split() for line in run(["rpm", "-qp", "--dump", rpm]).stdout.splitlines()}
    assert dump["/etc/registryd/registryd.toml"][4][-4:] == "0640"
    assert dump["/etc/registryd/registryd.toml"][5:8] == ["root", "registryd", "1"]
    assert dump["/var/lib/registryd"][5:7] == ["registryd", "registryd"]
    scripts = run(["rpm", "-qp", "--scripts", rpm]).stdout
    assert "useradd" in scripts.split("postinstall scriptlet")[0]
    assert "getPlugins" in scripts
    # Our byte code carries the installed paths, never the build root.
    pyc = [p for p in files if p.startswith(f"{site[0]}/registryd/") and p.endswith(".pyc")]
    assert pyc, "the rpm ships byte code for registryd"


@pytest.fixture(scope="session")
def rpm_unpacked(packages: dict[str, Any], tmp_path_factory: Any) -> Iterator[str]:
    """rpm -i --nodeps --noscripts --root into an empty folder: there is no
    shell in it for scriptlets, so they are left out (the test below runs
    them in a Debian root)."""
    root = str(tmp_path_factory.mktemp("rpmroot"))
    run([need_tool("rpm"), "--root", root, "--initdb"])
    run(["rpm", "-i", "--nodeps", "--noscripts", "--root", root, packages["rpm"]])
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_rpm_unit_is_the_repository_unit(rpm_unpacked: str) -> None:
    with open(os.path.join(rpm_unpacked, "usr/lib/systemd/system/registryd.service")) as f, open(UNIT_SOURCE) as g:
        assert f.read() == g.read().replace(DEB_VENV, RPM_VENV)


def test_rpm_byte_code_names_installed_paths(rpm_unpacked: str) -> None:
    venv = os.path.join(rpm_unpacked, RPM_VENV.lstrip("/"))
    assert run(["grep", "-rl", "rpmbuild/BUILD", venv], check=False).stdout == ""
    pyc = sorted(glob.glob(os.path.join(venv, "lib/python3.*/site-packages/registryd/__pycache__/tap.*.pyc")))
    # Plain, and without docstrings for the workers (python -OO).
    assert [os.path.basename(p).split(".", 2)[2] for p in pyc] == ["opt-2.pyc", "pyc"], pyc
    for path in pyc:
        with open(path, "rb") as f:
            code = f.read()
        assert int.from_bytes(code[4:8], "little") == 0b11, "hash-checked byte code"
        assert f"{RPM_VENV}/lib/".encode() in code


def test_rpm_unpacks_and_twistd_lists_the_plugin(rpm_unpacked: str) -> None:
    assert os.readlink(os.path.join(rpm_unpacked, "usr/bin/registryd")) == f"{RPM_VENV}/bin/registryd"
    venv = os.path.join(rpm_unpacked, RPM_VENV.lstrip("/"))
    # The venv's python is the system python3 (the host's, outside a chroot).
    python = os.path.join(venv, "bin", "python")
    help_text = run([python, os.path.join(venv, "bin", "twistd"), "--help"]).stdout
    assert re.search(r"^\s+registryd\s", help_text, re.M), help_text
    version = run([python, os.path.join(venv, "bin", "registryd"), "--version"]).stdout.strip()
    assert version == f"registryd {VERSION}"


def test_rpm_installs_with_scriptlets_and_serves(debian_root: DebianRoot, packages: dict[str, Any], tmp_path: Any) -> None:
    """rpm -i --nodeps --root into the Debian root, scriptlets included
    (%pre creates the user, %post writes the plugin cache); its unit's
    ExecStart serves; rpm -e takes the venv away."""
    root = debian_root
    run([need_tool("rpm"), "--root", root.path, "--initdb"])
    run(["rpm", "-i", "--nodeps", "--root", root.path, packages["rpm"]])
    uid, gid, home, _ = root.passwd("registryd")
    assert home == "/var/lib/registryd" and uid < 1000
    st = os.stat(root / "/etc/registryd/registryd.toml")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, gid, 0o640)
    assert os.stat(root / "/var/lib/registryd").st_uid == uid
    assert glob.glob(root / f"{RPM_VENV}/lib/python3.*/site-packages/twisted/plugins/dropin.cache")
    help_text = root.run(f"{RPM_VENV}/bin/twistd", "--help", user="registryd:registryd").stdout
    assert re.search(r"^\s+registryd\s", help_text, re.M), help_text
    assert root.run("registryd", "--version").stdout.strip() == f"registryd {VERSION}"

    port = free_port()
    set_listen(root, port)
    service = Service(root, "/usr/lib/systemd/system/registryd.service", str(tmp_path / "rpm-service.log"))
    try:
        service.wait_for_port(port)
        layout = str(tmp_path / "image")
        image = make_image(layout, "v1")
        skopeo = Skopeo(str(tmp_path / "skopeo"))
        ref = f"docker://127.0.0.1:{port}/packaging/rpm:v1"
        skopeo.push(layout, "v1", ref)
        assert_image_served(skopeo, ref, image, layout, str(tmp_path))
    finally:
        service.stop()

    run(["rpm", "-e", "--nodeps", "--root", root.path, "registryd"])
    for path in (RPM_VENV, "/usr/bin/registryd", "/usr/lib/systemd/system/registryd.service"):
        assert not os.path.lexists(root / path), path
    # The edited config is kept as .rpmsave; data stays (rpm -e does not purge).
    assert os.path.exists(root / "/etc/registryd/registryd.toml.rpmsave")


# -- the unit ----------------------------------------------------------------------

def test_systemd_analyze_verify(debian_root: DebianRoot, packages: dict[str, Any]) -> None:
    """systemd-analyze verify, on the unit as installed by each package.

    Without a running systemd, verify still loads the unit, its
    dependencies and drop-ins, and checks that ExecStart is executable;
    --root makes it do so inside the installed root, which has the venv
    and systemd's own units (sysinit.target, ...).
    """
    analyze = need_tool("systemd-analyze")
    root = debian_root
    install_deb(root, packages["deb"])

    def verify(unit: str) -> None:
        result = run([analyze, "verify", f"--root={root.path}", unit], check=False, cwd=root.path)
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), unit

    verify("/lib/systemd/system/registryd.service")
    # The drop-in documented for ports below 1024 is valid too.
    dropins = root / "/etc/systemd/system/registryd.service.d"
    os.makedirs(dropins)
    shutil.copy(root / "/usr/share/doc/registryd/examples/low-port.conf", dropins)
    verify("/lib/systemd/system/registryd.service")
    shutil.rmtree(dropins)
    # The rpm's unit: the same file with its own venv path, checked the same
    # way once the rpm is unpacked over it (/lib is /usr/lib in bookworm).
    run(["rpm", "--root", root.path, "--initdb"])
    run(["rpm", "-i", "--nodeps", "--noscripts", "--replacefiles", "--root", root.path, packages["rpm"]])
    assert f"ExecStart={RPM_VENV}/bin/twistd " in root.read("/usr/lib/systemd/system/registryd.service")
    verify("/usr/lib/systemd/system/registryd.service")

    # And it is well hardened: systemd's own exposure score stays low.
    security = run([analyze, "security", f"--root={root.path}", "--offline=yes", "--threshold=25",
                    "registryd.service"], check=False)
    assert security.returncode == 0, security.stdout[-3000:]


# -- the unit under a real systemd ---------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every live descendant of pid, nearest first."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        found += children
        queue += children
    return found


def namespace_pids(pid: int) -> list[str]:
    """The process's PID in each PID namespace it is in, outermost first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return line.split()[1:]
    except OSError:
        pass
    return []


class BootedRoot:
    """The root booted with systemd-nspawn (host network, so loopback is shared).

    CI has no systemd as PID 1, but a container can have one: its systemd
    starts the enabled unit exactly as on a real machine, hardening and all.
    """

    def __init__(self, root: DebianRoot, log_path: str) -> None:
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [need_tool("systemd-nspawn"), "--quiet", "--directory", root.path, "--boot",
             "--register=no", "--keep-unit", "--console=pipe"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.init_pid = self._find_init()

    def _find_init(self, timeout: float = 30) -> int:
        """The container's PID 1, seen from here: nspawn's first child is an
        intermediate process that forks the init and exits, so a child counts
        only once it is PID 1 of its own namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"systemd-nspawn exited {self.process.returncode}"
            for pid in descendants(self.process.pid):
                if namespace_pids(pid)[-1:] == ["1"]:
                    return pid
            time.sleep(0.1)
        raise AssertionError("systemd-nspawn started no init")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["nsenter", "-t", str(self.init_pid), "-a", *cmd], check=check, timeout=120,
                   env={"PATH": CLEAN_PATH, "LANG": "C.UTF-8"})

    def wait_booted(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.run("systemctl", "is-system-running", check=False)
            state = answer.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        self.log.flush()
        with open(self.log.name, "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
        raise AssertionError(f"the container did not boot: {state!r} {answer.stderr.strip()!r}\n{tail}")

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # nspawn shuts the container down in order
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.log.close()


def free_low_port() -> int:
    for port in range(1023, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port below 1024")


def wait_active(booted: BootedRoot, port: int, timeout: float = 30) -> None:
    try:
        wait_for_port("127.0.0.1", port, timeout=timeout)
    except RuntimeError:
        journal = booted.run("journalctl", "-u", "registryd", "--no-pager", check=False).stdout
        raise AssertionError(f"registryd.service does not listen on {port}:\n{journal[-3000:]}") from None


def test_deb_service_under_systemd(debian_root: DebianRoot, packages: dict[str, Any], tmp_path: Any) -> None:
    """The installed unit, started by systemd at boot: it serves images with
    no capability at all, and a port below 1024 works only once the
    documented drop-in is in place."""
    root = debian_root
    install_deb(root, packages["deb"])
    assert os.path.islink(root / "/etc/systemd/system/multi-user.target.wants/registryd.service"), "enabled"
    port = free_port()
    set_listen(root, port)
    booted = BootedRoot(root, str(tmp_path / "nspawn.log"))
    try:
        booted.wait_booted()
        wait_active(booted, port)
        props = booted.show("registryd", "ActiveState", "User", "MainPID", "NRestarts")
        assert (props["ActiveState"], props["User"], props["NRestarts"]) == ("active", "registryd", "0")
        status = booted.run("cat", f"/proc/{props['MainPID']}/status").stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["CapEff"].strip() == fields["CapBnd"].strip() == "0000000000000000"
        assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"

        layout = str(tmp_path / "image")
        image = make_image(layout, "v1")
        skopeo = Skopeo(str(tmp_path / "skopeo"))
        ref = f"docker://127.0.0.1:{port}/packaging/systemd:v1"
        skopeo.push(layout, "v1", ref)
        assert_image_served(skopeo, ref, image, layout, str(tmp_path))

        # A port below 1024: refused without the drop-in...
        low = free_low_port()
        config = root.read("/etc/registryd/registryd.toml").replace(
            f'listen = ["tcp:{port}:interface=127.0.0.1"]',
            f'listen = ["tcp:{port}:interface=127.0.0.1", "tcp:{low}:interface=127.0.0.1"]')
        root.write("/etc/registryd/registryd.toml", config)
        booted.run("systemctl", "restart", "registryd", check=False)
        deadline = time.monotonic() + 30
        while "Permission denied" not in (journal := booted.run("journalctl", "-u", "registryd", "--no-pager").stdout):
            assert time.monotonic() < deadline, journal[-2000:]
            time.sleep(0.5)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", low)) != 0
        # ...and served with it.
        dropins = "/etc/systemd/system/registryd.service.d"
        booted.run("mkdir", "-p", dropins)
        booted.run("cp", "/usr/share/doc/registryd/examples/low-port.conf", dropins)
        booted.run("systemctl", "daemon-reload")
        booted.run("systemctl", "reset-failed", "registryd", check=False)
        booted.run("systemctl", "restart", "registryd")
        wait_active(booted, low)
        skopeo.manifest(f"docker://127.0.0.1:{low}/packaging/systemd:v1")
        main_pid = booted.show("registryd", "MainPID")["MainPID"]
        status = booted.run("cat", f"/proc/{main_pid}/status").stdout
        assert re.search(r"^CapEff:\t0000000000000400$", status, re.M), "CAP_NET_BIND_SERVICE only"
    finally:
        booted.stop()


# -- after the README's quick start as root (issue 21) ------------------------------

def http_status(*curl_args: str) -> int:
    """The status curl gets (000 when it got none)."""
    result = run([need_tool("curl"), "-s", "-o", "/dev/null", "-w", "%{http_code}", *curl_args], check=False,
                 timeout=60)
    return int(result.stdout or 0)


def test_deb_after_the_quick_start_as_root_starts_and_auth_takes_effect(
        debian_root: DebianRoot, packages: dict[str, Any], tmp_path: Any) -> None:
    """The quick start run as root leaves root-owned folders in /var/lib/registryd; the .deb
    installed after it still starts. Then the README's [auth] snippet and htpasswd command
    take effect: anonymous pushes are refused, the added user's are taken without a restart."""
    from readme_snippets import containing, in_section

    root = debian_root
    # README, "Quick start": the server part of its command, as root. It runs
    # here from the test's venv (the root has no build tools) with the data
    # directory it defaults to as root, inside the Debian root.
    quick_start = in_section("Quick start", "sh")[0].text.strip()
    server = quick_start.rsplit("&&", 1)[-1].split()
    assert server == [".venv/bin/twistd", "-n", "--pidfile=", "registryd"], quick_start
    assert os.geteuid() == 0
    port = free_port()
    data_dir = root / "/var/lib/registryd"
    first = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "twistd"), *server[1:],
                              "--data-dir", data_dir, "--listen", f"tcp:{port}:interface=127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while http_status(f"http://127.0.0.1:{port}/v2/") != 200:
            assert first.poll() is None and time.monotonic() < deadline, "the quick start did not serve"
            time.sleep(0.2)
    finally:
        first.terminate()
        first.wait(30)
    made = sorted(os.listdir(data_dir))
    assert {"blobs", "repositories", "tmp", "uploads"} <= set(made)
    assert all(os.stat(os.path.join(data_dir, name)).st_uid == 0 for name in made)

    install_deb(root, packages["deb"])
    uid, gid, _, _ = root.passwd("registryd")
    for dirpath, dirnames, filenames in os.walk(data_dir):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(name)
            assert (st.st_uid, st.st_gid) == (uid, gid), name
    port = free_port()
    set_listen(root, port)
    service = start_deb_service(root, tmp_path, port)
    upload = f"http://127.0.0.1:{port}/v2/packaging/auth/blobs/uploads/"
    try:
        assert http_status(f"http://127.0.0.1:{port}/readyz") == 200, service.output()
        assert http_status("-X", "POST", upload) == 202       # the packaged config: no authentication
    finally:
        service.stop()

    # README, "Install as a service": the [auth] snippet appended, a restart.
    snippet = containing("Install as a service", "toml", "[auth]").text
    root.write("/etc/registryd/registryd.toml", root.read("/etc/registryd/registryd.toml") + "\n" + snippet)
    service = start_deb_service(root, tmp_path, port)
    try:
        assert http_status("-X", "POST", upload) == 401
        assert http_status("-u", "alice:s3cret", "-X", "POST", upload) == 401
        root.run("sh", "-c", f"echo 's3cret' | {HTPASSWD_COMMAND.format(user='alice')}")
        deadline = time.monotonic() + 10       # the service notices the file's change by itself
        while http_status("-u", "alice:s3cret", "-X", "POST", upload) != 202:
            assert time.monotonic() < deadline, service.output()
            time.sleep(0.2)
        # One worker saw the change; each looks at the file at most once a second ([auth] htpasswd's
        # stat interval), so after that second every worker has alice.
        time.sleep(1.2)
        assert http_status("-u", "alice:s3cret", f"http://127.0.0.1:{port}/metrics") == 200
        assert http_status("-X", "POST", upload) == 401
    finally:
        service.stop()


# -- last: what waits on the background jobs that finish last (the next version's build, lintian),
# so that the tests above run meanwhile -------------------------------------------------

def test_deb_upgrade_keeps_images_and_edited_config(debian_root: DebianRoot, packages: dict[str, Any],
                                                    next_deb: str, tmp_path: Any) -> None:
    root = debian_root
    install_deb(root, packages["deb"])
    port = free_port()
    set_listen(root, port)
    service = start_deb_service(root, tmp_path, port)
    layout = str(tmp_path / "image")
    image = make_image(layout, "v1")
    skopeo = Skopeo(str(tmp_path / "skopeo"))
    ref = f"docker://127.0.0.1:{port}/packaging/upgrade:v1"
    try:
        skopeo.push(layout, "v1", ref)
    finally:
        service.stop()
    edited = root.read("/etc/registryd/registryd.toml").replace(
        "stall_timeout = 300", "# the operator was here\nstall_timeout = 301")
    assert "stall_timeout = 301" in edited
    root.write("/etc/registryd/registryd.toml", edited)

    install_deb(root, next_deb)

    new_version = next_version(VERSION)
    status = root.run("dpkg-query", "-W", "-f", "${Version} ${Status}", "registryd").stdout
    assert status == f"{build_packages.upstream_version(new_version)}-1 install ok installed"
    assert root.run("registryd", "--version").stdout.strip() == f"registryd {new_version}"
    assert root.read("/etc/registryd/registryd.toml") == edited
    assert not glob.glob(root / "/etc/registryd/*.dpkg-*")
    service = start_deb_service(root, tmp_path, port)  # the edited port: the kept config is in use
    try:
        assert_image_served(skopeo, ref, image, layout, str(tmp_path))
    finally:
        service.stop()


def test_lintian_finds_no_errors(lintian_report: subprocess.CompletedProcess[str]) -> None:
    result = lintian_report
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    errors = [t for t in tags if t.startswith("E: ")]
    print("lintian:\n" + "\n".join(tags))
    assert errors == [], "\n".join(errors)
    assert result.returncode == 0, result.stdout + result.stderr
