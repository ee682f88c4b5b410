"""End-to-end: the README's "Users, access and TLS" section, with real clients.

Every fenced snippet of that section runs as written: the TOML is the
registry's configuration file, the ``sh`` blocks run under ``sh -e``. Only
the host (``registry.example:5443`` -> this registry's address), the
directory (``/etc/registryd/`` -> a temporary one) and the TLS port (0, so
the kernel picks one) are substituted; the test adds a plain-HTTP listener
on loopback next to the README's TLS one.

``docker``, ``podman`` and ``skopeo`` in the client snippet are small
wrapper scripts that add only what isolates them from the host (the private
dockerd's socket, podman's private storage, skopeo's private policy) and
the certificate options for TLS. Then, over plain HTTP and over TLS:

* the snippet: docker, podman and skopeo log in (or pass ``--dest-creds``)
  and push as ``ci``;
* logged-in pulls with docker and podman, ``skopeo --src-creds``, and a
  ``ctr --user`` push (containerd retries after the 401 challenge);
* anonymous pulls with skopeo, podman, docker and ctr succeed, anonymous
  pushes with each are refused, and so is a wrong password.

Without the ``GET /v2/`` challenge the clients never send their
credentials and every push fails. Missing tools fail, never skip.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from typing import Any, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from conftest import ROOT, VENV_BIN, _start_in_process
from support.pki import issue, make_ca
from registryd.config import load_config

from . import oci_layout as oci
from .containerd_daemon import make_containerd  # noqa: F401  (fixture)
from .docker_daemon import DOCKER, make_dockerd  # noqa: F401  (fixture)
from .podman_cli import make_podman  # noqa: F401  (fixture)
from .skopeo_cli import Skopeo, find_skopeo

pytestmark = pytest.mark.timeout(240)

PASSWORD = "ci-Readme-Secret-7"
README_HOST = "registry.example:5443"
README_ETC = "/etc/registryd/"
SECTION = "## Users, access and TLS"


def readme_snippets(language: str) -> list[str]:
    """The ``language`` fenced blocks of the README's users/TLS section, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(rf"^```{language}\n(.*?)^```", text[start:end], re.S | re.M)


@attrs.frozen
class Node:
    registry: Any
    etc: str
    plain: str          # host:port of the loopback plain-HTTP listener
    tls: str            # host:port of the README's TLS listener
    cert_dir: str       # ca.crt for the clients


def run_sh(script: str, env: dict[str, str], cwd: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-ec", script], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def base_env() -> dict[str, str]:
    return {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "CI_PASSWORD": PASSWORD,
            "HOME": "/nonexistent"}


@pytest.fixture
def node(tmp_path: Any) -> Iterator[Node]:
    """registryd configured by the README's TOML, its user added by the README's htpasswd snippet."""
    etc = str(tmp_path / "etc")
    os.makedirs(os.path.join(etc, "tls"))
    ca = make_ca("readme e2e CA")
    server = issue(ca, "registryd", hosts=["127.0.0.1", "localhost"])
    with open(os.path.join(etc, "tls", "fullchain.pem"), "wb") as f:
        f.write(server.cert_pem())
    with open(os.path.join(etc, "tls", "key.pem"), "wb") as f:
        f.write(server.key_pem())
    cert_dir = str(tmp_path / "certs")
    os.makedirs(cert_dir)
    with open(os.path.join(cert_dir, "ca.crt"), "wb") as f:
        f.write(ca.cert_pem())

    [add_user] = readme_snippets("sh")[:1]
    assert "registryd htpasswd" in add_user, add_user
    done = run_sh(add_user.replace(README_ETC, etc + "/"), base_env(), str(tmp_path))
    assert done.returncode == 0, f"{add_user}\n{done.stdout}{done.stderr}"

    [toml] = readme_snippets("toml")
    assert 'endpoint = "tcp:5443"' in toml and README_ETC in toml, toml
    config_text = (f'data_dir = "{tmp_path / "data"}"\n'
                   + toml.replace(README_ETC, etc + "/").replace('"tcp:5443"', '"tcp:0:interface=127.0.0.1"')
                   + '\n[[listen]]\nendpoint = "tcp:0:interface=127.0.0.1"\n')
    path = tmp_path / "registryd.toml"
    path.write_text(config_text)
    service = _start_in_process(load_config(str(path)))
    tls_port, plain_port = (port.getHost().port for port in service.ports)
    yield Node(service, etc, f"127.0.0.1:{plain_port}", f"127.0.0.1:{tls_port}", cert_dir)
    pytest_twisted.blockon(service.stopService())


def wrapper(path: str, exports: dict[str, str], body: str) -> None:
    lines = ["#!/bin/sh"] + [f"export {key}={shlex.quote(value)}" for key, value in exports.items()] + [body]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)


