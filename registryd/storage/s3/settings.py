"""The ``[storage.s3]`` table: where the shared object store is and how to sign.

::

    [storage.s3]
    endpoint = "https://rgw.example:7480"   # http(s)://host[:port]
    bucket = "registry"
    region = "us-east-1"                   # the SigV4 signing region
    access_key_id = "AKIA..."
    secret_access_key_env = "REGISTRYD_S3_SECRET"   # or secret_access_key = "...",
                                                    # or credentials_file = "/etc/registryd/s3"
                                                    #    (one line "access_key_id:secret")
    addressing = "path"                    # or "virtual" (bucket.host)
    ca_file = "/etc/registryd/s3-ca.pem"   # trust this CA instead of the system's
    verify_tls = true
    prefix = "site-a/"                     # every key lives under this prefix
    part_size = 16777216                   # multipart part size, 5 MiB .. 5 GiB
    connect_timeout = 10                   # seconds
    idle_timeout = 60                      # seconds without a byte either way
    request_timeout = 10                   # seconds an operation waits for the store's answer
    ready_timeout = 3                      # seconds /readyz gives its write-and-read probe
    max_attempts = 3                       # tries for 5xx/429 and lost connections

The secret sources mirror ``[[upstream]]`` credentials: exactly one of a
value, an environment variable's name, or a file; the variable or the file
is read when the S3 client is made (``registryd.secrets``), not here.
``S3Settings.from_table`` raises S3ConfigError with one line naming the key;
the config loader reads the same table with ``registryd.schema`` and raises
its own ConfigError.
"""
from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Mapping

import attrs

from registryd.schema import Key, one_of, positive, read_table, setting
from registryd.secrets import Secret, in_file

MiB = 1024 * 1024
GiB = 1024 * MiB
#: S3's bounds for a multipart part (the last part may be smaller).
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
ADDRESSING = ("path", "virtual")

# Bucket names as S3 accepts them for new buckets: these also work as a DNS label
# in virtual-host addressing.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ENDPOINT = re.compile(r"^https?://[^/\s?#@]+/?$")
_REGION = re.compile(r"^[a-z0-9-]+$")


class S3ConfigError(ValueError):
    """An S3 setting that cannot be used; the message is one line naming the key."""


def _endpoint(where: str, value: str) -> str:
    if not _ENDPOINT.match(value):
        raise S3ConfigError(f"'{where}' must be http(s)://host[:port], not {value!r}")
    return value.rstrip("/")


def _bucket(where: str, value: str) -> str:
    if not _BUCKET.match(value) or ".." in value:
        raise S3ConfigError(f"'{where}' must be 3-63 lowercase letters, digits, dots and hyphens, not {value!r}")
    return value


def _region(where: str, value: str) -> str:
    if not _REGION.match(value):
        raise S3ConfigError(f"'{where}' must be a region name such as us-east-1, not {value!r}")
    return value


def _readable(where: str, value: str) -> str:
    if not os.access(value, os.R_OK):
        raise S3ConfigError(f"'{where}': cannot read {value}")
    return value


def _part_size(where: str, value: int) -> int:
    if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
        raise S3ConfigError(f"'{where}' must be between {MIN_PART_SIZE} (5 MiB) and "
                            f"{MAX_PART_SIZE} (5 GiB), not {value!r}")
    return value


def _normalize_prefix(where: str, prefix: str) -> str:
    """``"a/b"``, ``"/a/b/"`` -> ``"a/b/"``: the prefix is a folder, never half a name."""
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


