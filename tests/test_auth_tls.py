"""TLS listeners on real loopback sockets: versions, ciphers, ALPN, mTLS, reload.

The server side is ours (Twisted + pyOpenSSL); the clients are Python's
``ssl`` module and Debian's ``openssl s_client``, run in threads so the
reactor keeps serving.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
import warnings
from typing import Any, Iterator

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from support.pki import Issued, issue, make_ca
from registryd.auth.tls import (
    ServerTLSContext,
    TLSConfigError,
    TLSServerEndpoint,
    TLSSettings,
    parse_tls_description,
    parse_tls_table,
    tls_endpoint,
)

OPENSSL = shutil.which("openssl")
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


@attrs.frozen
class PKI:
    dir: str
    ca: str
    server_cert: str
    server_key: str
    client_ca: str
    good: tuple[str, str]
    wrong_ca: tuple[str, str]
    expired: tuple[str, str]


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> PKI:
    d = str(tmp_path_factory.mktemp("pki"))
    server_ca = make_ca("server CA")
    server = issue(server_ca, "first", hosts=["localhost", "127.0.0.1"])
    clients_ca = make_ca("clients CA")
    other_ca = make_ca("clients CA")  # same name, different key: must not pass
    good = issue(clients_ca, "ci-runner", client=True)
    wrong = issue(other_ca, "ci-runner", client=True)
    expired = issue(clients_ca, "ci-runner", client=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    cert, key = server.write(d, "server")
    return PKI(
        d, write(os.path.join(d, "ca.pem"), server_ca.cert_pem()), cert, key,
        write(os.path.join(d, "clients-ca.pem"), clients_ca.cert_pem()),
        good.write(d, "good"), wrong.write(d, "wrong"), expired.write(d, "expired"),
    )


class Reply(Protocol):
    """Answers each chunk with the client certificate's CN and the ALPN
    protocol; hangs up after ``bye``."""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        self.factory.received.append(data)  # type: ignore[attr-defined]
        cert = transport.getPeerCertificate()
        cn = "-"
        if cert is not None:
            cn = cert.to_cryptography().subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        protocol = transport.negotiatedProtocol
        transport.write(f"cn={cn} alpn={protocol.decode() if protocol else '-'}\n".encode())
        if data.startswith(b"bye"):
            transport.loseConnection()


@pytest.fixture
def serve() -> Iterator[Any]:
    """await serve(context) -> (port number, list of data the application received)."""
    ports: list[Any] = []

    async def start(context: Any) -> tuple[int, list[bytes]]:
        factory = Factory.forProtocol(Reply)
        factory.received = []  # type: ignore[attr-defined]
        endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), context, clock=reactor)
        port = await endpoint.listen(factory)
        ports.append(port)
        return port.getHost().port, factory.received  # type: ignore[attr-defined]

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@attrs.define
class Outcome:
    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    reply: bytes = b""
    server_cn: str | None = None
    error: BaseException | None = None
    tls: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.reply.startswith(b"cn=")


def connect(port: int, ca: str, *, cert: tuple[str, str] | None = None, version: ssl.TLSVersion | None = None,
            ciphers: str | None = None, alpn: list[str] | None = None, keep_open: bool = False) -> Outcome:
    """A blocking TLS client: handshake, send a line, read the answer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if version is not None:
            context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    if cert:
        context.load_cert_chain(*cert)
    if alpn:
        context.set_alpn_protocols(alpn)
    outcome = Outcome()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        tls = context.wrap_socket(sock, server_hostname="localhost")
        outcome.version, outcome.cipher, outcome.alpn = tls.version(), tls.cipher()[0], tls.selected_alpn_protocol()
        peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        outcome.server_cn = peer.subject.rfc4514_string()
        tls.sendall(b"hello\n")
        outcome.reply = tls.recv(1000)
        if keep_open:
            outcome.tls = tls
            return outcome
        tls.close()
    except (ssl.SSLError, OSError) as e:
        outcome.error = e
    sock.close()
    return outcome


