"""Only listed hosts are contacted: an upstream's redirects and token realm.

The upstream is the fake on 127.0.0.1; a second fake on 127.0.0.2 is
"another host" (object storage, a CDN, a token service, or an attacker's
machine). Redirects and realms to arbitrary hosts are faults a real
registry does not produce on demand, hence the fakes.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.logger import formatEvent, globalLogPublisher

from fake_upstream import FakeUpstream, fake_upstream  # noqa: F401  (fixture)
from oci_client import OCI_MANIFEST, Client
from support.pki import issue, make_ca
from registryd.config import UpstreamConfig
from registryd.mirror.client import MAX_REDIRECTS
from registryd.mirror.hosts import UpstreamHosts, parse_target

NS = "upstream.test"
OTHER = "127.0.0.2"


@pytest.fixture
def other_host() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(reactor).start(interface=OTHER)
    yield fake
    pytest_twisted.blockon(fake.close())


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def mirror(fake: FakeUpstream, **extra: Any) -> UpstreamConfig:
    return UpstreamConfig(namespace=NS, url=fake.url, **extra)


@pytest_twisted.ensureDeferred
async def test_only_blob_redirects_are_ever_followed(fake_upstream: Any, other_host: Any, make_registry: Any) -> None:
    """A manifest, tag list or referrers list comes from the upstream itself, even from an allowed host."""
    image = fake_upstream.add_image("lib/app", "v1")
    other_host.add_image("lib/app", "v1", seed="other")
    other_host.add_image("lib/app", "v2", seed="elsewhere")
    manifest_by_tag = fake_upstream.manifest_path("lib/app", "v2")
    fake_upstream.redirect(manifest_by_tag, other_host.url + manifest_by_tag)
    fake_upstream.redirect("/v2/lib/app/tags/list", other_host.url + "/v2/lib/app/tags/list")
    referrers = f"/v2/lib/app/referrers/{image['digest']}"
    fake_upstream.redirect(referrers, other_host.url + referrers)
    by_digest = fake_upstream.manifest_path("lib/app", image["digest"])
    fake_upstream.redirect(by_digest, "file:///etc/passwd", code=302)
    registry = make_registry(upstreams=(mirror(fake_upstream, allowed_hosts=(OTHER,), tls_verify=False),))
    client = Client(registry.url)
    headers = {"Accept": OCI_MANIFEST}
    for path in (f"/v2/{NS}/lib/app/manifests/v2", f"/v2/{NS}/lib/app/tags/list",
                 f"/v2/{NS}/lib/app/manifests/{image['digest']}"):
        reply = await client.get(path, headers=headers)
        assert reply.status == 503 and reply.codes == ["UNAVAILABLE"], str(reply)
        assert b"redirect" in reply.body, str(reply)
    reply = await client.get(f"/v2/{NS}{referrers.removeprefix('/v2')}")
    assert reply.status == 200 and reply.json()["manifests"] == [], str(reply)
    assert other_host.requests == []


@pytest.mark.parametrize("case", ["unlisted host", "plain http", "file scheme", "no location"])
@pytest_twisted.ensureDeferred
async def test_blob_redirects_to_hosts_or_schemes_not_allowed_are_refused(
        fake_upstream: Any, other_host: Any, make_registry: Any, case: str) -> None:
    layer = fake_upstream.add_image("lib/app", "v1", layer_sizes=[5000])["layers"][0]
    other_host.add_blob("lib/app", layer["data"])
    path = fake_upstream.blob_path("lib/app", layer["digest"])
    settings: dict[str, Any] = {
        "unlisted host": {"tls_verify": False},
        "plain http": {"allowed_hosts": (OTHER,)},      # an allowed host, but https only (tls_verify)
        "file scheme": {"allowed_hosts": (OTHER,), "tls_verify": False},
        "no location": {"allowed_hosts": (OTHER,), "tls_verify": False},
    }[case]
    location = {"file scheme": "file:///etc/passwd", "no location": ""}.get(case, other_host.url + path)
    fake_upstream.redirect(path, location)
    registry = make_registry(upstreams=(mirror(fake_upstream, **settings),))
    client = Client(registry.url)
    for method in ("HEAD", "GET"):
        reply = await client.request(method, f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
        assert reply.status == 503, str(reply)
    assert other_host.requests == []


@pytest_twisted.ensureDeferred
async def test_a_blob_redirect_to_an_allowed_host_is_followed_without_credentials(
        fake_upstream: Any, other_host: Any, make_registry: Any, log_lines: list[str]) -> None:
    """Docker Hub's pattern: the registry answers 307 to a presigned CDN URL."""
    layer = fake_upstream.add_image("lib/app", "v1", layer_sizes=[50_000])["layers"][0]
    other_host.add_blob("lib/app", layer["data"])
    path = fake_upstream.blob_path("lib/app", layer["digest"])
    fake_upstream.redirect(path, f"{other_host.url}{path}?X-Signature=presigned-secret")
    fake_upstream.challenge('Basic realm="fake"')
    registry = make_registry(upstreams=(mirror(fake_upstream, username="robot", password="robot-Secret",
                                               allowed_hosts=(OTHER,), tls_verify=False),))
    client = Client(registry.url)
    head = await client.head(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
    assert head.status == 200 and head.header("Content-Length") == "50000", str(head)
    reply = await client.get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
    assert reply.status == 200 and reply.body == layer["data"], str(reply)
    # The upstream got the credentials; the other host neither them nor any Authorization.
    assert any("authorization" in r.headers for r in fake_upstream.requests if r.path == path)
    fetched = [r for r in other_host.requests if r.path == path]
    assert [r.method for r in fetched] == ["HEAD", "GET"] and fetched[0].query == "X-Signature=presigned-secret"
    assert all("authorization" not in r.headers for r in other_host.requests)
    followed = [line for line in log_lines if "redirected to" in line]
    assert followed and all(OTHER in line and "presigned-secret" not in line for line in followed), log_lines


def tls_options(server: Any, client_ca: Any) -> ssl.CertificateOptions:
    """The other host's TLS: its certificate, asking (not requiring) for a client certificate."""
    private = ssl.PrivateCertificate.loadPEM(server.cert_pem() + b"\n" + server.key_pem())
    return ssl.CertificateOptions(privateKey=private.privateKey.original, certificate=private.original,
                                  verify=True, requireCertificate=False,
                                  caCerts=[ssl.Certificate.loadPEM(client_ca.cert_pem()).original])


@pytest.mark.parametrize("signed_by", ["the upstream's CA", "an unknown CA"])
@pytest_twisted.ensureDeferred
async def test_an_https_redirect_is_verified_and_gets_no_client_certificate(
        fake_upstream: Any, make_registry: Any, tmp_path: Any, signed_by: str) -> None:
    """Object storage behind the upstream's own CA (ca_file): verified, and the upstream's mTLS
    client certificate stays with the upstream."""
    ca = make_ca()
    ca_file, _ = ca.write(str(tmp_path), "ca")
    client_cert, client_key = issue(ca, "registryd", client=True).write(str(tmp_path), "client")
    server = issue(ca if signed_by == "the upstream's CA" else make_ca("someone else"), OTHER, hosts=[OTHER])
    storage = FakeUpstream(reactor).start(interface=OTHER, tls=tls_options(server, ca))
    try:
        layer = fake_upstream.add_image("lib/app", "v1", layer_sizes=[20_000])["layers"][0]
        storage.add_blob("lib/app", layer["data"])
        path = fake_upstream.blob_path("lib/app", layer["digest"])
        fake_upstream.redirect(path, storage.url + path)
        registry = make_registry(upstreams=(mirror(fake_upstream, allowed_hosts=(OTHER,), ca_file=ca_file,
                                                   client_cert=client_cert, client_key=client_key),))
        reply = await Client(registry.url).get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
        if signed_by == "an unknown CA":
            assert reply.status == 503, str(reply)
            assert storage.requests == []
            return
        assert reply.status == 200 and reply.body == layer["data"], str(reply)
        assert [(r.path, r.client_certificate) for r in storage.requests] == [(path, False)]
    finally:
        await storage.close()


@pytest_twisted.ensureDeferred
async def test_a_redirect_loop_ends_as_an_upstream_error(fake_upstream: Any, make_registry: Any) -> None:
    layer = fake_upstream.add_image("lib/app", "v1")["layers"][0]
    path = fake_upstream.blob_path("lib/app", layer["digest"])
    fake_upstream.redirect(path, fake_upstream.url + path)     # the upstream's own host: allowed, and forever
    registry = make_registry(upstreams=(mirror(fake_upstream),))
    reply = await Client(registry.url).get(f"/v2/{NS}/lib/app/blobs/{layer['digest']}")
    assert reply.status == 503 and reply.codes == ["UNAVAILABLE"], str(reply)
    assert fake_upstream.count("GET", path) == MAX_REDIRECTS + 1


@pytest.mark.parametrize("realm_host, allowed, credentials", [
    ("other", True, False),     # allowed, plain http on another host: asked, without credentials
    ("other", False, None),     # not allowed: never asked
    ("own", False, True),       # the upstream's own host: credentials go there even over http
])
@pytest_twisted.ensureDeferred
async def test_credentials_go_to_a_token_realm_only_over_https_or_on_the_upstream_host(
        fake_upstream: Any, other_host: Any, make_registry: Any, realm_host: str, allowed: bool,
        credentials: bool | None) -> None:
    image = fake_upstream.add_image("lib/app", "v1")
    realm = (other_host if realm_host == "other" else fake_upstream).url + "/token"
    fake_upstream.challenge(f'Bearer realm="{realm}",service="fake"')
    registry = make_registry(upstreams=(mirror(fake_upstream, username="robot", password="robot-Secret",
                                               allowed_hosts=(OTHER,) if allowed else ()),))
    reply = await Client(registry.url).get(f"/v2/{NS}/lib/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
    token_requests = [r for r in (other_host if realm_host == "other" else fake_upstream).requests
                      if r.path == "/token"]
    if credentials is None:
        assert reply.status == 503 and reply.codes == ["UNAVAILABLE"], str(reply)
        assert b"allowed_hosts" in reply.body, str(reply)
        assert other_host.requests == []
        return
    assert reply.status == 200 and reply.body == image["manifest"], str(reply)
    assert len(token_requests) == 1
    assert ("authorization" in token_requests[0].headers) is credentials, token_requests
    manifest_requests = [r for r in fake_upstream.requests if r.path.endswith("/manifests/v1")]
    assert manifest_requests[-1].headers.get("authorization") == "Bearer fake-token"


@pytest.mark.parametrize("url, allowed, tls_verify, target, refusal", [
    ("https://registry-1.docker.io", ("production.cloudflare.docker.com",), True,
     "https://production.cloudflare.docker.com/registry-v2/x?sig=1", None),
    ("https://registry-1.docker.io", ("production.cloudflare.docker.com",), True,
     "http://production.cloudflare.docker.com/x", "plain http"),
    ("https://registry-1.docker.io", (), True, "https://evil.example/x", "not the upstream's host"),
    ("https://registry-1.docker.io", (), True, "https://registry-1.docker.io:8443/x", None),   # own host, any port
    ("https://r.example", ("*.cdn.example",), True, "https://a.b.cdn.example/x", None),
    ("https://r.example", ("*.cdn.example",), True, "https://cdn.example/x", "not the upstream's host"),
    ("https://r.example", ("cdn.example:8443",), True, "https://cdn.example/x", "not the upstream's host"),
    ("https://r.example", ("cdn.example:8443",), True, "https://CDN.example:8443/x", None),
    ("http://r.example", (), True, "http://r.example/x", None),            # same origin
    ("http://r.example", ("cdn.example",), True, "http://cdn.example/x", "plain http"),
    ("http://r.example", ("cdn.example",), False, "http://cdn.example/x", None),   # http upstream marked insecure
    ("https://r.example", (), True, "file:///etc/passwd", "not an http(s) URL"),
    ("https://r.example", (), True, "https://[::1/x", "not an http(s) URL"),
    ("https://r.example", (), True, "https://r.example:99999/x", "not an http(s) URL"),
])
def test_redirect_rules(url: str, allowed: tuple[str, ...], tls_verify: bool, target: str,
                        refusal: str | None) -> None:
    hosts = UpstreamHosts(UpstreamConfig(namespace="r.example", url=url, allowed_hosts=allowed,
                                         tls_verify=tls_verify))
    why = hosts.redirect_refusal(parse_target(target))
    assert (why is None) if refusal is None else (why is not None and refusal in why), why


def test_credentials_for_a_token_realm() -> None:
    hosts = UpstreamHosts(UpstreamConfig(namespace="r.example", url="https://r.example",
                                         allowed_hosts=("auth.example",)))
    for realm, allowed, credentials in [("https://auth.example/token", True, True),
                                        ("http://auth.example/token", True, False),
                                        ("http://r.example:8080/token", True, True),
                                        ("https://elsewhere.example/token", False, True)]:
        target = parse_target(realm)
        assert target is not None
        assert (hosts.realm_refusal(target) is None) is allowed, realm
        assert hosts.may_have_credentials(target) is credentials, realm
