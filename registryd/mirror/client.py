"""An HTTP client for one upstream registry: TLS, credentials, token flow, redirects.

Built on Twisted's Agent rather than treq's request(): treq always asks for
gzip and decodes it, and a blob must reach the hasher and the disk exactly
as the upstream sent it. Redirects are handled here, not by RedirectAgent:
only a blob's are followed, only to hosts the operator allowed, never with
credentials (registryd.mirror.hosts has the rules).
"""
from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import urlencode, urljoin


from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from registryd.config import UpstreamConfig
from registryd.json_documents import load_json
from registryd.mirror.challenge import parse_challenges
from registryd.mirror.hosts import Target, UpstreamHosts, parse_target

log = Logger()

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
_TOKEN_BODY_LIMIT = 1024 * 1024
_DEFAULT_TOKEN_LIFETIME = 60
# Refresh a token this long before the upstream says it expires.
_TOKEN_MARGIN = 10
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Docker Hub: registry -> CDN, sometimes one more hop; a chain longer than this is a loop.
MAX_REDIRECTS = 5
_BLOB_PATH = re.compile(r"^/v2/.+/blobs/[^/?]+$")


class UpstreamUnavailable(Exception):
    """The upstream could not answer usefully (network, timeout, 5xx, 429).

    Cached content may be served instead.
    """


class UpstreamThrottled(UpstreamUnavailable):
    """The upstream answered 429: ``retry_after`` is its Retry-After, as it sent it (or None)."""

    def __init__(self, message: str, retry_after: str | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _PlatformAndBundle(ssl.OpenSSLDefaultPaths):
    """The platform's CAs and the upstream's bundle: a host an upstream sends
    registryd to may be public (a CDN) or internal (object storage)."""

    def __init__(self, certificates: list[Any]) -> None:
        self._bundle = [certificate.original for certificate in certificates]

    def _addCACertsToContext(self, context: Any) -> None:
        super()._addCACertsToContext(context)
        store = context.get_cert_store()
        for certificate in self._bundle:
            store.add_cert(certificate)


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """TLS for one upstream: its CA bundle, client certificate, verification.

    ``for_other_hosts`` (the hosts it redirects to, its token service):
    never the client certificate, and the platform's CAs besides the bundle.
    """

    def __init__(self, config: UpstreamConfig, for_other_hosts: bool = False) -> None:
        self._verify = config.tls_verify
        self._trust: Any = None
        if config.ca_file:
            with open(config.ca_file, "rb") as f:
                certificates = [ssl.Certificate.loadPEM(pem) for pem in _split_pem(f.read())]
            self._trust = (_PlatformAndBundle(certificates) if for_other_hosts
                           else ssl.trustRootFromCertificates(certificates))
        self._client: Any = None
        if not for_other_hosts and config.client_cert and config.client_key:
            with open(config.client_cert, "rb") as f:
                cert = f.read()
            with open(config.client_key, "rb") as f:
                key = f.read()
            self._client = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        if not self._verify:
            extra = {}
            if self._client is not None:
                extra = {"privateKey": self._client.privateKey.original,
                         "certificate": self._client.original}
            return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **extra)
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust or ssl.platformTrust(),
                                       clientCertificate=self._client)


def _split_pem(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker for part in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in part]


