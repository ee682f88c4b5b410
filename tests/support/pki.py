"""A throw-away PKI made with ``cryptography``, for every test that needs certificates.

For unit tests and for end-to-end tests that point skopeo at a TLS
registryd (``--cert-dir`` wants ``ca.crt``, ``client.cert``, ``client.key``).
Keys are EC P-256: fast to generate and accepted everywhere.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


@attrs.frozen
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: Any

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def write(self, directory: str, name: str, cert_suffix: str = ".pem", key_suffix: str = ".key") -> tuple[str, str]:
        """Write ``name.pem`` and ``name.key`` under ``directory``; return both paths."""
        cert_path = os.path.join(directory, name + cert_suffix)
        key_path = os.path.join(directory, name + key_suffix)
        with open(cert_path, "wb") as f:
            f.write(self.cert_pem())
        with open(key_path, "wb") as f:
            f.write(self.key_pem())
        return cert_path, key_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "registryd test CA", *, not_before: datetime.datetime | None = None,
            not_after: datetime.datetime | None = None) -> Issued:
    """A self-signed CA certificate."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _DAY)
        .not_valid_after(not_after or now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue(ca: Issued, common_name: str, *, hosts: Sequence[str] = (), client: bool = False,
          not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None,
          key: Any = None, signer: bool = False) -> Issued:
    """A leaf certificate signed by ``ca``: a server certificate for
    ``hosts`` (DNS names or IP addresses), a client certificate, or (``signer``)
    one that only signs, such as a token server's."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _DAY)
        .not_valid_after(not_after or now + 30 * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if signer:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)
