"""``[[retention]]`` tables: which tags and manifests of local repositories are kept.

Declared here with registryd.schema, like every section, and read by
registryd.config; applied by registryd.upkeep.retention (the one policy,
on every driver), on the server's schedule and by ``registryd retention``.

A rule names repositories (registryd.globs) and says what stays in them:
``keep_latest`` tags by push time, tags matching ``keep_tags`` always, and
untagged manifests until they are older than ``untagged_after``. A rule
that says neither ``keep_latest`` nor ``untagged_after`` would remove
nothing, and is refused.
"""
from __future__ import annotations

import math
from typing import Any

import attrs

from registryd.globs import Glob
from registryd.schema import ConfigError, SettingError, not_negative, read_table, setting
from registryd.tag_globs import TagGlob
from registryd.units import parse_duration

#: The default ``interval``: once a day.
DEFAULT_INTERVAL = 86400.0
#: A duration past this (about 3000 years) is a typo, not a policy.
MAX_SECONDS = 1e11


def _strings(where: str, value: list[Any]) -> list[str]:
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise SettingError(f"'{where}[{index}]' must be a string, not {type(item).__name__} {item!r}")
    return value


def _repositories(where: str, value: list[Any]) -> tuple[Glob, ...]:
    globs = []
    for index, text in enumerate(_strings(where, value)):
        try:
            globs.append(Glob.parse(text))
        except ValueError as e:
            raise SettingError(f"'{where}[{index}]': {text[:100]!r} is not a repository glob: it {e}") from None
    if not globs:
        raise SettingError(f"'{where}' must name at least one repository glob (\"**\" for every one)")
    return tuple(globs)


def _tag_globs(where: str, value: list[Any]) -> tuple[TagGlob, ...]:
    globs = []
    for index, text in enumerate(_strings(where, value)):
        try:
            globs.append(TagGlob.parse(text))
        except ValueError as e:
            raise SettingError(f"'{where}[{index}]': {text[:100]!r} is not a tag glob: it {e}") from None
    return tuple(globs)


def _seconds(where: str, value: Any) -> float:
    """Seconds from an integer, or an age like ``"7d"`` (registryd.units.parse_duration)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingError(f"'{where}' must be seconds or a duration like \"7d\", not {value!r}")
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise SettingError(f"'{where}': {e}") from None
    else:
        seconds = float(value)
    if not 0 <= seconds < MAX_SECONDS or math.isnan(seconds):
        raise SettingError(f"'{where}' must be between 0 and {MAX_SECONDS:.0e} seconds, not {value!r}")
    return seconds


@attrs.frozen
class RetentionRule:
    """One ``[[retention]]`` table."""

    repositories: tuple[Glob, ...] = setting(kind=list, check=_repositories, required=True,
                                             doc="globs of local repository names (registryd.globs)")
    keep_latest: int | None = setting(None, int, not_negative, "tags kept, newest pushed first; unset: all")
    keep_tags: tuple[TagGlob, ...] = setting((), list, _tag_globs, "tag globs always kept")
    untagged_after: float | None = setting(None, object, _seconds,
                                           "age (\"7d\" or seconds) past which untagged manifests go; "
                                           "unset: they stay")
    interval: float = setting(DEFAULT_INTERVAL, object, _seconds,
                              "seconds (or \"1d\") between the server's runs; 0: only `registryd retention`")

    def applies_to(self, name: str) -> bool:
        return any(glob.matches(name) for glob in self.repositories)

    def always_keeps(self, tag: str) -> bool:
        return any(glob.matches(tag) for glob in self.keep_tags)

    def describe(self) -> dict[str, Any]:
        """The rule as a report shows it."""
        return {"repositories": [g.text for g in self.repositories], "keep_latest": self.keep_latest,
                "keep_tags": [g.text for g in self.keep_tags], "untagged_after": self.untagged_after,
                "interval": self.interval}


def parse_retention_rules(where: str, value: Any) -> tuple[RetentionRule, ...]:
    """The ``[[retention]]`` tables (a list of dicts); a mistake is one line naming the rule and key."""
    if not isinstance(value, list):
        raise ConfigError(f"'{where}' must be a list of tables ([[{where}]])")
    rules = []
    for index, table in enumerate(value):
        here = f"{where}[{index}]"
        settings = read_table(RetentionRule, table, here, shape=f"[[{where}]]", needs="needs")
        if settings.get("keep_latest") is None and settings.get("untagged_after") is None:
            raise ConfigError(f"'{here}' needs keep_latest or untagged_after (or both): without either it "
                              f"removes nothing")
        rules.append(RetentionRule(**settings))
    return tuple(rules)
