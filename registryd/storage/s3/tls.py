"""TLS to the object store: the system's trust roots or a configured CA."""
from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

_END = b"-----END CERTIFICATE-----"


@implementer(IPolicyForHTTPS)
class S3TLSPolicy:
    """Verifies the endpoint against ``ca_file`` (or the platform), unless told not to.

    The host name checked is the one connected to, so virtual-host
    addressing needs a certificate for ``*.endpoint-host``.
    """

    def __init__(self, ca_file: str | None, verify: bool) -> None:
        self._verify = verify
        self._trust: Any = None
        if ca_file:
            with open(ca_file, "rb") as f:
                pems = [part + _END for part in f.read().split(_END) if b"-----BEGIN CERTIFICATE-----" in part]
            self._trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        if not self._verify:
            return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust or ssl.platformTrust())
