"""HTTP Basic authentication for one request: header, throttle, checker.

The web layer calls ``await authenticator.authenticate(address, header)``
once per request. It returns the user name, or None for a request without
credentials (anonymous); wrong credentials raise AuthenticationFailed, which
the web layer answers with 401, the OCI ``UNAUTHORIZED`` document and
``WWW-Authenticate: {authenticator.challenge}``.
"""
from __future__ import annotations

import binascii
from base64 import b64decode
from typing import Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from registryd.auth.throttle import Throttle

DEFAULT_REALM = "registryd"


class AuthenticationFailed(Exception):
    """Credentials were given and are wrong or unreadable: answer 401."""


class PasswordChecker(Protocol):
    """What BasicAuthenticator needs of a checker (HtpasswdChecker)."""

    async def authenticate(self, username: str, password: str | bytes) -> str: ...


def parse_basic(header: bytes | str) -> tuple[str, bytes]:
    """``Basic base64(user:password)`` -> (user, password bytes).

    Raises AuthenticationFailed for another scheme or a malformed value.
    """
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise AuthenticationFailed("only Basic authentication is supported")
    try:
        decoded = b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("malformed Basic credentials") from None
    user, sep, password = decoded.partition(b":")
    if not sep or not user:
        raise AuthenticationFailed("malformed Basic credentials")
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        raise AuthenticationFailed("user name is not UTF-8") from None


class BasicAuthenticator:
    """Basic credentials of a request -> user name, with backoff on failures.

    ``checker`` None means authentication is off: every request is
    anonymous, and an Authorization header is ignored (docker sends stored
    credentials to registries that never asked for them).
    """

    def __init__(
        self,
        checker: PasswordChecker | None,
        throttle: Throttle,
        clock: IReactorTime,
        realm: str = DEFAULT_REALM,
    ) -> None:
        if '"' in realm or "\\" in realm or not realm.isprintable():
            raise ValueError(f"realm {realm!r} cannot be quoted in a header")
        self._checker = checker
        self._throttle = throttle
        self._clock = clock
        self.realm = realm

    @property
    def enabled(self) -> bool:
        return self._checker is not None

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value for 401 answers."""
        return f'Basic realm="{self.realm}"'

    async def authenticate(self, address: str, authorization: bytes | str | None) -> str | None:
        """The user of a request from ``address`` with this Authorization
        header; None when there are no credentials (or authentication is off).

        An address that failed repeatedly waits first (on the injected
        clock); cancelling the returned coroutine's Deferred cancels the wait.
        """
        if self._checker is None or not authorization:
            return None
        delay = self._throttle.delay_for(address)
        if delay > 0:
            await deferLater(self._clock, delay)
        user: str | None = None
        try:
            user, password = parse_basic(authorization)
            await self._checker.authenticate(user, password)
        except AuthenticationFailed as e:
            self._throttle.record_failure(address, user, str(e))
            raise
        except UnauthorizedLogin:
            self._throttle.record_failure(address, user, "wrong user name or password")
            raise AuthenticationFailed("wrong user name or password") from None
        self._throttle.record_success(address)
        return user
