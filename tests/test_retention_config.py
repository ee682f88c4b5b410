"""``[[retention]]`` in the config (one line per mistake), tag globs, and ``registryd retention``'s
refusals, in-process (tests/support/cli.py): each ends before the command would touch a store."""
from __future__ import annotations

import os
from typing import Any

import pytest

from registryd.config import load_config
from registryd.schema import ConfigError
from registryd.tag_globs import TagGlob
from support.cli import run_main

RULE = '[[retention]]\nrepositories = ["team/**"]\n'


def write(tmp_path: Any, text: str) -> str:
    path = str(tmp_path / "registryd.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_rules_are_read_with_their_defaults(tmp_path: Any) -> None:
    config = load_config(write(tmp_path, RULE + 'keep_latest = 10\nkeep_tags = ["latest", "v1.*"]\n'
                                              'untagged_after = "7d"\n'
                                              '[[retention]]\nrepositories = ["ci/*", "web"]\n'
                                              'untagged_after = 3600\ninterval = "6h"\n'))
    first, second = config.retention
    assert [g.text for g in first.repositories] == ["team/**"] and first.keep_latest == 10
    assert [g.text for g in first.keep_tags] == ["latest", "v1.*"]
    assert first.untagged_after == 7 * 86400 and first.interval == 86400
    assert second.keep_latest is None and second.keep_tags == () and second.untagged_after == 3600
    assert second.interval == 6 * 3600
    assert first.applies_to("team/app/web") and not first.applies_to("teams/app")
    assert second.applies_to("ci/x") and not second.applies_to("ci/x/y") and second.applies_to("web")
    assert load_config(None).retention == ()


@pytest.mark.parametrize("text, message", [
    ('[[retention]]\nkeep_latest = 1', "'retention[0]' needs 'repositories'"),
    (RULE, "'retention[0]' needs keep_latest or untagged_after (or both): without either it removes nothing"),
    ('[[retention]]\nrepositories = []\nkeep_latest = 1', "'retention[0].repositories' must name at least one"),
    ('[[retention]]\nrepositories = "team/**"\nkeep_latest = 1', "'retention[0].repositories' must be a list"),
    ('[[retention]]\nrepositories = ["Team/**"]\nkeep_latest = 1',
     "'retention[0].repositories[0]': 'Team/**' is not a repository glob: it may hold only lowercase letters"),
    ('[[retention]]\nrepositories = ["team**"]\nkeep_latest = 1', "uses '**' inside a component"),
    ('[[retention]]\nrepositories = [1]\nkeep_latest = 1', "'retention[0].repositories[0]' must be a string"),
    (RULE + "keep_latest = -1", "'retention[0].keep_latest' must not be negative, not -1"),
    (RULE + "keep_latest = '10'", "'retention[0].keep_latest' must be an integer"),
    (RULE + "keep_latest = true", "'retention[0].keep_latest' must be an integer"),
    (RULE + 'keep_latest = 1\nkeep_tags = ["release/1"]',
     "'retention[0].keep_tags[0]': 'release/1' is not a tag glob: it may hold only letters"),
    (RULE + 'keep_latest = 1\nkeep_tags = [""]', "'retention[0].keep_tags[0]': '' is not a tag glob: it is empty"),
    (RULE + 'untagged_after = "a week"', "'retention[0].untagged_after': 'a week' is not a duration"),
    (RULE + 'untagged_after = -5', "'retention[0].untagged_after' must be between 0 and"),
    (RULE + 'untagged_after = nan', "'retention[0].untagged_after' must be between 0 and"),
    (RULE + 'untagged_after = true', "'retention[0].untagged_after' must be seconds or a duration"),
    (RULE + 'keep_latest = 1\ninterval = "daily"', "'retention[0].interval': 'daily' is not a duration"),
    (RULE + 'keep_latest = 1\nkeep = 3', "unknown key 'retention[0].keep'"),
    ("retention = 1", "'retention' must be a list of tables ([[retention]])"),
    ("[retention]\nkeep_latest = 1", "'retention' must be a list of tables ([[retention]])"),
])
def test_mistakes_are_named_in_one_line(tmp_path: Any, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and path in str(info.value)


@pytest.mark.parametrize("glob, matching, other", [
    ("latest", ["latest"], ["latest1", "Latest", "xlatest"]),
    ("v1.*", ["v1.", "v1.2", "v1.2.3-rc1"], ["v1", "v10", "v2.1"]),
    ("*-rc?", ["1.0-rc1", "-rcX"], ["1.0-rc10", "1.0-rc"]),
    ("Release_*", ["Release_", "Release_2024"], ["release_2024"]),
])
def test_tag_globs(glob: str, matching: list[str], other: list[str]) -> None:
    parsed = TagGlob.parse(glob)
    assert all(parsed.matches(tag) for tag in matching)
    assert not any(parsed.matches(tag) for tag in other)


@pytest.mark.parametrize("text, reason", [
    ("", "is empty"), ("a" * 129, "is longer than 128 characters"), ("a b", "may hold only"),
    ("[ab]", "may hold only"), ("a/b", "a tag has no '/'"),
])
def test_bad_tag_globs(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        TagGlob.parse(text)


def test_help() -> None:
    result = run_main("retention", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("--dry-run", "--json", "--config FILE", "--url URL", "keep_latest", "keep_tags",
                  "untagged_after", "referrers", "registryd gc", "Mirrored repositories are never touched",
                  "POST /admin/retention", "exit status", "2 bad arguments"):
        assert words in text, words
    assert "retention" in run_main("--help").stdout


def test_a_config_without_rules_is_refused(tmp_path: Any) -> None:
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / "repositories")
    result = run_main("retention", "-c", write(tmp_path, "[gc]\ninterval = 0\n"), "-d", str(data_dir))
    assert result.returncode == 2
    assert result.stderr == f"registryd retention: the config file {tmp_path / 'registryd.toml'} has no " \
                            f"[[retention]] rules\n"
    assert run_main("retention", "-d", str(data_dir)).stderr == \
        "registryd retention: the config (no --config given) has no [[retention]] rules\n"


@pytest.mark.parametrize("args, status, message", [
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--url", "ftp://example"], 2, "--url must be http://host[:port] or https://host[:port], not 'ftp://example'"),
    (["--url", "http://127.0.0.1:1"], 3, "cannot reach http://127.0.0.1:1"),
    (["--url", "http://127.0.0.1:1", "--user", "alice"], 2, "--user needs a password"),
    (["--url", "http://127.0.0.1:1", "--user", "alice", "--password-file", "/nonexistent/pw"], 2,
     "cannot read --password-file /nonexistent/pw"),
])
def test_argument_errors(args: list[str], status: int, message: str, monkeypatch: Any) -> None:
    monkeypatch.delenv("REGISTRYD_PASSWORD", raising=False)
    result = run_main("retention", *args)
    assert result.returncode == status, result
    assert message in result.stderr and result.stderr.count("\n") <= 2 and result.stdout == ""


def test_a_bad_config_file_is_one_line_and_status_3(tmp_path: Any) -> None:
    result = run_main("retention", "-c", write(tmp_path, RULE + "keep_latest = -1"))
    assert result.returncode == 3
    assert result.stderr.startswith("registryd retention: config file ") and result.stderr.count("\n") == 1
    assert "'retention[0].keep_latest' must not be negative, not -1" in result.stderr
