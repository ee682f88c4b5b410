"""Access rules: glob semantics, users, defaults, mirrors, parse errors."""
from __future__ import annotations

from typing import Any

import pytest

from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import (
    AccessPolicy,
    Verdict,
    mirrored_namespaces,
    parse_access_rules,
)
from registryd.globs import Glob

GLOBS = [
    # pattern, repository, matches
    ("**", "alpine", True),
    ("**", "a/b/c", True),
    ("alpine", "alpine", True),
    ("alpine", "alpine2", False),
    ("alpine", "library/alpine", False),
    ("team/*", "team/app", True),
    ("team/*", "team/app/web", False),
    ("team/*", "team", False),
    ("team/*", "teamx/app", False),
    ("team/**", "team", True),
    ("team/**", "team/app", True),
    ("team/**", "team/app/web", True),
    ("team/**", "teamx/app", False),
    ("team/**", "other/team/app", False),
    ("**/cache", "cache", True),
    ("**/cache", "a/b/cache", True),
    ("**/cache", "a/b/cache2", False),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/x/y/c", False),
    ("a/**/**/b", "a/x/b", True),
    ("app-*", "app-web", True),
    ("app-*", "app-", True),
    ("app-*", "app/web", False),
    ("*", "alpine", True),
    ("*", "library/alpine", False),
    ("*/*", "library/alpine", True),
    ("lib?", "libs", True),
    ("lib?", "lib", False),
    ("lib?", "lib/", False),
    ("a.b", "a.b", True),
    ("a.b", "axb", False),  # '.' is literal, not a regex wildcard
    ("docker.io/library/*", "docker.io/library/alpine", True),
]


@pytest.mark.parametrize("pattern,repository,expected", GLOBS)
def test_glob_semantics(pattern: str, repository: str, expected: bool) -> None:
    assert Glob.parse(pattern).matches(repository) is expected


RULES = [
    {"users": ["anonymous", "*"], "repositories": ["public/**"], "actions": ["pull"]},
    {"users": ["*"], "repositories": ["shared/*"], "actions": ["pull"]},
    {"users": ["alice"], "repositories": ["team/**", "shared/*"], "actions": ["pull", "push", "delete"]},
    {"users": ["bob"], "repositories": ["team/**"], "actions": ["pull"]},
    {"users": ["ci"], "repositories": ["team/**"], "actions": ["push"]},
]

DECISIONS = [
    # user, repository, action, allowed
    (None, "public/alpine", "pull", True),
    (None, "public/a/b", "pull", True),
    (None, "public/alpine", "push", False),
    ("bob", "public/alpine", "pull", True),  # via "*"
    (None, "shared/x", "pull", False),  # "*" is not anonymous
    ("carol", "shared/x", "pull", True),
    ("carol", "shared/x", "push", False),
    ("carol", "team/app", "pull", False),
    ("alice", "team/app", "push", True),
    ("alice", "team/app/web", "delete", True),
    ("alice", "shared/x", "delete", True),
    ("bob", "team/app", "pull", True),
    ("bob", "team/app", "push", False),
    ("bob", "team/app", "delete", False),
    ("ci", "team/app", "push", True),
    ("ci", "team/app", "pull", False),  # nothing implies anything
    ("anonymous", "public/alpine", "pull", True),  # a user named like the token is still a user ("*")
    ("Alice", "team/app", "push", False),  # user names are case-sensitive
    ("alice", "Team/app", "push", False),
    ("alice", "elsewhere", "pull", False),
]


@pytest.fixture
def policy() -> AccessPolicy:
    return AccessPolicy.from_config(parse_access_rules(RULES), authentication_enabled=True)


@pytest.mark.parametrize("user,repository,action,expected", DECISIONS)
def test_rules(policy: AccessPolicy, user: str | None, repository: str, action: str, expected: bool) -> None:
    assert policy.allows(user, repository, action) is expected