def q(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def hosts_dir(directory: Any, host: str, cert_dir: str) -> str:
    """A containerd hosts directory reaching ``host`` over https with our CA
    (ctr talks plain HTTP to 127.0.0.1 unless told otherwise)."""
    os.makedirs(os.path.join(directory, host))
    with open(os.path.join(directory, host, "hosts.toml"), "w") as f:
        f.write(f'server = "https://{host}"\n\n[host."https://{host}"]\n'
                f'  capabilities = ["pull", "resolve", "push"]\n  ca = "{os.path.join(cert_dir, "ca.crt")}"\n')
    return str(directory)


def refused(result: Any, what: str) -> None:
    text = (getattr(result, "stdout", "") or "") + (getattr(result, "stderr", "") or "")
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    assert result.returncode != 0, f"{what} succeeded:\n{text}"
    assert re.search(r"unauthorized|authentication required|401", text, re.I), f"{what}:\n{text}"


async def check_clients(node: Node, tls: bool, tmp_path: Any, make_dockerd: Any, make_containerd: Any,
                        make_podman: Any) -> None:
    host = node.tls if tls else node.plain
    work = tmp_path / "work"
    work.mkdir()
    layout = oci.OCILayout(work / "app")
    image = oci.make_image(oci.sample_layers("readme-e2e", 1, sizes=[4096]))
    layout.add_image(image, tag="1")
    ref = f"{host}/team/app:1"

    skopeo = Skopeo(tmp_path / "skopeo")
    find_skopeo()
    verify = ["--src-cert-dir", node.cert_dir, "--dest-cert-dir", node.cert_dir] if tls else \
        ["--src-tls-verify=false", "--dest-tls-verify=false"]
    podman = make_podman(() if tls else (host,))
    docker = await make_dockerd()
    ctrd = await make_containerd()

    # docker and podman need the image locally for the README's "push"
    archive = str(work / "app.tar")
    await skopeo.run("copy", f"oci:{layout.root}:1", f"docker-archive:{archive}:{ref}")
    await docker.docker("load", "-i", archive)
    await podman.run("pull", f"docker-archive:{archive}")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper(str(bin_dir / "docker"), {"DOCKER_CONFIG": docker.client_env["DOCKER_CONFIG"]},
            f'exec {DOCKER} -H {shlex.quote(docker.host)} "$@"')
    podman_certs = f"--cert-dir {shlex.quote(node.cert_dir)} " if tls else ""
    wrapper(str(bin_dir / "podman"), podman.env,
            'sub="$1"; shift\n'
            f'case "$sub" in push|pull) set -- --signature-policy {shlex.quote(podman.policy)} {podman_certs}"$@";;\n'
            f'  login) set -- {podman_certs}"$@";; esac\n'
            f'exec {q(podman.argv()[:1] + podman.global_args)} "$sub" "$@"')
    wrapper(str(bin_dir / "skopeo"), skopeo.env,
            'sub="$1"; shift\n'
            f'[ "$sub" = copy ] && set -- {q(verify)} "$@"\n'
            f'exec {q([find_skopeo(), *skopeo.global_args])} "$sub" "$@"')

    # -- the README's client snippet, as written ------------------------------
    snippet = readme_snippets("sh")[1]
    assert "docker login" in snippet and "podman login" in snippet and "--dest-creds" in snippet, snippet
    env = {**base_env(), "PATH": f"{bin_dir}:{base_env()['PATH']}"}
    done = await deferToThread(run_sh, snippet.replace(README_HOST, host), env, str(work))
    assert done.returncode == 0, f"the README's snippet failed on {host}:\n{snippet}\n{done.stdout}{done.stderr}"
    pulled = await skopeo.run("inspect", "--raw", *(["--cert-dir", node.cert_dir] if tls else ["--tls-verify=false"]),
                              f"docker://{ref}")
    assert pulled.stdout == image.manifest.data

    # -- logged in: pulls, and containerd retrying with --user after a 401 ---
    await docker.docker("rmi", ref)
    await docker.docker("pull", ref)
    await podman.run("rmi", "-f", ref)
    await podman.run("pull", *(["--cert-dir", node.cert_dir] if tls else []), ref)
    await skopeo.run("copy", *verify, "--src-creds", f"ci:{PASSWORD}", f"docker://{ref}", f"oci:{work / 'creds'}:1")
    ctr_tls = ["--hosts-dir", hosts_dir(tmp_path / "hosts.d", host, node.cert_dir)] if tls else ["--plain-http"]
    await ctrd.ctr("images", "pull", *ctr_tls, ref)
    await ctrd.ctr("images", "push", *ctr_tls, "--user", f"ci:{PASSWORD}", f"{host}/team/ctr:1", ref)

    # -- anonymous: pulls of what everyone may pull succeed ---------------------
    await docker.docker("logout", host)
    await docker.docker("rmi", ref)
    await docker.docker("pull", ref)
    await podman.run("logout", host)
    await podman.run("rmi", "-f", ref)
    await podman.run("pull", *(["--cert-dir", node.cert_dir] if tls else []), ref)
    await skopeo.run("copy", *verify, f"docker://{ref}", f"oci:{work / 'anonymous'}:1")
    await ctrd.ctr("images", "pull", *ctr_tls, ref, namespace="anonymous")

    # -- anonymous pushes, and a wrong password, are refused ---------------------
    refused(await docker.docker("push", ref, check=False), "anonymous docker push")
    refused(await podman.run("push", *(["--cert-dir", node.cert_dir] if tls else []), ref,
                             f"docker://{host}/team/podman-anon:1", check=False), "anonymous podman push")
    refused(await skopeo.run("copy", *verify, f"oci:{layout.root}:1", f"docker://{host}/team/anon:1", check=False),
            "anonymous skopeo push")
    refused(await ctrd.ctr("images", "push", *ctr_tls, f"{host}/team/ctr-anon:1", ref, check=False),
            "anonymous ctr push")
    refused(await skopeo.run("copy", *verify, "--dest-creds", "ci:wrong-password", f"oci:{layout.root}:1",
                             f"docker://{host}/team/wrong:1", check=False), "skopeo push with a wrong password")
    refused(await docker.docker("login", "-u", "ci", "-p", "wrong-password", host, check=False),
            "docker login with a wrong password")
    for repository in ("team/podman-anon", "team/anon", "team/ctr-anon", "team/wrong"):
        assert not os.path.exists(os.path.join(node.registry.config.data_dir, "repositories", repository))


@pytest_twisted.ensureDeferred
async def test_readme_users_section_with_real_clients_over_plain_http(
        node: Node, tmp_path: Any, make_dockerd: Any, make_containerd: Any, make_podman: Any) -> None:
    await check_clients(node, False, tmp_path, make_dockerd, make_containerd, make_podman)


@pytest_twisted.ensureDeferred
async def test_readme_users_section_with_real_clients_over_tls(
        node: Node, tmp_path: Any, make_dockerd: Any, make_containerd: Any, make_podman: Any) -> None:
    await check_clients(node, True, tmp_path, make_dockerd, make_containerd, make_podman)
