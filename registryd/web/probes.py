"""Listeners for health checks only: ``/healthz`` and ``/readyz``, nothing else.

On a listener that demands client certificates (``tls_client_ca``) the
probes demand one too, and load-balancer health checks rarely have one. A
``probes:`` listener (``probes:tcp:8081:interface=127.0.0.1``) answers the
two probes over plain HTTP and 404 to every other path, so it opens no way
around the certificates.
"""
from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource

from registryd.errors import not_found

PREFIX = "probes:"
PATHS = frozenset({b"/healthz", b"/readyz"})


def split_probes(description: str) -> tuple[bool, str]:
    """(probes only?, the endpoint description without the prefix)."""
    if description.startswith(PREFIX):
        return True, description[len(PREFIX):]
    return False, description


class ProbesOnly(Resource):
    """The API's probe routes; the OCI error document for anything else."""

    isLeaf = True

    def __init__(self, api: Any) -> None:
        super().__init__()
        self._api = api

    def render(self, request: Any) -> Any:
        if request.path in PATHS:
            return self._api.render(request)
        error = not_found()
        request.setResponseCode(error.status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(error.document(), separators=(",", ":")).encode()