@attrs.frozen
class S3Settings:
    """The object store a node uses, after validation.

    The keys are secrets only by reference until the client needs them
    (``registryd.secrets``): ``access_key_id`` and ``secret_access_key`` read
    the variable or the file on access.
    """

    endpoint: str = setting(kind=str, check=_endpoint, required=True, doc="http(s)://host[:port]")
    bucket: str = setting(kind=str, check=_bucket, required=True, doc="the bucket, created beforehand")
    _access_key_id: str | Secret = setting(kind=str, doc="the access key", alias="access_key_id")
    _secret_access_key: str | Secret = setting(kind=str, doc="its secret, in this file itself", repr=False,
                                               alias="secret_access_key")
    region: str = setting("us-east-1", str, _region, "the SigV4 signing region")
    addressing: str = setting("path", str, one_of(*ADDRESSING), "path, or virtual (bucket.host)")
    ca_file: str | None = setting(None, str, _readable, "trust this CA instead of the system's")
    verify_tls: bool = setting(True, bool, doc="check the store's certificate")
    prefix: str = setting("", str, _normalize_prefix, "every key lives under this prefix")
    part_size: int = setting(16 * MiB, int, _part_size, "multipart part size, 5 MiB .. 5 GiB")
    connect_timeout: float = setting(10, int, positive, "seconds")
    idle_timeout: float = setting(60, int, positive, "seconds without a byte either way")
    #: The deadline for the store's answer to one operation, retries included
    #: (never longer than ``idle_timeout``): past it the store is unavailable.
    request_timeout: float = setting(10, int, positive, "seconds an operation waits for the store's answer")
    #: The whole of /readyz's probe (write, then read back a small object).
    ready_timeout: float = setting(3, int, positive, "seconds /readyz gives its write-and-read probe")
    max_attempts: int = setting(3, int, positive, "tries for 5xx/429 and lost connections")
    #: Copies larger than this go through multipart UploadPartCopy; S3 refuses
    #: CopyObject past 5 GiB. Not a config key: tests lower it.
    copy_threshold: int = 5 * GiB

    #: The secret's other sources (exactly one of the three is given).
    EXTRA_KEYS: ClassVar[dict[str, Key]] = {
        "secret_access_key_env": Key(str, doc="the environment variable holding the secret"),
        "credentials_file": Key(str, doc="a file with one line access_key_id:secret_access_key"),
    }

    @property
    def access_key_id(self) -> str:
        return self._access_key_id.reveal() if isinstance(self._access_key_id, Secret) else self._access_key_id

    @property
    def secret_access_key(self) -> str:
        """Read from its variable or file now, if the config named one (SecretUnavailable otherwise)."""
        secret = self._secret_access_key
        return secret.reveal() if isinstance(secret, Secret) else secret

    def with_secrets_read(self) -> S3Settings:
        """The same, holding the keys' values: read from their variable or file once (SecretUnavailable)."""
        return attrs.evolve(self, access_key_id=self.access_key_id, secret_access_key=self.secret_access_key)

    def secrets(self) -> tuple[str | Secret, ...]:
        return (self._access_key_id, self._secret_access_key)

    def in_file(self, origin: str | None) -> S3Settings:
        """The same, with secret errors naming the config file ``origin``."""
        access_key_id, secret_access_key = (in_file(self._access_key_id, origin),
                                            in_file(self._secret_access_key, origin))
        assert access_key_id is not None and secret_access_key is not None
        return attrs.evolve(self, access_key_id=access_key_id, secret_access_key=secret_access_key)

    @property
    def stall_timeout(self) -> float:
        """Seconds a body the store sends may go without a byte while we want
        more: a store that stops mid-body is as unavailable as one that does
        not answer (time a slow consumer keeps the body paused is not counted)."""
        return min(self.request_timeout, self.idle_timeout)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str = "storage.s3") -> S3Settings:
        """Validate a parsed TOML table into S3Settings."""
        return _parse(table, where)


_SECRET_SOURCES = ("secret_access_key", "secret_access_key_env", "credentials_file")


def _parse(table: Mapping[str, Any], where: str) -> S3Settings:
    settings = read_table(S3Settings, table, where, S3ConfigError)
    sources = [k for k in _SECRET_SOURCES if k in settings]
    if len(sources) != 1:
        raise S3ConfigError(f"'{where}': give exactly one of secret_access_key, secret_access_key_env, "
                            f"credentials_file")
    if "secret_access_key_env" in settings:
        settings["secret_access_key"] = Secret(f"{where}.secret_access_key_env",
                                               variable=settings.pop("secret_access_key_env"),
                                               empty_is_unset=True)
    if "credentials_file" in settings:
        if "access_key_id" in settings:
            raise S3ConfigError(f"'{where}': access_key_id comes from credentials_file; give only one")
        path = settings.pop("credentials_file")
        names = ("access_key_id", "secret_access_key")
        settings["access_key_id"] = Secret(f"{where}.credentials_file", path=path, half=0, names=names)
        settings["secret_access_key"] = Secret(f"{where}.credentials_file", path=path, half=1, names=names)
    if not settings.get("access_key_id"):
        raise S3ConfigError(f"'{where}' needs an 'access_key_id'")
    if not settings["secret_access_key"]:
        raise S3ConfigError(f"'{where}.secret_access_key' is empty")
    return S3Settings(**settings)
