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


@attrs.frozen
class AuthSettings:
    """The ``[auth]`` table after validation."""

    htpasswd: str | None = None
    realm: str = DEFAULT_REALM
    cache_seconds: int = 60
    admin_users: tuple[str, ...] | None = None
    failures_before_delay: int = 3
    max_delay: int = 30
    check_threads: int = 2
    check_queue: int = 32
    checks_per_address: int = 2
    trusted_proxies: tuple[Network, ...] = ()
    require_tls: bool = False


_KEYS: dict[str, type] = {
    "htpasswd": str, "realm": str, "cache_seconds": int, "admin_users": list,
    "failures_before_delay": int, "max_delay": int, "check_threads": int, "check_queue": int,
    "checks_per_address": int, "trusted_proxies": list, "require_tls": bool,
}
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", bool: "true or false"}


def _has_type(value: Any, kind: type) -> bool:
    # bool is a subclass of int: `max_delay = true` must not pass as 1.
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def parse_auth_table(table: Mapping[str, Any], where: str = "auth") -> AuthSettings:
    """Validate the ``[auth]`` table into AuthSettings."""
    if not isinstance(table, Mapping):
        raise AuthConfigError(f"'{where}' must be a table ([{where}])")
    settings: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{where}.{key}"
        if key not in _KEYS:
            raise AuthConfigError(f"unknown key '{full}'")
        kind = _KEYS[key]
        if not _has_type(value, kind):
            raise AuthConfigError(f"'{full}' must be {_TYPE_NAMES[kind]}, not {type(value).__name__} {value!r}")
        if key == "admin_users":
            value = check_user_tokens(full, value) if value else ()
        elif key in ("htpasswd", "realm") and not value.strip():
            raise AuthConfigError(f"'{full}' is empty")
        elif key == "realm" and ('"' in value or "\\" in value or not value.isprintable()):
            raise AuthConfigError(f"'{full}' cannot hold quotes, backslashes or control characters")
        elif key in ("cache_seconds", "failures_before_delay") and value < 0:
            raise AuthConfigError(f"'{full}' must not be negative, not {value!r}")
        elif key in ("max_delay", "check_threads", "check_queue", "checks_per_address") and value <= 0:
            raise AuthConfigError(f"'{full}' must be greater than zero, not {value!r}")
        elif key == "trusted_proxies":
            value = parse_networks(value, full)
        settings[key] = value
    return AuthSettings(**settings)


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