def ask(tls: Any) -> bytes:
    tls.sendall(b"again\n")
    return tls.recv(1000)


def tls_context(pki: PKI, **overrides: Any) -> ServerTLSContext:
    settings = TLSSettings(cert=pki.server_cert, key=pki.server_key)
    return ServerTLSContext(attrs.evolve(settings, **overrides))


def test_interfaces(pki: PKI) -> None:
    context = tls_context(pki)
    assert verifyObject(IOpenSSLServerConnectionCreator, context)
    assert verifyObject(IOpenSSLContextFactory, context)
    assert context.certificate.subject.rfc4514_string() == "CN=first"
    assert not context.verifies_clients


# --- versions, ciphers, ALPN ------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_versions_ciphers_alpn(pki: PKI, serve: Any) -> None:
    port, received = await serve(tls_context(pki))
    best = await deferToThread(connect, port, pki.ca, alpn=["h2", "http/1.1"])
    assert best.ok, best.error
    assert best.version == "TLSv1.3" and best.alpn == "http/1.1" and best.reply == b"cn=- alpn=http/1.1\n"
    assert best.server_cn == "CN=first"

    tls12 = await deferToThread(connect, port, pki.ca, version=ssl.TLSVersion.TLSv1_2)
    assert tls12.ok and tls12.version == "TLSv1.2"
    assert tls12.cipher is not None and tls12.cipher.startswith("ECDHE-ECDSA-") and (
        "GCM" in tls12.cipher or "CHACHA20" in tls12.cipher)

    # a TLS 1.2 client that only offers CBC or non-ephemeral suites is refused
    for weak in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256"):
        refused = await deferToThread(connect, port, pki.ca, version=ssl.TLSVersion.TLSv1_2, ciphers=weak)
        assert isinstance(refused.error, ssl.SSLError), weak

    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        refused = await deferToThread(connect, port, pki.ca, version=old, ciphers="DEFAULT:@SECLEVEL=0")
        assert isinstance(refused.error, ssl.SSLError), old
    assert received.count(b"hello\n") == 2


@pytest_twisted.ensureDeferred
async def test_aes128_gcm_is_preferred(pki: PKI, serve: Any) -> None:
    """Blob bodies over TLS cost less with AES-128-GCM (what Go's TLS and the reference pick);
    a client offering AES-256 first still gets AES-128, in TLS 1.3 and 1.2."""
    port, _ = await serve(tls_context(pki))
    best = await deferToThread(connect, port, pki.ca)
    assert best.ok and best.cipher == "TLS_AES_128_GCM_SHA256", best.cipher
    tls12 = await deferToThread(connect, port, pki.ca, version=ssl.TLSVersion.TLSv1_2,
                                ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256")
    assert tls12.ok and tls12.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256", tls12.cipher


@implementer(IOpenSSLContextFactory)
class Permissive:
    """A control server that still speaks TLS 1.0/1.1: proves our clients
    can, so their failure against registryd is the server's refusal."""

    def __init__(self, pki: PKI) -> None:
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_VERSION)
        self._context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self._context.use_certificate_chain_file(pki.server_cert)
        self._context.use_privatekey_file(pki.server_key)

    def getContext(self) -> SSL.Context:
        return self._context


@pytest_twisted.ensureDeferred
async def test_control_server_accepts_tls11(pki: PKI, serve: Any) -> None:
    port, _ = await serve(Permissive(pki))
    old = await deferToThread(connect, port, pki.ca, version=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")
    assert old.ok and old.version == "TLSv1.1", old.error
    if OPENSSL:
        result = await deferToThread(s_client, port, pki.ca, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
        assert result.returncode == 0 and "TLSv1.1" in result.stdout + result.stderr


def s_client(port: int, ca: str, *args: str, send: str | None = None) -> subprocess.CompletedProcess[str]:
    """``openssl s_client``; with ``send``, write it, wait for the server to
    hang up, and return what it answered on stdout."""
    assert OPENSSL
    extra = ["-ign_eof"] if send is not None else []
    return subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                           "-CAfile", ca, "-verify_return_error", "-brief", *extra, *args],
                          input=send or "", capture_output=True, text=True, timeout=20)


