"""Which client a request comes from, behind trusted reverse proxies.

Failed logins are counted per client address. Behind a load balancer every
connection comes from the balancer, so one guesser would slow down every
user. ``X-Forwarded-For`` (and ``X-Forwarded-Proto``) are believed only
from peers listed in ``[auth] trusted_proxies``: the client is then the
right-most address in the header that is not itself a trusted proxy (what
the balancer saw), never the left-most (which the client can write).

The PROXY protocol needs nothing here: a ``haproxy:tcp:5000`` listener
(Twisted's endpoint) already reports the proxied client as the peer.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Sequence

from registryd.auth.errors import AuthConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[Any], where: str) -> tuple[Network, ...]:
    """``["127.0.0.1/32", "10.0.0.0/8", "::1"]`` -> networks; AuthConfigError naming a bad one."""
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise AuthConfigError(f"'{where}' must be a list of addresses or networks, not {value!r}")
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise AuthConfigError(f"'{where}' has {value!r}, which is not an IP address or network "
                                  f"(e.g. \"10.0.0.0/8\")") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:          # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:                         # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(peer: str, trusted: Iterable[Network]) -> bool:
    address = _address(peer)
    return address is not None and any(address in network for network in trusted)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The address failures are counted for: ``peer`` itself unless it is a
    trusted proxy; then the right-most untrusted ``X-Forwarded-For`` entry
    (the left-most one when every entry is trusted)."""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break       # garbage the client wrote: the hop before it is as far as we can trust
        client = str(address)
        if not any(address in network for network in trusted):
            break
    return client


def forwarded_https(peer: str, forwarded_proto: Sequence[str], trusted: Sequence[Network]) -> bool:
    """Did a trusted proxy receive this request over TLS (``X-Forwarded-Proto: https``)?"""
    if not forwarded_proto or not trusted or not is_trusted(peer, trusted):
        return False
    last = forwarded_proto[-1].split(",")[-1].strip().lower()
    return last == "https"


def is_loopback(host: str) -> bool:
    address = _address(host)
    return address is not None and address.is_loopback
