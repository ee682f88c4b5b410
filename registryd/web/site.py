"""The HTTP site: our channel and request class in front of the API resource."""
from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from registryd.web.app import RegistryAPI
from registryd.web.request import RegistryRequest

_TLS_HANDSHAKE = 0x16
_NOT_TLS = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" \
           b"This port speaks plain HTTP, not TLS.\n"


class RegistryChannel(HTTPChannel):
    """HTTP/1.1, answering a TLS handshake on a plain port at once.

    Clients told a registry is "insecure" (skopeo, podman, containerd) try
    TLS first and fall back to plain HTTP only when the handshake fails;
    a server that waits for a request line makes each of them sit out a
    10 s handshake timeout.
    """

    _first_bytes_seen = False

    def dataReceived(self, data: bytes) -> None:
        if not self._first_bytes_seen and data:
            self._first_bytes_seen = True
            if data[0] == _TLS_HANDSHAKE:
                assert self.transport is not None
                self.transport.write(_NOT_TLS)
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class RegistrySite(Site):
    """A Site whose requests stream upload bodies through ``api``."""

    displayTracebacks = False
    protocol = RegistryChannel  # type: ignore[assignment]

    def __init__(self, api: RegistryAPI, reactor: Any) -> None:
        super().__init__(api.resource(), requestFactory=RegistryRequest, reactor=reactor)
        self.api = api
