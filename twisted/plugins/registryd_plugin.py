"""Twisted plugin drop-in: makes ``twistd registryd`` available."""
from twisted.application.service import ServiceMaker

registryd = ServiceMaker(
    "registryd",
    "registryd.tap",
    "OCI registry and pull-through cache",
    "registryd",
)
