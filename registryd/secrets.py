"""Credentials the config names but does not hold, read where they are used.

``password_env = "HUB_TOKEN"`` or ``credentials_file = "/etc/registryd/s3"``
is kept as a ``Secret`` (the variable's name, the file's path) when the
config is parsed; the value is read when the mirror client or the S3 client
needs it. So ``registryd ls`` works on a config whose upstream token is only
in the server's environment, and the server still stops at start-up, with
one line, when a secret it needs is missing (``require_secrets``).
"""
from __future__ import annotations

import os
from typing import Iterable

import attrs

from registryd.credentials import read_credentials_file
from registryd.schema import ConfigError


class SecretUnavailable(ConfigError):
    """The variable is not set, or the file cannot be read or holds no ``name:secret`` line."""


@attrs.frozen
class Secret:
    """Where one credential is: an environment variable, or one half of a credentials file's line."""

    #: The config key that names it, for the message: ``upstream[0].password_env``.
    key: str
    variable: str | None = None
    path: str | None = None
    #: Of a credentials file's ``name:secret`` line: 0 the name, 1 the secret.
    half: int = 1
    #: What the halves are called, for the message: ("username", "password").
    names: tuple[str, str] = ("username", "password")
    secret_required: bool = True
    #: A variable set to "" counts as not set.
    empty_is_unset: bool = False
    #: The config file the key is in (for the message), if any.
    origin: str | None = None

    def reveal(self) -> str:
        """The value; SecretUnavailable with one line naming the key otherwise."""
        if self.variable is not None:
            value = os.environ.get(self.variable)
            if value is None or (self.empty_is_unset and not value):
                raise self._unavailable(f"environment variable {self.variable} is not set")
            return value
        assert self.path is not None
        try:
            return read_credentials_file(self.path, self.names, self.secret_required)[self.half]
        except ValueError as e:
            raise self._unavailable(str(e)) from None

    def _unavailable(self, why: str) -> SecretUnavailable:
        where = f"config file {self.origin}: " if self.origin else ""
        return SecretUnavailable(f"{where}'{self.key}': {why}")

    def in_file(self, origin: str | None) -> Secret:
        return attrs.evolve(self, origin=origin)


def reveal(value: str | Secret | None) -> str | None:
    """A setting that may be a literal or a Secret, as its value."""
    return value.reveal() if isinstance(value, Secret) else value


def in_file(value: str | Secret | None, origin: str | None) -> str | Secret | None:
    """``value``; a Secret whose errors name the config file ``origin``."""
    return value.in_file(origin) if isinstance(value, Secret) else value


def require_secrets(secrets: Iterable[str | Secret | None]) -> None:
    """Read every one now (start-up): the first that is unavailable raises SecretUnavailable."""
    for secret in secrets:
        reveal(secret)
