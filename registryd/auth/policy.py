"""Who may pull, push and delete which repositories.

The configuration holds ``[[access]]`` tables; each grants ``actions`` on
``repositories`` to ``users``. Rules only ever grant: a request is allowed
when at least one rule matches its user, repository and action, so the order
of the rules does not matter::

    [[access]]                      # anyone may pull
    users = ["anonymous", "*"]
    repositories = ["**"]
    actions = ["pull"]

    [[access]]                      # the team pushes to its own namespace
    users = ["alice", "bob"]
    repositories = ["team/**"]
    actions = ["pull", "push", "delete"]

Users
    a user name from the htpasswd file; ``"*"`` for any authenticated user;
    ``"anonymous"`` for a request without credentials. ``"*"`` does not
    include anonymous requests: list both to mean everybody.

Repository patterns
    globs of registryd.globs, matched against the whole name (a mirrored
    repository's is ``<namespace>/<name upstream>``): ``*`` matches within
    one path component, ``?`` one character of it, and ``**`` as a whole
    component zero or more components. So ``team/*`` matches ``team/app``
    but not ``team/app/web`` nor ``team``; ``team/**`` matches ``team``,
    ``team/app`` and ``team/app/web``; ``**`` matches every repository.

Actions
    ``pull`` (manifests, blobs, tags, referrers, the catalog listing),
    ``push`` (uploads, manifest PUT), ``delete``. Nothing implies anything
    else: ``docker push`` also needs ``pull`` because it checks for existing
    blobs with HEAD requests.

Without any ``[[access]]`` rule the default applies: when no htpasswd file
is configured everybody may do everything (an open registry, as before
authentication existed); when one is, every authenticated user may do
everything and anonymous requests nothing.

Mirrored repositories (pull-through caches of an upstream) are pull-only
whatever the rules say; the service passes a predicate that recognises them.
"""
from __future__ import annotations

import enum
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs

from registryd.auth.errors import AuthConfigError
from registryd.globs import Glob
from registryd.schema import read_table, setting

ANONYMOUS = "anonymous"
ANY_USER = "*"
#: User names with a meaning of their own in rules; the htpasswd file may
#: not define them.
RESERVED_USER_NAMES = frozenset({ANONYMOUS, ANY_USER})

PULL = "pull"
PUSH = "push"
DELETE = "delete"
ACTIONS = (PULL, PUSH, DELETE)

_BAD_USER_CHARACTERS = re.compile(r"[:\s\x00-\x1f\x7f]")
_RULE_KEYS = ("users", "repositories", "actions")


class Verdict(enum.Enum):
    """What the web layer answers for one request.

    ALLOW
        go ahead.
    AUTHENTICATE
        an anonymous request that credentials might unlock: 401
        ``UNAUTHORIZED`` with ``WWW-Authenticate``, so clients retry with them.
    DENY
        the requester may see the repository but not do this: 403 ``DENIED``.
    HIDE
        the requester may not even pull it: answer as if it did not exist
        (404 ``NAME_UNKNOWN``) where the spec allows that, else ``DENIED``.
    """

    ALLOW = "allow"
    AUTHENTICATE = "authenticate"
    DENY = "deny"
    HIDE = "hide"