@pytest_twisted.ensureDeferred
async def test_openssl_s_client(pki: PKI, serve: Any) -> None:
    assert OPENSSL, "Debian's openssl is needed (apt-get install openssl)"
    port, _ = await serve(tls_context(pki))
    for flag, expected in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        result = await deferToThread(s_client, port, pki.ca, flag, "-alpn", "http/1.1")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert f"Protocol version: {expected}" in output
        assert "Verification: OK" in output
    for flag in ("-tls1", "-tls1_1"):
        result = await deferToThread(s_client, port, pki.ca, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        # alert 70 comes from the server: the client did offer the version
        assert "alert protocol version" in output, output


# --- client certificates ----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_mtls(pki: PKI, serve: Any) -> None:
    context = tls_context(pki, client_ca=pki.client_ca)
    assert context.verifies_clients
    port, received = await serve(context)
    good = await deferToThread(connect, port, pki.ca, cert=pki.good)
    assert good.ok, good.error
    assert good.reply == b"cn=ci-runner alpn=-\n"
    good12 = await deferToThread(connect, port, pki.ca, cert=pki.good, version=ssl.TLSVersion.TLSv1_2)
    assert good12.ok, good12.error

    cases = [
        ("no certificate", None, ssl.TLSVersion.TLSv1_3, "certificate required"),
        ("no certificate", None, ssl.TLSVersion.TLSv1_2, "handshake failure"),
        ("wrong CA", pki.wrong_ca, ssl.TLSVersion.TLSv1_3, "unknown ca"),
        ("wrong CA", pki.wrong_ca, ssl.TLSVersion.TLSv1_2, "unknown ca"),
        ("expired", pki.expired, ssl.TLSVersion.TLSv1_3, "certificate expired"),
        ("expired", pki.expired, ssl.TLSVersion.TLSv1_2, "certificate expired"),
    ]
    for what, cert, version, alert in cases:
        refused = await deferToThread(connect, port, pki.ca, cert=cert, version=version)
        assert not refused.ok, what
        assert isinstance(refused.error, (ssl.SSLError, ConnectionResetError)), (what, refused.error)
        assert alert in str(refused.error).lower().replace("_", " "), (what, version, refused.error)
    # nothing but the two good clients ever reached the application
    assert received == [b"hello\n", b"hello\n"]


@pytest_twisted.ensureDeferred
async def test_mtls_with_s_client(pki: PKI, serve: Any) -> None:
    assert OPENSSL
    port, received = await serve(tls_context(pki, client_ca=pki.client_ca))
    good = await deferToThread(s_client, port, pki.ca, "-cert", pki.good[0], "-key", pki.good[1], send="bye\n")
    assert good.returncode == 0, good.stderr
    assert "cn=ci-runner" in good.stdout
    for what, args, alert in (
        ("no certificate", (), "certificate required"),
        ("wrong CA", ("-cert", pki.wrong_ca[0], "-key", pki.wrong_ca[1]), "unknown ca"),
        ("expired", ("-cert", pki.expired[0], "-key", pki.expired[1]), "certificate expired"),
    ):
        refused = await deferToThread(s_client, port, pki.ca, *args, send="bye\n")
        assert "cn=" not in refused.stdout, what
        assert alert in refused.stderr, (what, refused.stderr)
    assert received == [b"bye\n"]


# --- reload -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reload_serves_new_certificate_to_new_connections_only(pki: PKI, serve: Any, tmp_path: Any) -> None:
    ca = make_ca("reload CA")
    ca_file = write(str(tmp_path / "ca.pem"), ca.cert_pem())
    cert, key = issue(ca, "old", hosts=["localhost"]).write(str(tmp_path), "live")
    context = ServerTLSContext(TLSSettings(cert=cert, key=key))
    port, _ = await serve(context)
    before = await deferToThread(connect, port, ca_file, keep_open=True)
    assert before.ok and before.server_cn == "CN=old"

    # certbot-style swap: new key and certificate, then SIGHUP
    issue(ca, "new", hosts=["localhost"]).write(str(tmp_path), "live")
    still_old = await deferToThread(connect, port, ca_file)
    assert still_old.server_cn == "CN=old", "nothing changes before reload()"
    assert context.reload() is True
    assert context.certificate.subject.rfc4514_string() == "CN=new"
    after = await deferToThread(connect, port, ca_file)
    assert after.ok and after.server_cn == "CN=new"
    # the connection opened before the reload carries on
    assert await deferToThread(ask, before.tls) == b"cn=- alpn=-\n"
    before.tls.close()


@pytest_twisted.ensureDeferred
async def test_failed_reload_keeps_serving(pki: PKI, serve: Any, tmp_path: Any) -> None:
    cert = shutil.copy(pki.server_cert, tmp_path / "c.pem")
    key = shutil.copy(pki.server_key, tmp_path / "k.pem")
    context = ServerTLSContext(TLSSettings(cert=str(cert), key=str(key)))
    port, _ = await serve(context)
    # a half-done swap: the new certificate with the old key
    issue(make_ca(), "other", hosts=["localhost"]).write(str(tmp_path), "c", key_suffix=".unused")
    assert context.reload() is False
    outcome = await deferToThread(connect, port, pki.ca)
    assert outcome.ok and outcome.server_cn == "CN=first"


# --- twisted.web over it -----------------------------------------------------

class Secure(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"secure" if request.isSecure() else b"plain"


def https_get(port: int, ca: str) -> tuple[str | None, bytes]:
    import http.client

    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("GET", "/")
        body = connection.getresponse().read()
        assert connection.sock is not None
        return connection.sock.selected_alpn_protocol(), body
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_twisted_web_site_over_tls_endpoint(pki: PKI) -> None:
    endpoint = tls_endpoint(reactor, "tcp:0:interface=127.0.0.1", TLSSettings(pki.server_cert, pki.server_key))
    port = await endpoint.listen(Site(Secure()))
    try:
        alpn, body = await deferToThread(https_get, port.getHost().port, pki.ca)
        assert (alpn, body) == ("http/1.1", b"secure")
    finally:
        await port.stopListening()


def test_plain_tls_memory_bio_factory_accepts_the_context(pki: PKI) -> None:
    # what reactor.listenSSL / SSL4ServerEndpoint do with a context factory
    factory = TLSMemoryBIOFactory(tls_context(pki), False, Factory.forProtocol(Reply))
    assert factory is not None


# --- validation at build time ---------------------------------------------------

def one_line(e: pytest.ExceptionInfo[TLSConfigError]) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_and_unreadable_files(pki: PKI, tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, missing))
    assert one_line(e) == f"cannot read TLS key {missing}: No such file or directory"
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(missing, pki.server_key))
    assert one_line(e) == f"cannot read TLS certificate {missing}: No such file or directory"
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, str(tmp_path)))
    assert one_line(e) == f"cannot read TLS key {tmp_path}: Is a directory"
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, pki.server_key, client_ca=missing))
    assert one_line(e) == f"cannot read client CA file {missing}: No such file or directory"
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, pki.server_key, chain=missing))
    assert one_line(e) == f"cannot read TLS chain file {missing}: No such file or directory"


