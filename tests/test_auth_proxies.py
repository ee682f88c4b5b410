"""Who the client is behind a proxy, and credentials over plain HTTP.

* ``[auth] trusted_proxies``: ``X-Forwarded-For`` (right-most untrusted
  address) and ``X-Forwarded-Proto`` count only from those peers, so one
  guesser behind the load balancer does not slow down everybody, and a
  client cannot escape its count by writing the header itself.
* The PROXY protocol (a ``haproxy:tcp:...`` listener) gives the real client
  and the address it connected to; this is how these tests make a
  connection look non-loopback without leaving loopback.
* ``[auth] require_tls``: credentials on a plain listener that is not
  loopback are refused (403 saying to use TLS), anonymous requests served.
* The start-up warning for passwords on plain, non-loopback listeners.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher

from oci_client import Reply, _Exchange, _parse_response
from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import parse_access_rules
from registryd.auth.proxies import client_address, forwarded_https, parse_networks
from registryd.auth.settings import parse_auth_table
from test_security import AuthClient, auth_settings, basic, timed, write_htpasswd

pytestmark = pytest.mark.timeout(60)

USERS = {"alice": "alice-Secret-1"}
RULES = [{"users": ["anonymous", "*"], "repositories": ["public/**"], "actions": ["pull"]},
         {"users": ["alice"], "repositories": ["**"], "actions": ["pull", "push"]}]
TRUSTED = parse_networks(["127.0.0.1/32", "10.0.0.0/8", "::1"], "t")


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def test_client_address_is_the_rightmost_untrusted_hop() -> None:
    assert client_address("127.0.0.1", ["198.51.100.7"], TRUSTED) == "198.51.100.7"
    assert client_address("127.0.0.1", ["6.6.6.6, 198.51.100.7, 10.1.2.3"], TRUSTED) == "198.51.100.7"
    assert client_address("127.0.0.1", ["6.6.6.6", "198.51.100.7, 10.1.2.3"], TRUSTED) == "198.51.100.7"
    assert client_address("127.0.0.1", ["10.9.9.9, 10.1.2.3"], TRUSTED) == "10.9.9.9"     # all trusted
    assert client_address("127.0.0.1", ["evil, 198.51.100.7"], TRUSTED) == "198.51.100.7"
    assert client_address("127.0.0.1", ["198.51.100.7, not-an-address"], TRUSTED) == "127.0.0.1"
    assert client_address("127.0.0.1", ["[2001:db8::7]:4711"], TRUSTED) == "2001:db8::7"
    assert client_address("127.0.0.1", ["198.51.100.7:4711"], TRUSTED) == "198.51.100.7"
    assert client_address("::ffff:127.0.0.1", ["198.51.100.7"], TRUSTED) == "198.51.100.7"
    assert client_address("127.0.0.1", [], TRUSTED) == "127.0.0.1"
    # an untrusted peer's header is ignored, and without trusted proxies every header is
    assert client_address("198.51.100.9", ["1.2.3.4"], TRUSTED) == "198.51.100.9"
    assert client_address("127.0.0.1", ["1.2.3.4"], ()) == "127.0.0.1"


def test_forwarded_proto_only_from_trusted_peers() -> None:
    assert forwarded_https("10.0.0.5", ["https"], TRUSTED)
    assert forwarded_https("10.0.0.5", ["http, https"], TRUSTED)
    assert not forwarded_https("10.0.0.5", ["http"], TRUSTED)
    assert not forwarded_https("198.51.100.9", ["https"], TRUSTED)
    assert not forwarded_https("10.0.0.5", [], TRUSTED)


def test_auth_table_new_keys() -> None:
    settings = parse_auth_table({"trusted_proxies": ["10.0.0.5", "fd00::/8"], "require_tls": True,
                                 "check_threads": 1, "check_queue": 4, "checks_per_address": 3})
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.5/32", "fd00::/8"]
    assert settings.require_tls and settings.check_threads == 1 and settings.check_queue == 4
    assert settings.checks_per_address == 3
    for table, message in [
        ({"trusted_proxies": ["nope"]}, "'auth.trusted_proxies' has 'nope', which is not an IP address or network"),
        ({"trusted_proxies": [5]}, "'auth.trusted_proxies' must be a list of addresses or networks, not 5"),
        ({"trusted_proxies": "10.0.0.5"}, "'auth.trusted_proxies' must be a list"),
        ({"require_tls": 1}, "'auth.require_tls' must be true or false, not int 1"),
        ({"check_threads": 0}, "'auth.check_threads' must be greater than zero, not 0"),
        ({"check_queue": -1}, "'auth.check_queue' must be greater than zero, not -1"),
        ({"checks_per_address": True}, "'auth.checks_per_address' must be an integer, not bool True"),
    ]:
        with pytest.raises(AuthConfigError) as e:
            parse_auth_table(table)
        assert str(e.value).startswith(message), str(e.value)


@pytest_twisted.ensureDeferred
async def test_forwarded_for_counts_only_behind_trusted_proxies(make_registry: Any, tmp_path: Any,
                                                                events: list[dict[str, Any]]) -> None:
    """Behind a trusted proxy (127.0.0.1) each client behind it has its own
    count; the same header from a peer that is not trusted changes nothing."""
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), USERS)
    registry = make_registry(auth=auth_settings(htpasswd, failures_before_delay=1, max_delay=2,
                                                trusted_proxies=parse_networks(["127.0.0.1"], "t")),
                             access=parse_access_rules(RULES))
    guesser = AuthClient(registry.url, {**basic("alice", "guess"), "X-Forwarded-For": "6.6.6.6, 203.0.113.9"})
    for _ in range(2):
        assert (await guesser.get("/v2/", check=False)).status == 401
    took, reply = await timed(guesser.get("/v2/", check=False))
    assert reply.status == 401 and took >= 0.9, took
    alice = AuthClient(registry.url, {**basic("alice", USERS["alice"]), "X-Forwarded-For": "203.0.113.10"})
    took, reply = await timed(alice.get("/v2/"))
    assert reply.status == 200 and took < 0.5, took
    addresses = {e.get("address") for e in events if "authentication failed" in (e.get("log_format") or "")}
    assert addresses == {"203.0.113.9"}, addresses

    untrusted = make_registry(auth=auth_settings(htpasswd, failures_before_delay=1, max_delay=2,
                                                 trusted_proxies=parse_networks(["10.0.0.0/8"], "t")),
                              access=parse_access_rules(RULES))
    for forwarded in ("203.0.113.21", "203.0.113.22"):
        client = AuthClient(untrusted.url, {**basic("alice", "guess"), "X-Forwarded-For": forwarded})
        assert (await client.get("/v2/", check=False)).status == 401
    took, reply = await timed(AuthClient(untrusted.url, {**basic("alice", "guess"),
                                                         "X-Forwarded-For": "203.0.113.23"}).get("/v2/", check=False))
    assert reply.status == 401 and took >= 0.9, (took, "a spoofed X-Forwarded-For escaped the count")


async def via_proxy_protocol(port: int, source: str, destination: str, target: str,
                             headers: dict[str, str]) -> Reply:
    """One request on a PROXY protocol v1 connection from ``source`` to ``destination``."""
    lines = [f"PROXY TCP4 {source} {destination} 40000 443", f"GET {target} HTTP/1.1", "Host: registry.example",
             "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    raw = "\r\n".join(lines).encode() + b"\r\n\r\n"
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    protocol = await connectProtocol(endpoint, _Exchange(raw))
    return _parse_response("GET", target, await protocol.finished)


@pytest_twisted.ensureDeferred
async def test_require_tls_refuses_credentials_on_plain_non_loopback_connections(
        make_registry: Any, tmp_path: Any, events: list[dict[str, Any]]) -> None:
    """A ``haproxy:`` listener; the PROXY header says where each connection
    came from and went to. Credentials sent to a non-loopback address over
    plain HTTP: 403 saying to use TLS (and ``/v2/`` does not challenge
    anonymous requests there); to a loopback one, or with
    ``X-Forwarded-Proto: https`` from a trusted proxy: accepted. A failed
    login is logged with the PROXY source address."""
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), USERS)
    registry = make_registry(listen=("haproxy:tcp:0:interface=127.0.0.1",),
                             auth=auth_settings(htpasswd, require_tls=True,
                                                trusted_proxies=parse_networks(["10.0.0.5"], "t")),
                             access=parse_access_rules(RULES))
    port = registry.service.ports[0].getHost().port
    alice = basic("alice", USERS["alice"])

    refused = await via_proxy_protocol(port, "198.51.100.7", "203.0.113.10", "/v2/", alice)
    assert refused.status == 403 and refused.codes == ["DENIED"], str(refused)
    assert "TLS" in refused.json()["errors"][0]["message"]
    anonymous = await via_proxy_protocol(port, "198.51.100.7", "203.0.113.10", "/v2/", {})
    assert anonymous.status == 200 and anonymous.header("WWW-Authenticate") is None, str(anonymous)
    for header in ("Bearer anonymous", "Basic Og=="):     # the anonymous forms are no credentials
        reply = await via_proxy_protocol(port, "198.51.100.7", "203.0.113.10", "/v2/public/app/tags/list",
                                         {"Authorization": header})
        assert reply.status == 404 and reply.codes == ["NAME_UNKNOWN"], (header, str(reply))
    token = await via_proxy_protocol(port, "198.51.100.7", "203.0.113.10", "/v2/token", alice)
    assert token.status == 403, str(token)

    local = await via_proxy_protocol(port, "198.51.100.7", "127.0.0.1", "/v2/", alice)
    assert local.status == 200, str(local)
    behind_tls_proxy = await via_proxy_protocol(port, "10.0.0.5", "203.0.113.10", "/v2/",
                                                {**alice, "X-Forwarded-Proto": "https"})
    assert behind_tls_proxy.status == 200, str(behind_tls_proxy)
    spoofed = await via_proxy_protocol(port, "198.51.100.7", "203.0.113.10", "/v2/",
                                       {**alice, "X-Forwarded-Proto": "https"})
    assert spoofed.status == 403, str(spoofed)

    wrong = await via_proxy_protocol(port, "198.51.100.8", "127.0.0.1", "/v2/", basic("alice", "guess"))
    assert wrong.status == 401
    addresses = {e.get("address") for e in events if "authentication failed" in (e.get("log_format") or "")}
    assert addresses == {"198.51.100.8"}, addresses


class FakePort:
    def __init__(self, address: Any) -> None:
        self._address = address

    def getHost(self) -> Any:
        return self._address


@pytest.mark.parametrize("require_tls", [False, True])
def test_startup_warns_about_passwords_on_plain_listeners_others_can_reach(
        make_registry: Any, tmp_path: Any, events: list[dict[str, Any]], require_tls: bool) -> None:
    htpasswd = write_htpasswd(str(tmp_path / "htpasswd"), USERS)
    service = make_registry(auth=auth_settings(htpasswd, require_tls=require_tls)).service
    del events[:]
    for description, address in [
        ("tcp:5000:interface=127.0.0.1", IPv4Address("TCP", "127.0.0.1", 5000)),
        ("tls:5443:cert=c:key=k", IPv4Address("TCP", "0.0.0.0", 5443)),
        ("unix:/run/registryd.sock", UNIXAddress(b"/run/registryd.sock")),
        ("tcp:5000", IPv4Address("TCP", "0.0.0.0", 5000)),
    ]:
        service._warn_if_credentials_in_clear(description, FakePort(address))
    warnings = [formatEvent(e) for e in events if e.get("log_level") is not None
                and e["log_level"].name == "warn"]
    assert len(warnings) == 1, warnings
    assert "tcp:5000" in warnings[0] and "not loopback-only" in warnings[0]
    assert ("refused" if require_tls else "clear text") in warnings[0], warnings[0]

    open_service = make_registry().service
    del events[:]
    open_service._warn_if_credentials_in_clear("tcp:5000", FakePort(IPv4Address("TCP", "0.0.0.0", 5000)))
    assert not [e for e in events if e.get("log_level") is not None and e["log_level"].name == "warn"]