class UpstreamClient:
    """Sends requests to one upstream, authenticating as it demands.

    Anonymous first; on 401 the challenge says Basic (use the configured
    credentials) or Bearer (fetch a token for the repository's pull scope,
    cache it until it expires) and the request is retried once.
    """

    def __init__(self, config: UpstreamConfig, reactor: Any, pool: HTTPConnectionPool) -> None:
        self.config = config
        self._reactor = reactor
        self.hosts = UpstreamHosts(config)
        self._agent = Agent(reactor, contextFactory=UpstreamTLSPolicy(config),
                            connectTimeout=config.connect_timeout, pool=pool)
        # For the other hosts an upstream names (CDN, token service): no client certificate.
        self._other_agent = Agent(reactor, contextFactory=UpstreamTLSPolicy(config, for_other_hosts=True),
                                  connectTimeout=config.connect_timeout, pool=pool)
        # Read once, here: from the config's variable or file, if it names one (SecretUnavailable if gone).
        self._username, self._password = config.username, config.password
        self._tokens: dict[str, tuple[str, float]] = {}
        self._use_basic = False

    def _basic_header(self) -> str | None:
        if self._username is None:
            return None
        raw = f"{self._username}:{self._password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _authorization(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is not None and token[1] > self._reactor.seconds():
            return f"Bearer {token[0]}"
        if self._use_basic:
            return self._basic_header()
        return None

    async def _send(self, method: str, url: str, headers: dict[str, str], elsewhere: bool = False) -> IResponse:
        raw = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        agent = self._other_agent if elsewhere else self._agent
        try:
            d = agent.request(method.encode(), url.encode(), raw)
        except ValueError as e:   # a URL an upstream named (realm, Link) that is not a valid URI
            shown = url.split("?", 1)[0][:200]
            raise UpstreamUnavailable(f"{self.config.namespace}: cannot request {shown!r}: {e}") from None
        timer = self._reactor.callLater(self.config.idle_timeout, d.cancel)
        try:
            return await d
        except (CancelledError, TimeoutError, ConnectError, ConnectingCancelledError, DNSLookupError,
                ResponseFailed) as e:
            if isinstance(e, CancelledError) and not timer.active():
                raise UpstreamUnavailable(f"{self.config.namespace}: no answer within "
                                          f"{self.config.idle_timeout}s") from None
            if isinstance(e, CancelledError):
                raise
            raise UpstreamUnavailable(f"{self.config.namespace}: {_describe(e)}") from None
        finally:
            if timer.active():
                timer.cancel()

    async def request(self, method: str, path: str, repository: str,
                      headers: dict[str, str] | None = None, scope: str | None = None) -> IResponse:
        """Send ``method path`` for ``repository``; the body is the caller's to read.

        ``scope``: the token scope to ask for instead of the repository's pull
        (``registry:catalog:*`` for the catalog a sync job expands globs with).

        A blob's redirects are followed (see ``_follow``); any other redirect,
        network failures, 5xx and 429 raise UpstreamUnavailable.
        """
        scope = scope or f"repository:{repository}:pull"
        url = self.config.url + path
        base = {"User-Agent": self.config.user_agent, **(headers or {})}
        response = await self._send(method, url, self._with_auth(base, scope))
        if response.code == 401:
            challenges = parse_challenges(",".join(
                v.decode("latin-1") for v in response.headers.getRawHeaders(b"www-authenticate", [])))
            await _discard(response)
            if await self._authenticate(challenges, scope):
                response = await self._send(method, url, self._with_auth(base, scope))
        if response.code in _REDIRECT_CODES:
            response = await self._follow(method, path, url, response, base)
        if response.code == 429:
            await _discard(response)
            retry_after = (response.headers.getRawHeaders(b"retry-after") or [None])[0]
            raise UpstreamThrottled(f"{self.config.namespace} answered 429 for {path}",
                                    retry_after.decode("latin-1") if retry_after is not None else None)
        if response.code >= 500:
            await _discard(response)
            raise UpstreamUnavailable(f"{self.config.namespace} answered {response.code} for {path}")
        return response

    async def _follow(self, method: str, path: str, url: str, response: IResponse,
                      headers: dict[str, str]) -> IResponse:
        """Follow a blob's redirects (object storage, a CDN) to allowed hosts, without credentials.

        The bytes are checked against the digest whoever serves them. A
        manifest, tag list, referrers list or token is only taken from the
        upstream itself: their redirects are upstream errors.
        """
        namespace = self.config.namespace
        for _ in range(MAX_REDIRECTS):
            code = response.code
            location = (response.headers.getRawHeaders(b"location") or [b""])[0].decode("latin-1")
            await _discard(response)
            if not _BLOB_PATH.match(path):
                raise UpstreamUnavailable(f"{namespace} answered {code} (a redirect) for {path}; "
                                          f"only blob redirects are followed")
            try:
                target = parse_target(urljoin(url, location)) if location else None
            except ValueError:
                target = None
            why = self.hosts.redirect_refusal(target)
            if target is None or why is not None:
                shown = target.shown if target is not None else repr(location[:200])
                log.warn("{namespace}: not following the redirect of {path} to {target}: {why}",
                         namespace=namespace, path=path, target=shown, why=why)
                raise UpstreamUnavailable(f"{namespace} redirected {path} to {shown}: {why}")
            log.info("{namespace}: {path} redirected to {target}", namespace=namespace, path=path,
                     target=target.shown)
            url = target.url
            # Never the upstream's credentials, token or client certificate: the
            # target may be anyone's storage, and a presigned URL needs none.
            response = await self._send(method, url, headers, elsewhere=not self.hosts.is_own(target))
            if response.code not in _REDIRECT_CODES:
                return response
        await _discard(response)
        raise UpstreamUnavailable(f"{namespace}: more than {MAX_REDIRECTS} redirects for {path}")

    def _with_auth(self, headers: dict[str, str], scope: str) -> dict[str, str]:
        authorization = self._authorization(scope)
        return {**headers, "Authorization": authorization} if authorization else headers

    async def _authenticate(self, challenges: list[Any], scope: str) -> bool:
        """Act on a 401's challenges; True when a retry may now succeed."""
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.params.get("realm"):
                await self._fetch_token(challenge.params, scope)
                return True
        for challenge in challenges:
            if challenge.scheme == "basic" and self._username is not None and not self._use_basic:
                self._use_basic = True
                return True
        return False

    async def _fetch_token(self, params: dict[str, str], scope: str) -> None:
        realm = params["realm"]
        target = parse_target(realm)
        why = self.hosts.realm_refusal(target)
        if target is None or why is not None:
            shown = target.shown if target is not None else repr(realm[:200])
            log.warn("{namespace}: not asking the token realm {realm}: {why}", namespace=self.config.namespace,
                     realm=shown, why=why)
            raise UpstreamUnavailable(f"{self.config.namespace}: token realm {shown}: {why}")
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"User-Agent": self.config.user_agent, "Accept": "application/json"}
        basic = self._basic_header() if self._may_have_credentials(target) else None
        if basic is not None:
            headers["Authorization"] = basic
        separator = "&" if "?" in realm else "?"
        response = await self._send("GET", f"{realm}{separator}{urlencode(query)}", headers,
                                    elsewhere=not self.hosts.is_own(target))
        body = await read_limited(response, _TOKEN_BODY_LIMIT)
        if response.code != 200:
            raise UpstreamUnavailable(f"{self.config.namespace}: token service answered {response.code}")
        try:
            document = load_json(body)
            token = document.get("token") or document.get("access_token")
            lifetime = int(document.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError, OverflowError):
            raise UpstreamUnavailable(f"{self.config.namespace}: token service sent no usable token") from None
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable(f"{self.config.namespace}: token service sent no token")
        expires = self._reactor.seconds() + max(lifetime - _TOKEN_MARGIN, 1)
        self._tokens[scope] = (token, expires)


    def _may_have_credentials(self, target: Target) -> bool:
        """Credentials go to a token realm over https or on the upstream's own host, else none."""
        if self.hosts.may_have_credentials(target):
            return True
        if self._username is not None:
            log.warn("{namespace}: asking the token realm {realm} without credentials: it is plain http on "
                     "another host", namespace=self.config.namespace, realm=target.shown)
        return False


