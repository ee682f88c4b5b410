"""Which upstream, if any, a request's repository belongs to.

Three ways a client asks for a mirror, all served by one instance:

* containerd ``hosts.toml``: ``/v2/library/alpine/...?ns=docker.io``;
* cri-o / podman ``registries.conf`` path mirrors: ``/v2/docker.io/library/alpine/...``;
* docker ``registry-mirrors``: ``/v2/library/alpine/...`` goes to the default upstream.

With a default upstream every bare name is ambiguous, so bare names belong
to it except under the configured local prefixes: a local push can never
change what a client of the default upstream gets.

Only configured namespaces ever map to an upstream, so no request can make
registryd contact a host the operator did not list.
"""
from __future__ import annotations

from typing import Callable

import attrs

from registryd.config import DOCKER_HUB, UpstreamConfig
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

    def route(self, name: str, ns: str | None, is_local: Callable[[str], bool] | None = None) -> Route | None:
        """The mirror route for ``name``, or None when it is a local repository.

        Without ``is_local``, a name that only the default upstream takes
        comes back with ``by_default`` set (it is never pushable).
        Raises NAME_INVALID for a name no route can take.
        """
        if not self._by_namespace:
            return None
        if ns:
            upstream = self._by_namespace.get(ns.lower())
            if upstream is not None:
                return Route(upstream, _remote_name(upstream, name))
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
