"""The HTTP site: our request class in front of the API resource."""
from __future__ import annotations

from typing import Any

from twisted.web.server import Site

from registryd.web.app import RegistryAPI
from registryd.web.request import RegistryRequest


class RegistrySite(Site):
    """A Site whose requests stream upload bodies through ``api``."""

    displayTracebacks = False

    def __init__(self, api: RegistryAPI, reactor: Any) -> None:
        super().__init__(api.resource(), requestFactory=RegistryRequest, reactor=reactor)
        self.api = api
