"""Which hosts one upstream may send registryd to, and what they may be given.

An upstream names other hosts in two places: a blob redirect (``Location``,
to object storage or a CDN) and the ``realm`` of a Bearer challenge (its
token service). registryd contacts such a host only when it is the
upstream's own host or in its ``allowed_hosts``; a redirect is followed
over https only (plain http only when the upstream itself is ``http://``
with ``tls_verify = false``, or to the upstream's own host on its own
scheme), and the upstream's credentials go to a token realm only over https
or on the upstream's own host.
"""
from __future__ import annotations

from urllib.parse import urlsplit

import attrs

from registryd.config import UpstreamConfig


@attrs.frozen
class Target:
    """An absolute http(s) URL another host was named by."""

    scheme: str
    host: str           # lower case, without brackets
    port: int
    url: str

    @property
    def shown(self) -> str:
        """The URL without its query (presigned URLs carry signatures there), for logs and messages."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"


def parse_target(url: str) -> Target | None:
    """``url`` as a Target, or None when it is not an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return Target(scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80), url)


def host_matches(pattern: str, target: Target) -> bool:
    """``host`` (any port), ``host:port``, or ``*.domain`` (any subdomain, any port)."""
    name, _, port = pattern.partition(":")
    if port and int(port) != target.port:
        return False
    if name.startswith("*."):
        return target.host.endswith(name[1:])
    return target.host == name


class UpstreamHosts:
    """The host rules of one upstream."""

    def __init__(self, config: UpstreamConfig) -> None:
        own = parse_target(config.url)
        assert own is not None, config.url
        self._own = own
        self._allowed = config.allowed_hosts
        self._plain_http = own.scheme == "http" and not config.tls_verify

    def is_own(self, target: Target) -> bool:
        """The upstream's own host (on any port)."""
        return target.host == self._own.host

    def _allowed_host(self, target: Target) -> bool:
        return self.is_own(target) or any(host_matches(pattern, target) for pattern in self._allowed)

    def redirect_refusal(self, target: Target | None) -> str | None:
        """Why a blob redirect to ``target`` may not be followed, or None."""
        if target is None:
            return "not an http(s) URL"
        if not self._allowed_host(target):
            return f"{target.host} is not the upstream's host nor in its allowed_hosts"
        same_origin = self.is_own(target) and target.scheme == self._own.scheme
        if target.scheme != "https" and not (self._plain_http or same_origin):
            return "plain http (allowed only for an http:// upstream with tls_verify = false)"
        return None

    def realm_refusal(self, target: Target | None) -> str | None:
        """Why a token realm at ``target`` may not be contacted, or None."""
        if target is None:
            return "not an http(s) URL"
        if not self._allowed_host(target):
            return f"{target.host} is not the upstream's host nor in its allowed_hosts"
        return None

    def may_have_credentials(self, target: Target) -> bool:
        """May the upstream's username and password go to a token realm at ``target``?"""
        return target.scheme == "https" or self.is_own(target)
