"""One glob dialect (registryd.globs) for [[access]] rules and prune patterns: the parser, the
matcher, and both users agreeing where their two dialects used to differ."""
from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from registryd.auth.errors import AuthConfigError
from registryd.auth.policy import PULL, AccessPolicy, parse_access_rules
from registryd.digest import digest_of
from registryd.globs import MAX_LENGTH, Glob
from registryd.storage.fs.driver import FsDriver
from registryd.storage.repositories import Repositories
from registryd.threads import InlinePool
from registryd.upkeep.online_prune import OnlinePruner, PruneSelection
from test_cli_ls import run

NS = "mirror.test:5000"

MATCHES = [
    # glob, name, matches
    ("docker.io/**", "docker.io", True),            # '**' is zero or more components
    ("docker.io/**", "docker.io/library/alpine", True),
    ("docker.io/**", "docker.iox/alpine", False),
    (f"{NS}/lib/*", f"{NS}/lib/app", True),         # a namespace with a port
    (f"{NS}/lib/*", f"{NS}/lib/app/web", False),
    ("*:5000/**", f"{NS}/lib/app", True),
    ("*/lib/app", f"{NS}/lib/app", True),
    ("**", f"{NS}/lib/app", True),
    ("a/**/b", "a/b", True),
    ("**/**/b", "b", True),
    ("l?b/*", "lib/x", True),
    ("l?b/*", "li/b/x", False),                     # '?' is never a '/'
    ("a.b", "a.b", True),
    ("a.b", "axb", False),                          # '.' is itself, not a regex wildcard
]


@pytest.mark.parametrize("glob,name,expected", MATCHES)
def test_matches_whole_names_component_by_component(glob: str, name: str, expected: bool) -> None:
    assert Glob.parse(glob).matches(name) is expected


REFUSED = [
    ("", "is empty"),
    ("a" * (MAX_LENGTH + 1), f"is longer than {MAX_LENGTH} characters"),
    ("team//x", "has an empty path component (leading, trailing or double '/')"),
    ("team/", "has an empty path component (leading, trailing or double '/')"),
    ("Team/*", "may hold only lowercase letters, digits, '.', '_', '-', '/', '*' and '?'"),
    ("lib/[ab]", "may hold only lowercase letters, digits, '.', '_', '-', '/', '*' and '?'"),
    ("a+b", "may hold only lowercase letters, digits, '.', '_', '-', '/', '*' and '?'"),
    ("a**", "uses '**' inside a component; '**' must be a whole component"),
    ("docker.io/lib**", "uses '**' inside a component; '**' must be a whole component"),
    ("team/a:b", "uses ':' other than once in its first component (an upstream's host:port)"),
    ("a:1:2/b", "uses ':' other than once in its first component (an upstream's host:port)"),
]


@pytest.mark.parametrize("glob,reason", REFUSED)
def test_refused_with_the_reason(glob: str, reason: str) -> None:
    with pytest.raises(ValueError) as e:
        Glob.parse(glob)
    assert str(e.value) == reason


def test_equal_by_text() -> None:
    assert Glob.parse("team/**") == Glob.parse("team/**") != Glob.parse("team/*")
    assert Glob.parse(f"{NS}/**").text == f"{NS}/**"


# --- both users: where access rules and prune patterns used to disagree ----------------------

def test_access_rules_take_a_namespace_with_a_port() -> None:
    """The names access rules see for a mirrored upstream with a port have a ':' (as prune's do)."""
    rules = parse_access_rules([{"users": ["anonymous"], "repositories": [f"{NS}/**"], "actions": ["pull"]}])
    policy = AccessPolicy.from_config(rules, authentication_enabled=True)
    assert policy.allows(None, f"{NS}/lib/app", PULL)
    assert not policy.allows(None, "mirror.test/lib/app", PULL)
    with pytest.raises(AuthConfigError) as e:
        parse_access_rules([{"users": ["a"], "repositories": ["team/a:b"], "actions": ["pull"]}])
    assert "uses ':' other than once in its first component" in str(e.value)


@pytest.mark.parametrize("pattern,words", [("lib**", "uses '**' inside a component"),
                                           (f"{NS}/a//b", "empty path component"),
                                           ("team/a:b", "uses ':'")])
def test_the_prune_route_refuses_what_access_rules_refuse(pattern: str, words: str) -> None:
    with pytest.raises(ValueError) as e:
        PruneSelection.from_query(None, None, [pattern], None)
    assert "is not a glob of <namespace>/<repository>" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("pattern", ["Lib/App", "a**", "team//x"])
def test_the_prune_command_refuses_a_bad_glob_as_a_bad_argument(tmp_path: Any, pattern: str) -> None:
    result = run("prune", "-d", str(tmp_path / "missing"), "--pattern", pattern)
    assert result.returncode == 2, result.stderr
    assert "is not a glob of <namespace>/<repository>" in result.stderr, result.stderr


@pytest_twisted.ensureDeferred
async def test_prune_selects_as_access_rules_do(tmp_path: Any) -> None:
    """``<namespace>/lib/**`` selects the mirrored repository ``lib`` itself too, as ``[[access]]`` does."""
    mirror = Repositories(FsDriver(str(tmp_path), InlinePool()), "mirror/")
    for name in ("lib", "lib/app", "lib/app/web", "libx", "other/lib"):
        await mirror.link_blob(name, digest_of(name.encode()))
    pruner = OnlinePruner({NS: mirror}, blobs=None, where=str(tmp_path), manifest_limit=1 << 20)  # type: ignore[arg-type]
    report = await pruner.run(PruneSelection(patterns=(f"{NS}/lib/**",), dry_run=True))
    assert report["repositories_matched"] == 3
    policy = AccessPolicy.from_config(parse_access_rules(
        [{"users": ["anonymous"], "repositories": [f"{NS}/lib/**"], "actions": ["pull"]}]))
    assert [name for name in await mirror.catalog() if policy.allows(None, f"{NS}/{name}", PULL)] == \
        ["lib", "lib/app", "lib/app/web"]
