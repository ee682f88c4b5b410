"""TLS for a listener: certificate, key, chain, optional client CA (mTLS).

``ServerTLSContext(settings)`` reads and checks the files at once: a missing
or unreadable file, a file without PEM data, an encrypted key, or a
certificate that does not belong to the key raises TLSConfigError with one
line, so start-up stops. Connections get TLS 1.2 or newer, ECDHE key
exchange with AEAD ciphers only (TLS 1.3 suites are all AEAD), no
compression, no renegotiation, no TLS 1.2 session tickets, and ALPN
``http/1.1``.

With ``client_ca`` the listener requires a client certificate that chains to
that CA and is within its validity period; anything else fails the
handshake before a byte of HTTP is read.

``reload()`` (SIGHUP) reads the files again and swaps in a new OpenSSL
context: connections accepted afterwards get the new certificate, open ones
keep the context they started with. A reload that fails keeps the old one.

``TLSServerEndpoint`` wraps any plain server endpoint (``tcp:``, ``unix:``,
``systemd:``) so the listener itself stays a Twisted endpoint description.
"""
from __future__ import annotations

import datetime
import re
import secrets
from typing import Any, Mapping

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from registryd.auth.errors import AuthConfigError
from registryd.listeners import plain_endpoint
from registryd.schema import read_table, setting
from registryd.tls_transport import LeanTLSTransport

log = Logger()

#: TLS 1.2 suites with forward secrecy and authenticated encryption only.
MODERN_CIPHERS = "ECDHE+AESGCM+AES128:ECDHE+AESGCM+AES256:ECDHE+CHACHA20:!aNULL:!eNULL"
#: TLS 1.3 suites, AES-128-GCM first as Go's TLS and the reference registry choose: as safe
#: today, and its 10 AES rounds (against 14) make every byte of a blob body cheaper to send.
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#: What ALPN offers; HTTP/2 needs twisted[http2] (h2, priority), not installed.
ALPN_PROTOCOLS = (b"http/1.1",)

#: ``[[listen]]`` table keys -> TLSSettings fields.
TLS_LISTEN_KEYS = {"tls_cert": "cert", "tls_key": "key", "tls_chain": "chain", "tls_client_ca": "client_ca"}
#: ``tls:`` endpoint description keys -> TLSSettings fields.
_DESCRIPTION_KEYS = {"cert": "cert", "key": "key", "chain": "chain", "client_ca": "client_ca"}


class TLSConfigError(AuthConfigError):
    """The TLS files of a listener cannot be used; one readable line."""


def _file_name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TLSConfigError(f"'{where}' must be a file name, not {value!r}")
    return value


@attrs.frozen
class TLSSettings:
    """The files of one TLS listener.

    ``cert`` holds the server certificate first, optionally followed by its
    intermediates (a "fullchain" file); ``chain`` may hold (more)
    intermediates; ``client_ca`` turns on client-certificate verification.
    In a ``[[listen]]`` table the keys are ``tls_cert``, ``tls_key``...
    """

    cert: str = setting(check=_file_name, name="tls_cert", doc="the server certificate, then intermediates")
    key: str = setting(check=_file_name, name="tls_key", doc="its private key (not encrypted)")
    chain: str | None = setting(None, check=_file_name, name="tls_chain", doc="more intermediates")
    client_ca: str | None = setting(None, check=_file_name, name="tls_client_ca",
                                    doc="require client certificates that chain to this CA")


def parse_tls_table(table: Mapping[str, Any], where: str = "listen") -> TLSSettings | None:
    """The TLS part of a ``[[listen]]`` table, or None for a plain listener.

    Reads ``tls_cert``, ``tls_key``, ``tls_chain``, ``tls_client_ca`` (all
    strings; cert and key go together) and ignores other keys.
    """
    values = read_table(TLSSettings, {k: v for k, v in table.items() if k in TLS_LISTEN_KEYS}, where,
                        TLSConfigError)
    if not values:
        return None
    if "cert" not in values or "key" not in values:
        raise TLSConfigError(f"'{where}': tls_cert and tls_key go together (and tls_chain/tls_client_ca need them)")
    return TLSSettings(**values)


def _split_unescaped(text: str, separator: str) -> list[str]:
    """Split like Twisted endpoint descriptions: backslash escapes a character."""
    parts, current, escaped = [], "", False
    for character in text:
        if escaped:
            current += character
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == separator:
            parts.append(current)
            current = ""
        else:
            current += character
    parts.append(current)
    return parts


def _escape(value: str) -> str:
    return re.sub(r"([:=\\])", r"\\\1", value)


def parse_tls_description(description: str) -> tuple[str, TLSSettings] | None:
    """Split a ``tls:`` listen description into a plain TCP one and settings.

    ``tls:5443:interface=\\:\\::cert=/etc/c.pem:key=/etc/k.pem[:chain=..][:client_ca=..]``
    becomes ``("tcp:5443:interface=\\:\\:", TLSSettings(...))``: every
    argument but the TLS ones is passed on to ``tcp:``. Descriptions that do
    not start with ``tls:`` give None (Twisted's own ``ssl:`` still works,
    without reload or mTLS).
    """
    prefix, sep, rest = description.partition(":")
    if prefix != "tls" or not sep:
        return None
    values: dict[str, str] = {}
    kept: list[str] = []
    for argument in _split_unescaped(rest, ":"):
        key, eq, value = argument.partition("=")
        if eq and key in _DESCRIPTION_KEYS:
            values[_DESCRIPTION_KEYS[key]] = value
        else:
            kept.append(argument)
    if "cert" not in values or "key" not in values:
        raise TLSConfigError(f"listen description {description!r} needs cert= and key=")
    plain = "tcp:" + ":".join(_escape_argument(a) for a in kept)
    return plain, TLSSettings(**values)