@attrs.frozen
class AccessRule:
    """One ``[[access]]`` table: ``users`` may do ``actions`` on ``repositories``."""

    # (The checks are defined below the class; the lambdas find them when a table is read.)
    users: tuple[str, ...] = setting(required=True, check=lambda where, value: check_user_tokens(where, value),
                                     doc='user names, "*" (any authenticated user), "anonymous"')
    repositories: tuple[str, ...] = setting(required=True, check=lambda where, value: _patterns(where, value),
                                            doc="repository globs: *, ?, ** as a whole component")
    actions: frozenset[str] = setting(required=True, check=lambda where, value: _actions(where, value),
                                      doc="pull, push, delete")
    _globs: tuple[Glob, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_globs", tuple(Glob.parse(p) for p in self.repositories))

    def matches_user(self, user: str | None) -> bool:
        if user is None:
            return ANONYMOUS in self.users
        return ANY_USER in self.users or user in self.users

    def matches_repository(self, repository: str) -> bool:
        return any(glob.matches(repository) for glob in self._globs)

    def grants(self, user: str | None, repository: str, action: str) -> bool:
        return action in self.actions and self.matches_user(user) and self.matches_repository(repository)


def _string_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthConfigError(f"'{where}' must be a list of strings, not {value!r}")
    if not value:
        raise AuthConfigError(f"'{where}' must not be empty")
    return value


def check_user_tokens(where: str, value: Any) -> tuple[str, ...]:
    """Validate a list of user names, ``"*"`` and ``"anonymous"``."""
    users = _string_list(where, value)
    for user in users:
        if not user or _BAD_USER_CHARACTERS.search(user):
            raise AuthConfigError(f"'{where}' has an invalid user name {user!r}")
    return tuple(dict.fromkeys(users))


def parse_access_rules(value: Any, where: str = "access") -> tuple[AccessRule, ...]:
    """Parse the ``[[access]]`` tables (a list of dicts) into rules.

    Anything wrong raises AuthConfigError with one line naming the rule
    index and the key, e.g. ``'access[2].actions' has an unknown action 'pul'``.
    """
    if not isinstance(value, list):
        raise AuthConfigError(f"'{where}' must be a list of tables ([[{where}]])")
    hint = f" (use {', '.join(_RULE_KEYS)})"
    return tuple(AccessRule(**read_table(AccessRule, table, f"{where}[{index}]", AuthConfigError, hint=hint,
                                         shape=f"[[{where}]]", needs="needs"))
                 for index, table in enumerate(value))


def _patterns(where: str, value: Any) -> tuple[str, ...]:
    patterns = _string_list(where, value)
    for pattern in patterns:
        try:
            Glob.parse(pattern)
        except ValueError as e:
            raise AuthConfigError(f"'{where}': pattern {pattern!r} {e}") from None
    return tuple(dict.fromkeys(patterns))


def _actions(where: str, value: Any) -> frozenset[str]:
    actions = _string_list(where, value)
    for action in actions:
        if action not in ACTIONS:
            raise AuthConfigError(f"'{where}' has an unknown action {action!r} (use {', '.join(ACTIONS)})")
    return frozenset(actions)


def never_mirrored(repository: str) -> bool:
    """The mirror predicate of a node that mirrors nothing."""
    return False


def mirrored_namespaces(namespaces: Iterable[str]) -> Callable[[str], bool]:
    """A mirror predicate: a repository is mirrored when its first path
    components are one of ``namespaces`` (``docker.io`` covers
    ``docker.io/library/alpine``)."""
    prefixes = tuple(n.strip("/") for n in namespaces if n.strip("/"))

    def is_mirrored(repository: str) -> bool:
        return any(repository == p or repository.startswith(p + "/") for p in prefixes)

    return is_mirrored


@attrs.frozen
class AccessPolicy:
    """The rules in force, plus who counts as an administrator.

    Build it with ``AccessPolicy.from_config``; query it with ``allows``,
    ``verdict``, ``visible`` and ``is_admin``. It is immutable: a reload
    builds a new one.
    """

    rules: tuple[AccessRule, ...]
    admin_users: tuple[str, ...] = ()
    authentication_enabled: bool = False
    is_mirrored: Callable[[str], bool] = never_mirrored

    @classmethod
    def from_config(
        cls,
        rules: Sequence[AccessRule] = (),
        admin_users: Sequence[str] | None = None,
        authentication_enabled: bool = False,
        is_mirrored: Callable[[str], bool] = never_mirrored,
    ) -> AccessPolicy:
        """The policy for the configured rules, with the documented defaults.

        No rules: everybody may do everything without authentication,
        authenticated users may do everything with it. ``admin_users``
        unset (None): everybody is an administrator without authentication,
        nobody with it; the tokens ``"*"`` and ``"anonymous"`` work here too.
        """
        if not rules:
            who = (ANY_USER,) if authentication_enabled else (ANONYMOUS, ANY_USER)
            rules = (AccessRule(who, ("**",), frozenset(ACTIONS)),)
        if admin_users is None:
            admin_users = () if authentication_enabled else (ANONYMOUS, ANY_USER)
        return cls(tuple(rules), tuple(admin_users), authentication_enabled, is_mirrored)

    def with_mirrors(self, is_mirrored: Callable[[str], bool]) -> AccessPolicy:
        """The same policy with another mirror predicate."""
        return attrs.evolve(self, is_mirrored=is_mirrored)

    def allows(self, user: str | None, repository: str, action: str) -> bool:
        """May ``user`` (None: anonymous) do ``action`` on ``repository``?"""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        if action != PULL and self.is_mirrored(repository):
            return False
        return any(rule.grants(user, repository, action) for rule in self.rules)

    def verdict(self, user: str | None, repository: str, action: str) -> Verdict:
        """How to answer ``user`` asking to do ``action`` on ``repository``."""
        if self.allows(user, repository, action):
            return Verdict.ALLOW
        if action != PULL and self.is_mirrored(repository):
            # Read-only whoever asks: credentials cannot help, so a requester
            # who may pull gets DENIED, anyone else the answer for a pull.
            pull = self.verdict(user, repository, PULL)
            return Verdict.DENY if pull is Verdict.ALLOW else pull
        if user is None and self.authentication_enabled:
            return Verdict.AUTHENTICATE
        if action != PULL and self.allows(user, repository, PULL):
            return Verdict.DENY
        return Verdict.HIDE

    def visible(self, user: str | None, repositories: Iterable[str]) -> Iterator[str]:
        """The repositories ``user`` may pull, in the order given (for
        ``_catalog``)."""
        return (r for r in repositories if self.allows(user, r, PULL))

    def grants_anything(self, user: str | None) -> bool:
        """Does any rule mention ``user``? (For ``GET /v2/``: an anonymous
        request that no rule could serve is asked to authenticate.)"""
        return any(rule.matches_user(user) for rule in self.rules)

    def is_admin(self, user: str | None) -> bool:
        """May ``user`` use the metrics and admin endpoints?"""
        if user is None:
            return ANONYMOUS in self.admin_users
        return ANY_USER in self.admin_users or user in self.admin_users

    def admin_verdict(self, user: str | None) -> Verdict:
        """ALLOW, AUTHENTICATE (anonymous, credentials could help) or DENY."""
        if self.is_admin(user):
            return Verdict.ALLOW
        if user is None and self.authentication_enabled:
            return Verdict.AUTHENTICATE
        return Verdict.DENY