def test_not_pem(pki: PKI, tmp_path: Any) -> None:
    junk = write(str(tmp_path / "junk.pem"), b"hello\n")
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(junk, pki.server_key))
    assert one_line(e) == f"TLS certificate {junk} holds no PEM certificate"
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, junk))
    assert one_line(e) == f"TLS key {junk} is not a PEM private key"
    # a certificate where the key should be
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, pki.server_cert))
    assert one_line(e) == f"TLS key {pki.server_cert} is not a PEM private key"


def test_certificate_not_matching_key(pki: PKI) -> None:
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, pki.good[1]))
    assert one_line(e) == f"TLS certificate {pki.server_cert} does not match the key {pki.good[1]}"


def test_encrypted_key(pki: PKI, tmp_path: Any) -> None:
    key = serialization.load_pem_private_key(open(pki.server_key, "rb").read(), None)
    encrypted = write(str(tmp_path / "enc.key"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(TLSConfigError) as e:
        ServerTLSContext(TLSSettings(pki.server_cert, encrypted))
    assert one_line(e) == f"TLS key {encrypted} is encrypted; registryd needs it without a passphrase"


@pytest_twisted.ensureDeferred
async def test_intermediate_chain_is_sent(serve: Any, tmp_path: Any) -> None:
    root = make_ca("root")
    intermediate_issued = issue(root, "intermediate")
    # make the intermediate a CA by re-issuing it properly
    from cryptography.hazmat.primitives import hashes
    builder = (x509.CertificateBuilder().subject_name(intermediate_issued.certificate.subject)
               .issuer_name(root.certificate.subject).public_key(intermediate_issued.key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True))
    intermediate = Issued(builder.sign(root.key, hashes.SHA256()), intermediate_issued.key)
    leaf = issue(intermediate, "leaf", hosts=["localhost"])
    cert, key = leaf.write(str(tmp_path), "leaf")
    chain = write(str(tmp_path / "chain.pem"), intermediate.cert_pem())
    root_file = write(str(tmp_path / "root.pem"), root.cert_pem())
    # leaf + chain file
    port, _ = await serve(ServerTLSContext(TLSSettings(cert, key, chain=chain)))
    assert (await deferToThread(connect, port, root_file)).ok
    # one fullchain file
    fullchain = write(str(tmp_path / "fullchain.pem"), leaf.cert_pem() + intermediate.cert_pem())
    port, _ = await serve(ServerTLSContext(TLSSettings(fullchain, key)))
    assert (await deferToThread(connect, port, root_file)).ok
    # without the intermediate a client that only trusts the root fails
    port, _ = await serve(ServerTLSContext(TLSSettings(cert, key)))
    assert not (await deferToThread(connect, port, root_file)).ok


# --- configuration shapes -----------------------------------------------------

def test_parse_tls_table() -> None:
    assert parse_tls_table({"endpoint": "tcp:5000"}) is None
    assert parse_tls_table({"endpoint": "tcp:5443", "tls_cert": "c", "tls_key": "k", "tls_client_ca": "ca"},
                           "listen[1]") == TLSSettings("c", "k", client_ca="ca")
    with pytest.raises(TLSConfigError) as e:
        parse_tls_table({"tls_cert": "c"}, "listen[0]")
    assert str(e.value).startswith("'listen[0]': tls_cert and tls_key go together")
    with pytest.raises(TLSConfigError) as e:
        parse_tls_table({"tls_cert": 1, "tls_key": "k"}, "listen[0]")
    assert str(e.value) == "'listen[0].tls_cert' must be a file name, not 1"


def test_parse_tls_description() -> None:
    assert parse_tls_description("tcp:5000") is None
    assert parse_tls_description("ssl:5443:privateKey=k") is None
    plain, settings = parse_tls_description(
        r"tls:5443:interface=\:\:1:cert=/etc/c.pem:key=/etc/k.pem:client_ca=/etc/ca.pem:backlog=10") or ("", None)
    assert plain == r"tcp:5443:interface=\:\:1:backlog=10"
    assert settings == TLSSettings("/etc/c.pem", "/etc/k.pem", client_ca="/etc/ca.pem")
    with pytest.raises(TLSConfigError):
        parse_tls_description("tls:5443:cert=/etc/c.pem")
