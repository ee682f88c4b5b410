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
value, an environment variable's name, or a file. ``S3Settings.from_table``
raises S3ConfigError with one line naming the key; the config loader turns
it into its own ConfigError, as it does for AuthConfigError.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import attrs

from registryd.credentials import read_credentials_file

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


@attrs.frozen
class S3Settings:
    """The object store a node uses, after validation."""

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str = attrs.field(repr=False)
    region: str = "us-east-1"
    addressing: str = "path"
    ca_file: str | None = None
    verify_tls: bool = True
    prefix: str = ""
    part_size: int = 16 * MiB
    connect_timeout: float = 10
    idle_timeout: float = 60
    #: The deadline for the store's answer to one operation, retries included
    #: (never longer than ``idle_timeout``): past it the store is unavailable.
    request_timeout: float = 10
    #: The whole of /readyz's probe (write, then read back a small object).
    ready_timeout: float = 3
    max_attempts: int = 3
    #: Copies larger than this go through multipart UploadPartCopy; S3 refuses
    #: CopyObject past 5 GiB. Not a config key: tests lower it.
    copy_threshold: int = 5 * GiB

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


# key -> (type, required)
_KEYS: dict[str, tuple[type, bool]] = {
    "endpoint": (str, True), "bucket": (str, True), "region": (str, False),
    "access_key_id": (str, False), "secret_access_key": (str, False),
    "secret_access_key_env": (str, False), "credentials_file": (str, False),
    "addressing": (str, False), "ca_file": (str, False), "verify_tls": (bool, False),
    "prefix": (str, False), "part_size": (int, False), "connect_timeout": (int, False),
    "idle_timeout": (int, False), "request_timeout": (int, False), "ready_timeout": (int, False),
    "max_attempts": (int, False),
}
_SECRET_SOURCES = ("secret_access_key", "secret_access_key_env", "credentials_file")
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def _check_type(key: str, value: Any, kind: type) -> None:
    # bool is a subclass of int: `part_size = true` must not pass as 1.
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise S3ConfigError(f"'{key}' must be {_TYPE_NAMES[kind]}, not {type(value).__name__} {value!r}")


def _read_credentials_file(where: str, path: str) -> tuple[str, str]:
    """A credentials file holds one line ``access_key_id:secret_access_key``."""
    try:
        return read_credentials_file(path, ("access_key_id", "secret_access_key"))
    except ValueError as e:
        raise S3ConfigError(f"'{where}': {e}") from None


def _normalize_prefix(prefix: str) -> str:
    """``"a/b"``, ``"/a/b/"`` -> ``"a/b/"``: the prefix is a folder, never half a name."""
    prefix = prefix.strip("/")
    return prefix + "/" if prefix else ""


def _parse(table: Mapping[str, Any], where: str) -> S3Settings:
    if not isinstance(table, Mapping):
        raise S3ConfigError(f"'{where}' must be a table ([{where}])")
    for key, value in table.items():
        if key not in _KEYS:
            raise S3ConfigError(f"unknown key '{where}.{key}'")
        _check_type(f"{where}.{key}", value, _KEYS[key][0])
    for key, (_, required) in _KEYS.items():
        if required and key not in table:
            raise S3ConfigError(f"'{where}' needs a '{key}'")
    settings = dict(table)

    if not _ENDPOINT.match(settings["endpoint"]):
        raise S3ConfigError(f"'{where}.endpoint' must be http(s)://host[:port], not {settings['endpoint']!r}")
    settings["endpoint"] = settings["endpoint"].rstrip("/")
    if not _BUCKET.match(settings["bucket"]) or ".." in settings["bucket"]:
        raise S3ConfigError(f"'{where}.bucket' must be 3-63 lowercase letters, digits, dots and hyphens, "
                            f"not {settings['bucket']!r}")
    if "region" in settings and not _REGION.match(settings["region"]):
        raise S3ConfigError(f"'{where}.region' must be a region name such as us-east-1, not {settings['region']!r}")
    addressing = settings.get("addressing", "path")
    if addressing not in ADDRESSING:
        raise S3ConfigError(f"'{where}.addressing' must be \"path\" or \"virtual\", not {addressing!r}")

    sources = [k for k in _SECRET_SOURCES if k in settings]
    if len(sources) != 1:
        raise S3ConfigError(f"'{where}': give exactly one of secret_access_key, secret_access_key_env, "
                            f"credentials_file")
    if "secret_access_key_env" in settings:
        variable = settings.pop("secret_access_key_env")
        if not os.environ.get(variable):
            raise S3ConfigError(f"'{where}.secret_access_key_env': environment variable {variable} is not set")
        settings["secret_access_key"] = os.environ[variable]
    if "credentials_file" in settings:
        if "access_key_id" in settings:
            raise S3ConfigError(f"'{where}': access_key_id comes from credentials_file; give only one")
        settings["access_key_id"], settings["secret_access_key"] = _read_credentials_file(
            f"{where}.credentials_file", settings.pop("credentials_file"))
    if not settings.get("access_key_id"):
        raise S3ConfigError(f"'{where}' needs an 'access_key_id'")
    if not settings["secret_access_key"]:
        raise S3ConfigError(f"'{where}.secret_access_key' is empty")

    if "ca_file" in settings and not os.access(settings["ca_file"], os.R_OK):
        raise S3ConfigError(f"'{where}.ca_file': cannot read {settings['ca_file']}")
    if "prefix" in settings:
        settings["prefix"] = _normalize_prefix(settings["prefix"])
    part_size = settings.get("part_size", MIN_PART_SIZE)
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise S3ConfigError(f"'{where}.part_size' must be between {MIN_PART_SIZE} (5 MiB) and "
                            f"{MAX_PART_SIZE} (5 GiB), not {part_size!r}")
    for key in ("connect_timeout", "idle_timeout", "request_timeout", "ready_timeout", "max_attempts"):
        if key in settings and settings[key] <= 0:
            raise S3ConfigError(f"'{where}.{key}' must be greater than zero, not {settings[key]!r}")
    return S3Settings(**settings)
