"""Which upstream, if any, a request's repository belongs to.

Three ways a client asks for a mirror, all served by one instance:

* containerd ``hosts.toml``: ``/v2/library/alpine/...?ns=docker.io``;
* cri-o / podman ``registries.conf`` path mirrors: ``/v2/docker.io/library/alpine/...``;
* docker ``registry-mirrors``: ``/v2/library/alpine/...`` goes to the default upstream.

With a default upstream every bare name is ambiguous, so bare names belong
to it except under the configured local prefixes: a local push can never
change what a client of the default upstream gets.

Only configured namespaces ever map to an upstream, so no request can make
registryd contact a host the operator did not list. A ``?ns=`` that names
no configured upstream is ``404 NAME_UNKNOWN``: a client asking for one
registry's image must never get another's (a local repository, or the
default upstream's). The one exception is ``?ns=`` naming registryd itself
(the request's ``Host``), as containerd sends when registryd is the
registry it pulls from, not a mirror: that request is routed as if it had
no ``ns``.
"""
from __future__ import annotations

from typing import Callable

import attrs

from registryd.config import DOCKER_HUB, UpstreamConfig
from registryd.errors import RegistryError
from registryd.names import check_name


@attrs.frozen
class Route:
    """A mirrored repository: the upstream, and the name to ask it for."""

    upstream: UpstreamConfig
    remote: str
    # Reached through the default upstream (a bare name outside the local prefixes).
    by_default: bool = False


def _remote_name(upstream: UpstreamConfig, name: str) -> str:
    check_name(name)
    if upstream.namespace == DOCKER_HUB and "/" not in name:
        return f"library/{name}"
    return name


def namespace_unknown(ns: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", f"no upstream is configured for namespace {ns[:255]!r}: "
                                              "registryd does not mirror it", {"namespace": ns[:255]})


class Router:
    """Maps a client's repository name (and ``ns``) to an upstream, or to local."""

    def __init__(self, upstreams: tuple[UpstreamConfig, ...], local_prefixes: tuple[str, ...] = ()) -> None:
        self._by_namespace = {u.namespace: u for u in upstreams}
        self._default = next((u for u in upstreams if u.default), None)
        self._local_prefixes = local_prefixes

    def is_local_name(self, name: str) -> bool:
        """Is ``name`` under one of the local prefixes (``team`` holds ``team/app``)?"""
        return any(name == prefix or name.startswith(prefix + "/") for prefix in self._local_prefixes)

    @property
    def enabled(self) -> bool:
        return bool(self._by_namespace)

    def route(self, name: str, ns: str | None, is_local: Callable[[str], bool] | None = None,
              host: str | None = None) -> Route | None:
        """The mirror route for ``name``, or None when it is a local repository.

        Without ``is_local``, a name that only the default upstream takes
        comes back with ``by_default`` set (it is never pushable).
        ``host`` is the request's Host header: a ``ns`` equal to it is ignored.
        Raises NAME_INVALID for a name no route can take, NAME_UNKNOWN for a
        ``ns`` that is neither a configured upstream nor ``host``.
        """
        if ns:
            upstream = self._by_namespace.get(ns.lower())
            if upstream is not None:
                return Route(upstream, _remote_name(upstream, name))
            if host is None or ns.lower() != host.lower():
                raise namespace_unknown(ns)
        if not self._by_namespace:
            return None
        first, sep, rest = name.partition("/")
        upstream = self._by_namespace.get(first.lower()) if sep else None
        if upstream is not None:
            return Route(upstream, _remote_name(upstream, rest))
        check_name(name)
        if self._default is None or self.is_local_name(name):
            return None
        if is_local is None:
            return Route(self._default, _remote_name(self._default, name), by_default=True)
        if is_local(name):
            return None
        return Route(self._default, _remote_name(self._default, name))
