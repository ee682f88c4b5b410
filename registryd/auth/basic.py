"""HTTP Basic authentication for one request: header, throttle, checker.

The web layer calls ``await authenticator.authenticate(address, header)``
once per request. It returns the user name, or None for a request without
credentials (anonymous); wrong credentials raise AuthenticationFailed, which
the web layer answers with 401, the OCI ``UNAUTHORIZED`` document and
``WWW-Authenticate: {authenticator.challenge}``; too many checks at once
from one address, or a full password-check queue, raise TooManyChecks (429).

``Basic`` with an empty user name and password (what containers/image sends
when it holds no credentials) is anonymous, and so is the anonymous Bearer
token; a Bearer token registryd issued carries credentials checked like
Basic ones (registryd.auth.tokens).

A password verified within the checker's cache time is accepted at once,
without waiting out a backoff: a flood of bad logins from an address does
not slow the users there who already logged in.
"""
from __future__ import annotations

import binascii
import secrets
from base64 import b64decode
from typing import Protocol

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from registryd.auth import tokens
from registryd.auth.throttle import Throttle
from registryd.threads import PoolBusy

DEFAULT_REALM = "registryd"


class AuthenticationFailed(Exception):
    """Credentials were given and are wrong or unreadable: answer 401."""


class TooManyChecks(Exception):
    """Too many password checks at once (from one address, or in all): answer 429."""

    retry_after = 1


class PasswordChecker(Protocol):
    """What BasicAuthenticator needs of a checker (HtpasswdChecker)."""

    async def authenticate(self, username: str, password: str | bytes, rank: int = 0) -> str: ...

    def known_good(self, username: str, password: bytes) -> bool: ...

    def checking(self, username: str, password: bytes) -> bool: ...

    def token_key(self, username: str) -> bytes | None: ...


def parse_basic(header: bytes | str) -> tuple[str, bytes]:
    """``Basic base64(user:password)`` -> (user, password bytes).

    Raises AuthenticationFailed for another scheme or a malformed value.
    """
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise AuthenticationFailed("only Basic authentication and registryd's bearer tokens are supported")
    try:
        decoded = b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AuthenticationFailed("malformed Basic credentials") from None
    user, sep, password = decoded.partition(b":")
    if not sep or (not user and password):
        raise AuthenticationFailed("malformed Basic credentials")
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        raise AuthenticationFailed("user name is not UTF-8") from None


def parse_authorization(header: bytes | str) -> tuple[str, bytes] | tokens.UserToken | None:
    """(user, password) of a Basic header, or the claims of a registryd bearer
    token; None for no credentials (empty Basic, the anonymous token)."""
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        try:
            return tokens.read(token.decode("latin-1"))
        except tokens.InvalidToken as e:
            raise AuthenticationFailed(str(e)) from None
    user, password = parse_basic(header)
    return (user, password) if user else None


def carries_credentials(header: bytes | str) -> bool:
    """Does this Authorization header hold a password (unreadable ones count
    as if it did), rather than one of the anonymous forms?"""
    try:
        return parse_authorization(header) is not None
    except AuthenticationFailed:
        return True


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
    def throttle(self) -> Throttle:
        return self._throttle

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
        credentials = await self.credentials(address, authorization)
        return None if credentials is None else credentials[0]

    def token_key(self, user: str) -> bytes:
        """The key ``user``'s tokens are signed with (an unknown user gets a useless random one)."""
        assert self._checker is not None
        return self._checker.token_key(user) or secrets.token_bytes(32)

    def _token_user(self, token: tokens.UserToken) -> tuple[str, bytes]:
        """A token's user, if we signed it for that user's current password and it has not expired."""
        assert self._checker is not None
        key = self._checker.token_key(token.user)
        if key is None or not token.valid(key, self._clock.seconds()):
            raise AuthenticationFailed("invalid or expired token: fetch a new one")
        return token.user, b""

    async def credentials(self, address: str, authorization: bytes | str | None) -> tuple[str, bytes] | None:
        """Like ``authenticate``, but the checked (user, password) itself; the
        password is empty for a bearer token."""
        if self._checker is None or not authorization:
            return None
        user: str | None = None
        try:
            parsed = parse_authorization(authorization)
            if parsed is None:
                return None
            if isinstance(parsed, tokens.UserToken):
                return self._token_user(parsed)
            user, password = parsed
            if self._checker.known_good(user, password):
                return parsed
            delay = self._throttle.delay_for(address, user)
            if delay > 0:
                await deferLater(self._clock, delay)
            # The same credentials already being checked (docker's parallel
            # layer uploads) join that check: no slot, no second bcrypt.
            joining = self._checker.checking(user, password)
            if not joining and not self._throttle.begin_check(address):
                self._throttle.record_refusal(address)
                raise TooManyChecks(f"more than {self._throttle.max_concurrent} password checks at once "
                                    f"from {address}")
            # Addresses that never failed go ahead of those that did.
            rank = 0 if self._throttle.failures(address) == 0 else 1
            try:
                await self._checker.authenticate(user, password, rank)
            except PoolBusy:
                self._throttle.record_refusal(address)
                raise TooManyChecks("too many password checks are waiting") from None
            finally:
                if not joining:
                    self._throttle.end_check(address)
        except AuthenticationFailed as e:
            self._throttle.record_failure(address, user, str(e))
            raise
        except UnauthorizedLogin:
            self._throttle.record_failure(address, user, "wrong user name or password")
            raise AuthenticationFailed("wrong user name or password") from None
        self._throttle.record_success(address, user)
        return parsed