VERDICTS = [
    (None, "public/alpine", "pull", Verdict.ALLOW),
    (None, "public/alpine", "push", Verdict.AUTHENTICATE),
    (None, "team/app", "pull", Verdict.AUTHENTICATE),
    ("bob", "team/app", "push", Verdict.DENY),  # may see it, may not push
    ("carol", "team/app", "pull", Verdict.HIDE),
    ("carol", "team/app", "push", Verdict.HIDE),  # may not even see it
    ("alice", "team/app", "delete", Verdict.ALLOW),
]


@pytest.mark.parametrize("user,repository,action,expected", VERDICTS)
def test_verdicts(policy: AccessPolicy, user: str | None, repository: str, action: str, expected: Verdict) -> None:
    assert policy.verdict(user, repository, action) is expected


def test_anonymous_refused_without_authentication_is_not_asked_to_log_in() -> None:
    policy = AccessPolicy.from_config(parse_access_rules(RULES), authentication_enabled=False)
    assert policy.verdict(None, "team/app", "pull") is Verdict.HIDE
    assert policy.verdict(None, "public/alpine", "push") is Verdict.DENY


def test_catalog_shows_only_pullable(policy: AccessPolicy) -> None:
    names = ["public/a", "shared/b", "team/c", "team/c/d", "zz"]
    assert list(policy.visible(None, names)) == ["public/a"]
    assert list(policy.visible("carol", names)) == ["public/a", "shared/b"]
    assert list(policy.visible("alice", names)) == ["public/a", "shared/b", "team/c", "team/c/d"]
    assert list(policy.visible("ci", names)) == ["public/a", "shared/b"]


def test_default_without_authentication_is_open() -> None:
    policy = AccessPolicy.from_config(authentication_enabled=False)
    for action in ("pull", "push", "delete"):
        assert policy.allows(None, "any/thing", action)
    assert policy.is_admin(None)


def test_default_with_authentication_is_users_only() -> None:
    policy = AccessPolicy.from_config(authentication_enabled=True)
    for action in ("pull", "push", "delete"):
        assert policy.allows("alice", "any/thing", action)
        assert not policy.allows(None, "any/thing", action)
    assert policy.verdict(None, "x", "pull") is Verdict.AUTHENTICATE
    assert not policy.is_admin("alice") and not policy.is_admin(None)
    assert policy.admin_verdict(None) is Verdict.AUTHENTICATE
    assert policy.admin_verdict("alice") is Verdict.DENY


def test_admin_users() -> None:
    policy = AccessPolicy.from_config(admin_users=["root"], authentication_enabled=True)
    assert policy.is_admin("root") and not policy.is_admin("alice") and not policy.is_admin(None)
    assert policy.admin_verdict("root") is Verdict.ALLOW
    everyone = AccessPolicy.from_config(admin_users=["*"], authentication_enabled=True)
    assert everyone.is_admin("alice") and not everyone.is_admin(None)


def test_grants_anything(policy: AccessPolicy) -> None:
    assert policy.grants_anything(None)
    assert policy.grants_anything("carol")
    closed = AccessPolicy.from_config(authentication_enabled=True)
    assert not closed.grants_anything(None)


def test_mirrored_repositories_are_pull_only() -> None:
    mirrored = mirrored_namespaces(["docker.io", "ghcr.io"])
    policy = AccessPolicy.from_config(authentication_enabled=False, is_mirrored=mirrored)
    for repository in ("docker.io/library/alpine", "ghcr.io/x/y", "docker.io"):
        assert policy.allows(None, repository, "pull")
        assert not policy.allows(None, repository, "push")
        assert not policy.allows(None, repository, "delete")
        assert policy.verdict(None, repository, "push") is Verdict.DENY
    # a prefix that is not a whole component is not the namespace
    assert policy.allows(None, "docker.iox/app", "push")
    assert policy.allows(None, "local/app", "delete")
    # rules that grant push explicitly do not override it
    explicit = AccessPolicy.from_config(
        parse_access_rules([{"users": ["alice"], "repositories": ["**"], "actions": ["pull", "push", "delete"]}]),
        authentication_enabled=True,
    ).with_mirrors(mirrored)
    assert explicit.allows("alice", "docker.io/library/alpine", "pull")
    assert not explicit.allows("alice", "docker.io/library/alpine", "push")
    assert explicit.allows("alice", "mine/app", "push")
    assert explicit.verdict("alice", "docker.io/library/alpine", "push") is Verdict.DENY
    # anonymous: credentials would not help a push, but might help the pull
    assert explicit.verdict(None, "docker.io/library/alpine", "push") is Verdict.AUTHENTICATE
    assert explicit.verdict("bob", "docker.io/library/alpine", "push") is Verdict.HIDE
    anonymous_pull = AccessPolicy.from_config(
        parse_access_rules([{"users": ["anonymous"], "repositories": ["**"], "actions": ["pull"]}]),
        authentication_enabled=True, is_mirrored=mirrored)
    assert anonymous_pull.verdict(None, "docker.io/library/alpine", "push") is Verdict.DENY
    assert anonymous_pull.verdict(None, "local/app", "push") is Verdict.AUTHENTICATE


