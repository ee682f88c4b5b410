"""End-to-end: the real skopeo against registryd over TLS, with users.

One in-process registryd listens three times: plain HTTP, TLS, and TLS
that requires a client certificate (mTLS) from a separate client CA. The
throw-away PKI comes from ``tests/support/pki.py``; skopeo trusts it the
way operators configure it, with a certificate directory holding
``ca.crt`` (and ``client.cert`` + ``client.key`` for mTLS), and TLS
verification left on. Users come from an htpasswd file (bcrypt) and
``[[access]]`` rules.

skopeo runs in a thread (``skopeo_cli``), so the reactor keeps serving. A
missing skopeo fails these tests; it never skips them.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import attrs
import bcrypt
import pytest
import pytest_twisted

from oci_client import snapshot
from registryd.auth.policy import parse_access_rules
from registryd.auth.settings import AuthSettings
from support.pki import issue, make_ca

from . import oci_layout as oci
from .skopeo_cli import Skopeo, SkopeoError
from .test_skopeo import assert_pulled, expected_blobs, image_with_layers

pytestmark = pytest.mark.timeout(120)

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
USERS = {"alice": "alice-Tls-Secret-1", "reader": "reader-Tls-Secret-2"}
RULES = [
    {"users": ["alice"], "repositories": ["e2e/**"], "actions": ["pull", "push", "delete"]},
    {"users": ["reader"], "repositories": ["e2e/**"], "actions": ["pull"]},
]


@attrs.frozen
class TLSNode:
    """The registry and the certificate directories skopeo is given."""

    registry: Any
    tls: str          # host:port of the TLS listener
    mtls: str         # host:port of the listener that wants a client certificate
    cert_dirs: dict[str, str]


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _htpasswd(path: str) -> str:
    with open(path, "w") as f:
        for user, password in USERS.items():
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            f.write(f"{user}:$2y${hashed[4:]}\n")
    return path


@pytest.fixture
def node(make_registry: Any, tmp_path: Any) -> TLSNode:
    pki = tmp_path / "pki"
    pki.mkdir()
    server_ca = make_ca("e2e server CA")
    server = issue(server_ca, "registryd", hosts=["127.0.0.1", "localhost"])
    cert, key = server.write(str(pki), "server")
    clients_ca = make_ca("e2e clients CA")
    _write(str(pki / "clients-ca.pem"), clients_ca.cert_pem())
    impostor_ca = make_ca("e2e clients CA")   # same name, another key
    clients = {
        "good": issue(clients_ca, "ci-runner", client=True),
        "expired": issue(clients_ca, "ci-runner", client=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY),
        "wrong-ca": issue(impostor_ca, "ci-runner", client=True),
    }
    cert_dirs: dict[str, str] = {}
    for name in ("ca-only", *clients):
        directory = tmp_path / "certs" / name
        directory.mkdir(parents=True)
        _write(str(directory / "ca.crt"), server_ca.cert_pem())
        if name in clients:
            _write(str(directory / "client.cert"), clients[name].cert_pem())
            _write(str(directory / "client.key"), clients[name].key_pem())
        cert_dirs[name] = str(directory)
    registry = make_registry(
        listen=("tcp:0:interface=127.0.0.1",
                f"tls:0:interface=127.0.0.1:cert={cert}:key={key}",
                f"tls:0:interface=127.0.0.1:cert={cert}:key={key}:client_ca={pki / 'clients-ca.pem'}"),
        auth=AuthSettings(htpasswd=_htpasswd(str(tmp_path / "htpasswd")), failures_before_delay=1000, max_delay=1),
        access=parse_access_rules(RULES),
    )
    ports = [port.getHost().port for port in registry.service.ports]
    return TLSNode(registry, f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}", cert_dirs)


@pytest.fixture
def skopeo(tmp_path: Any) -> Skopeo:
    return Skopeo(tmp_path / "skopeo")


@pytest.fixture
def layout(tmp_path: Any) -> oci.OCILayout:
    return oci.OCILayout(tmp_path / "src")


def creds(user: str, password: str | None = None) -> str:
    return f"{user}:{USERS[user] if password is None else password}"


async def push(skopeo: Skopeo, src: str, dest: str, cert_dir: str, *options: str, check: bool = True) -> Any:
    """``skopeo copy`` to a TLS registry, verifying its certificate."""
    return await skopeo.run("copy", "--preserve-digests", "--dest-cert-dir", cert_dir, *options, src, dest,
                            check=check)


async def pull(skopeo: Skopeo, src: str, dest: str, cert_dir: str, *options: str, check: bool = True) -> Any:
    return await skopeo.run("copy", "--preserve-digests", "--src-cert-dir", cert_dir, *options, src, dest,
                            check=check)


def refused(result: Any, *reasons: str) -> str:
    assert result.returncode != 0, f"skopeo succeeded: {' '.join(result.args)}"
    text = result.text.lower()
    assert any(reason in text for reason in reasons), f"expected one of {reasons} in:\n{result.text}"
    return text


@pytest_twisted.ensureDeferred
async def test_push_and_pull_over_tls_with_credentials(node: TLSNode, skopeo: Skopeo, layout: oci.OCILayout,
                                                       tmp_path: Any) -> None:
    """skopeo pushes with --dest-creds and pulls with --src-creds over TLS,
    trusting the test CA from --dest-cert-dir/--src-cert-dir (ca.crt);
    a pull-only user pulls the same image."""
    image = layout.add_image(image_with_layers("tls", [1024, 2 * 1024 * 1024]), tag="v1")
    ref = f"docker://{node.tls}/e2e/app:v1"
    ca_only = node.cert_dirs["ca-only"]
    await push(skopeo, f"oci:{layout.root}:v1", ref, ca_only, "--dest-creds", creds("alice"))
    for user in ("alice", "reader"):
        out = tmp_path / f"out-{user}"
        await pull(skopeo, ref, f"oci:{out}:v1", ca_only, "--src-creds", creds(user))
        assert_pulled(out, "v1", image.digest, expected_blobs(image))
    raw = await skopeo.run("inspect", "--raw", "--cert-dir", ca_only, "--creds", creds("reader"), ref)
    assert raw.stdout == image.manifest.data


@pytest_twisted.ensureDeferred
async def test_push_and_pull_with_a_client_certificate(node: TLSNode, skopeo: Skopeo, layout: oci.OCILayout,
                                                       tmp_path: Any) -> None:
    """mTLS: a certificate directory with ca.crt, client.cert and client.key
    gets through the handshake; credentials are still needed on top."""
    image = layout.add_image(image_with_layers("mtls", [4096, 300_000]), tag="v1")
    ref = f"docker://{node.mtls}/e2e/mtls:v1"
    good = node.cert_dirs["good"]
    await push(skopeo, f"oci:{layout.root}:v1", ref, good, "--dest-creds", creds("alice"))
    out = tmp_path / "out"
    await pull(skopeo, ref, f"oci:{out}:v1", good, "--src-creds", creds("reader"))
    assert_pulled(out, "v1", image.digest, expected_blobs(image))
    # the certificate alone does not make anyone a user
    result = await pull(skopeo, ref, f"oci:{tmp_path / 'anon'}:v1", good, check=False)
    refused(result, "authentication required", "unauthorized")


@pytest.mark.parametrize("who", ["wrong password", "unknown user", "no credentials", "pull-only user"])
@pytest_twisted.ensureDeferred
async def test_bad_credentials_are_refused(node: TLSNode, skopeo: Skopeo, layout: oci.OCILayout, tmp_path: Any,
                                           who: str) -> None:
    """Over TLS (the handshake succeeds): a wrong password, an unknown user
    and no credentials get 401 on push and pull; a pull-only user gets 403
    on push. Nothing reaches the disk."""
    layout.add_image(image_with_layers("refused", [1500]), tag="v1")
    ca_only = node.cert_dirs["ca-only"]
    # something to pull
    await push(skopeo, f"oci:{layout.root}:v1", f"docker://{node.tls}/e2e/there:v1", ca_only,
               "--dest-creds", creds("alice"))
    options = {
        "wrong password": ["--creds", creds("alice", "not-the-password")],
        "unknown user": ["--creds", "mallory:alice-Tls-Secret-1"],
        "no credentials": [],
        "pull-only user": ["--creds", creds("reader")],
    }[who]
    dest_options = [o.replace("--creds", "--dest-creds") for o in options]
    src_options = [o.replace("--creds", "--src-creds") for o in options]
    before = snapshot(node.registry.data_dir, ignore_uploads=True)
    result = await push(skopeo, f"oci:{layout.root}:v1", f"docker://{node.tls}/e2e/refused:v1", ca_only,
                        *dest_options, check=False)
    if who == "pull-only user":
        refused(result, "denied", "403")
    else:
        refused(result, "authentication required", "unauthorized", "401")
    after = snapshot(node.registry.data_dir, ignore_uploads=True)
    assert after == before, "a refused push changed the repositories or blobs"

    result = await pull(skopeo, f"docker://{node.tls}/e2e/there:v1", f"oci:{tmp_path / 'out'}:v1", ca_only,
                        *src_options, check=False)
    if who == "pull-only user":
        assert result.returncode == 0, result.text
    else:
        refused(result, "authentication required", "unauthorized", "401")


@pytest.mark.parametrize("client, reasons", [
    ("expired", ("expired certificate", "certificate expired", "certificate has expired")),
    ("wrong-ca", ("unknown certificate authority", "unknown ca", "bad certificate")),
    ("ca-only", ("certificate required", "handshake failure", "bad certificate")),
])
@pytest_twisted.ensureDeferred
async def test_bad_client_certificates_fail_the_handshake(node: TLSNode, skopeo: Skopeo, layout: oci.OCILayout,
                                                          tmp_path: Any, client: str,
                                                          reasons: tuple[str, ...]) -> None:
    """On the mTLS listener an expired client certificate, one from another
    CA (with the same CA name) and none at all fail the TLS handshake, even
    with the right password; nothing is written."""
    layout.add_image(image_with_layers("badcert", [1500]), tag="v1")
    before = snapshot(node.registry.data_dir)
    cert_dir = node.cert_dirs[client]
    result = await push(skopeo, f"oci:{layout.root}:v1", f"docker://{node.mtls}/e2e/badcert:v1", cert_dir,
                        "--dest-creds", creds("alice"), check=False)
    refused(result, *reasons)
    result = await skopeo.run("inspect", "--raw", "--cert-dir", cert_dir, "--creds", creds("alice"),
                              f"docker://{node.mtls}/e2e/badcert:v1", check=False)
    refused(result, *reasons)
    assert snapshot(node.registry.data_dir) == before


@pytest_twisted.ensureDeferred
async def test_untrusted_server_certificate_is_refused_by_skopeo(node: TLSNode, skopeo: Skopeo,
                                                                 layout: oci.OCILayout) -> None:
    """Control: without the test CA (an empty certificate directory) skopeo
    refuses the server, so the passing tests above really verified it."""
    layout.add_image(image_with_layers("untrusted", [1500]), tag="v1")
    empty = os.path.join(skopeo.workdir, "certs.d")
    result = await push(skopeo, f"oci:{layout.root}:v1", f"docker://{node.tls}/e2e/untrusted:v1", empty,
                        "--dest-creds", creds("alice"), check=False)
    refused(result, "certificate signed by unknown authority", "x509")
    with pytest.raises(SkopeoError):
        await skopeo.run("inspect", "--raw", "--cert-dir", empty, "--creds", creds("alice"),
                         f"docker://{node.tls}/e2e/untrusted:v1")