def _describe(error: Exception) -> str:
    if isinstance(error, ResponseFailed):
        return "; ".join(f.getErrorMessage() for f in error.reasons) or "response failed"
    return str(error) or type(error).__name__


async def _discard(response: IResponse) -> None:
    try:
        await read_limited(response, 1024 * 1024)
    except Exception:
        pass


class BodyTooLarge(UpstreamUnavailable):
    """The upstream sent more than we accept for this kind of document."""


async def read_limited(response: IResponse, limit: int) -> bytes:
    """The whole body, refusing (and cutting off) more than ``limit`` bytes."""
    if isinstance(response.length, int) and response.length > limit:
        raise BodyTooLarge(f"upstream body of {response.length} bytes exceeds {limit}")
    parts: list[bytes] = []
    received = 0

    def collect(data: bytes) -> None:
        nonlocal received
        received += len(data)
        if received > limit:
            raise BodyTooLarge(f"upstream body exceeds {limit} bytes")
        parts.append(data)

    try:
        await _collect(response, collect)
    except BodyTooLarge:
        raise
    except Exception as e:
        raise UpstreamUnavailable(f"reading the upstream body failed: {_describe(e)}") from None
    return b"".join(parts)


class _Collector(Protocol):
    """A response body handed to ``collect`` as it arrives (as treq.collect does, without importing
    treq and its dependencies into every worker for this one use)."""

    def __init__(self, finished: Deferred[None], collect: Any) -> None:
        self.finished: Deferred[None] | None = finished
        self.collect = collect

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        try:
            self.collect(data)
        except BaseException:
            if self.transport is not None:
                self.transport.loseConnection()
            finished, self.finished = self.finished, None
            finished.errback(Failure())

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        finished, self.finished = self.finished, None
        if finished is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(None)
        else:
            finished.errback(reason)


def _collect(response: IResponse, collect: Any) -> Deferred[None]:
    finished: Deferred[None] = Deferred()
    response.deliverBody(_Collector(finished, collect))
    return finished