def test_unknown_action_is_a_bug() -> None:
    with pytest.raises(ValueError):
        AccessPolicy.from_config().allows(None, "x", "pul")


BAD_RULES: list[tuple[Any, str]] = [
    ({"users": ["a"]}, "'access' must be a list of tables ([[access]])"),
    (["x"], "'access[0]' must be a table ([[access]])"),
    ([{"users": ["a"], "repositories": ["**"], "actions": ["pull"], "user": 1}],
     "unknown key 'access[0].user' (use users, repositories, actions)"),
    ([{"users": ["a"], "repositories": ["**"]}], "'access[0]' needs 'actions'"),
    ([{"users": ["a"], "repositories": ["**"], "actions": ["pull"]},
      {"users": ["a"], "repositories": ["**"], "actions": ["pul"]}],
     "'access[1].actions' has an unknown action 'pul' (use pull, push, delete)"),
    ([{"users": "alice", "repositories": ["**"], "actions": ["pull"]}],
     "'access[0].users' must be a list of strings, not 'alice'"),
    ([{"users": [], "repositories": ["**"], "actions": ["pull"]}], "'access[0].users' must not be empty"),
    ([{"users": ["a b"], "repositories": ["**"], "actions": ["pull"]}],
     "'access[0].users' has an invalid user name 'a b'"),
    ([{"users": ["a"], "repositories": ["Team/*"], "actions": ["pull"]}],
     "'access[0].repositories': pattern 'Team/*' may hold only lowercase letters, digits, "
     "'.', '_', '-', '/', '*' and '?'"),
    ([{"users": ["a"], "repositories": ["team//x"], "actions": ["pull"]}],
     "'access[0].repositories': pattern 'team//x' has an empty path component (leading, trailing or double '/')"),
    ([{"users": ["a"], "repositories": ["/team"], "actions": ["pull"]}],
     "'access[0].repositories': pattern '/team' has an empty path component (leading, trailing or double '/')"),
    ([{"users": ["a"], "repositories": ["team**"], "actions": ["pull"]}],
     "'access[0].repositories': pattern 'team**' uses '**' inside a component; '**' must be a whole component"),
    ([{"users": ["a"], "repositories": [""], "actions": ["pull"]}],
     "'access[0].repositories': pattern '' is empty"),
    ([{"users": ["a"], "repositories": ["**"], "actions": [1]}],
     "'access[0].actions' must be a list of strings, not [1]"),
]


@pytest.mark.parametrize("value,message", BAD_RULES)
def test_parse_errors_name_rule_and_key(value: Any, message: str) -> None:
    with pytest.raises(AuthConfigError) as e:
        parse_access_rules(value)
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_rule_order_does_not_matter() -> None:
    forward = AccessPolicy.from_config(parse_access_rules(RULES), authentication_enabled=True)
    backward = AccessPolicy.from_config(parse_access_rules(RULES[::-1]), authentication_enabled=True)
    for user, repository, action, _ in DECISIONS:
        assert forward.allows(user, repository, action) == backward.allows(user, repository, action)
