"""The ``[auth]`` table and the objects the service builds from it.

::

    [auth]
    htpasswd = "/etc/registryd/htpasswd"   # unset: no authentication
    realm = "registryd"                    # WWW-Authenticate realm
    cache_seconds = 60                     # remember a good password (0: never)
    admin_users = ["alice"]                # metrics/admin endpoints; "*" and
                                           # "anonymous" work as in [[access]]
    failures_before_delay = 3              # free failures per address and user name
    max_delay = 30                         # backoff cap, seconds
    check_threads = 2                      # threads for bcrypt, apart from disk work
    check_queue = 32                       # checks waiting for them; more get 429
    checks_per_address = 2                 # concurrent checks from one address; more get 429
    trusted_proxies = ["10.0.0.5/32"]      # X-Forwarded-For/-Proto believed from these
    require_tls = false                    # refuse credentials on plain non-loopback listeners

``parse_auth_table`` validates the table (AuthConfigError, one line naming
the key); ``build_auth`` loads the htpasswd file (HtpasswdError at start-up)
and returns an ``Auth`` holding the authenticator and the policy.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from registryd.auth.basic import DEFAULT_REALM, BasicAuthenticator
from registryd.auth.errors import AuthConfigError
from registryd.auth.htpasswd import HtpasswdChecker, Pool
from registryd.auth.policy import AccessPolicy, AccessRule, check_user_tokens, never_mirrored
from registryd.auth.proxies import Network, parse_networks
from registryd.auth.throttle import Throttle
from registryd.schema import not_negative, positive, read_table, setting


def _not_empty(where: str, value: str) -> str:
    if not value.strip():
        raise AuthConfigError(f"'{where}' is empty")
    return value


def _realm(where: str, value: str) -> str:
    _not_empty(where, value)
    if '"' in value or "\\" in value or not value.isprintable():
        raise AuthConfigError(f"'{where}' cannot hold quotes, backslashes or control characters")
    return value


def _admin_users(where: str, value: list[Any]) -> tuple[str, ...]:
    return check_user_tokens(where, value) if value else ()


@attrs.frozen
class AuthSettings:
    """The ``[auth]`` table after validation."""

    htpasswd: str | None = setting(None, str, _not_empty, "the htpasswd file; unset: no authentication")
    realm: str = setting(DEFAULT_REALM, str, _realm, "WWW-Authenticate realm")
    cache_seconds: int = setting(60, int, not_negative, "remember a good password (0: never)")
    admin_users: tuple[str, ...] | None = setting(None, list, _admin_users, "who may use metrics/admin endpoints")
    failures_before_delay: int = setting(3, int, not_negative, "free failures per address and user name")
    max_delay: int = setting(30, int, positive, "backoff cap, seconds")
    check_threads: int = setting(2, int, positive, "threads for bcrypt, apart from disk work")
    check_queue: int = setting(32, int, positive, "checks waiting for them; more get 429")
    checks_per_address: int = setting(2, int, positive, "concurrent checks from one address; more get 429")
    trusted_proxies: tuple[Network, ...] = setting((), list, lambda where, value: parse_networks(value, where),
                                                   "X-Forwarded-For/-Proto believed from these")
    require_tls: bool = setting(False, bool, doc="refuse credentials on plain non-loopback listeners")


def parse_auth_table(table: Mapping[str, Any], where: str = "auth") -> AuthSettings:
    """Validate the ``[auth]`` table into AuthSettings."""
    return AuthSettings(**read_table(AuthSettings, table, where, AuthConfigError))


@attrs.define
class Auth:
    """What the web layer needs: who is asking, and may they."""

    authenticator: BasicAuthenticator
    policy: AccessPolicy
    checker: HtpasswdChecker | None = None
    settings: AuthSettings = AuthSettings()

    @property
    def bearer(self) -> bool:
        """Challenge ``/v2/`` with Bearer (our token endpoint) rather than
        Basic: with users, when anonymous requests may do something. docker
        fails every request after a Basic challenge when it holds no
        credentials; with a Bearer one it fetches an anonymous token."""
        return self.authenticator.enabled and self.policy.grants_anything(None)

    def reload(self) -> None:
        """SIGHUP: re-read the htpasswd file (a failure keeps the old users)."""
        if self.checker is not None:
            self.checker.reload()


def build_auth(
    settings: AuthSettings,
    rules: Sequence[AccessRule],
    pool: Pool,
    clock: IReactorTime,
    is_mirrored: Callable[[str], bool] = never_mirrored,
) -> Auth:
    """Load the htpasswd file (if any) and build authenticator and policy.

    Raises HtpasswdError (an AuthConfigError) with one line when the file
    cannot be used.
    """
    checker = None
    if settings.htpasswd is not None:
        checker = HtpasswdChecker(settings.htpasswd, pool, clock, cache_seconds=settings.cache_seconds)
    throttle = Throttle(clock, free_failures=settings.failures_before_delay,
                        max_delay=float(max(settings.max_delay, 1)),
                        max_concurrent=settings.checks_per_address)
    authenticator = BasicAuthenticator(checker, throttle, clock, settings.realm)
    policy = AccessPolicy.from_config(rules, settings.admin_users, checker is not None, is_mirrored)
    return Auth(authenticator, policy, checker, settings)