def _escape_argument(argument: str) -> str:
    key, eq, value = argument.partition("=")
    return f"{_escape(key)}={_escape(value)}" if eq else _escape(argument)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSConfigError(f"{what} {path} holds no PEM certificate")
    return certificates


def _private_key(path: str) -> Any:
    data = _read(path, "TLS key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(f"TLS key {path} is encrypted; registryd needs it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        reason = "not a PEM private key" if b"PRIVATE KEY" not in data else f"unusable: {e}"
        raise TLSConfigError(f"TLS key {path} is {reason}") from None


def _public_bytes(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@attrs.frozen
class _Loaded:
    context: SSL.Context
    certificate: x509.Certificate


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    for protocol in ALPN_PROTOCOLS:
        if protocol in offered:
            return protocol
    # Go on without ALPN rather than fail the handshake.
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _context(chain: list[x509.Certificate], key: Any, client_cas: list[x509.Certificate]) -> SSL.Context:
    """A fresh server context; never mutated once connections use it."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    # No TLS 1.2 session tickets: their key would live as long as the
    # process and undo forward secrecy; the server-side session cache
    # (on by default) still allows resumption.
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                        | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(MODERN_CIPHERS.encode("ascii"))
    context.set_tls13_ciphersuites(TLS13_SUITES.encode("ascii"))
    context.use_certificate(chain[0])
    context.use_privatekey(key)
    for certificate in chain[1:]:
        context.add_extra_chain_cert(certificate)
    context.check_privatekey()
    # Required for client certificates together with session resumption.
    context.set_session_id(secrets.token_hex(8).encode("ascii"))
    context.set_alpn_select_callback(_select_alpn)
    if client_cas:
        store = context.get_cert_store()
        assert store is not None
        for ca in client_cas:
            store.add_cert(X509.from_cryptography(ca))
            # Named in the CertificateRequest so clients holding several
            # certificates pick the right one.
            context.add_client_ca(ca)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE)
    return context


def _load(settings: TLSSettings) -> _Loaded:
    chain = _certificates(settings.cert, "TLS certificate")
    if settings.chain:
        chain += _certificates(settings.chain, "TLS chain file")
    key = _private_key(settings.key)
    leaf = chain[0]
    if _public_bytes(leaf.public_key()) != _public_bytes(key.public_key()):
        raise TLSConfigError(f"TLS certificate {settings.cert} does not match the key {settings.key}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        log.warn("TLS certificate {path} expired on {date}", path=settings.cert,
                 date=leaf.not_valid_after_utc.isoformat())
    client_cas: list[x509.Certificate] = []
    if settings.client_ca:
        client_cas = _certificates(settings.client_ca, "client CA file")
    try:
        context = _context(chain, key, client_cas)
    except (SSL.Error, ValueError, TypeError) as e:
        raise TLSConfigError(f"TLS certificate {settings.cert} and key {settings.key} cannot be used: {e}") from None
    return _Loaded(context, leaf)


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLSContext:
    """The server side of TLS for one listener, reloadable.

    Pass it wherever Twisted takes a server context factory
    (TLSMemoryBIOFactory, ``SSL4ServerEndpoint``, ``listenSSL``) or use
    TLSServerEndpoint.
    """

    def __init__(self, settings: TLSSettings) -> None:
        self._settings = settings
        self._loaded = _load(settings)

    @property
    def settings(self) -> TLSSettings:
        return self._settings

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate new connections are served."""
        return self._loaded.certificate

    @property
    def verifies_clients(self) -> bool:
        return self._settings.client_ca is not None

    def reload(self) -> bool:
        """Read the files again for new connections (SIGHUP). On failure keep
        the current certificate, log the error and return False."""
        try:
            self._loaded = _load(self._settings)
        except TLSConfigError as e:
            log.error("{error}; still serving the certificate loaded before", error=str(e))
            return False
        log.info("reloaded TLS certificate {path}, valid until {date}", path=self._settings.cert,
                 date=self._loaded.certificate.not_valid_after_utc.isoformat())
        return True

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._loaded.context, None)

    def getContext(self) -> SSL.Context:
        return self._loaded.context


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """A plain stream server endpoint with TLS on top of every connection."""

    def __init__(self, wrapped: IStreamServerEndpoint, context: ServerTLSContext,
                 clock: IReactorTime | None = None) -> None:
        self._wrapped = wrapped
        self._context = context
        self._clock = clock

    @property
    def context(self) -> ServerTLSContext:
        return self._context

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory = TLSMemoryBIOFactory(self._context, False, protocolFactory, clock=self._clock)
        factory.protocol = LeanTLSTransport
        return self._wrapped.listen(factory)


def tls_endpoint(reactor: Any, description: str, settings: TLSSettings) -> TLSServerEndpoint:
    """TLS over the plain endpoint ``description`` (e.g. ``tcp:5443``).

    Raises TLSConfigError for bad files; Twisted's serverFromString's ValueError for a
    bad description.
    """
    return TLSServerEndpoint(plain_endpoint(reactor, description), ServerTLSContext(settings), clock=reactor)
