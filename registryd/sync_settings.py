"""``[[sync]]`` tables: which upstream repositories to keep mirrored ahead of any pull.

A job names one ``[[upstream]]`` (by namespace: its credentials, CA and
timeouts apply), the repositories to copy (exact names or globs of
registryd.globs, matched against the names the upstream itself uses:
``library/alpine``, ``team/*``), which of their tags (include/exclude
regular expressions, ``keep_latest``), the platforms of an index to copy,
and when to run (every ``interval`` seconds, or ``continuous``: again
``poll_interval`` seconds after each run ends).

Here only the settings and their checks (the config loader imports this,
so it imports nothing of registryd's but the schema and the globs); the
jobs run in registryd.sync.
"""
from __future__ import annotations

import re
from typing import Any

import attrs

from registryd.globs import Glob
from registryd.platforms import Platform, parse_platform
from registryd.schema import ConfigError, SettingError, positive, read_table, setting

_JOB_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _name(key: str, value: str) -> str:
    if not _JOB_NAME.match(value):
        raise SettingError(f"'{key}' must be 1 to 64 of a-z 0-9 . _ - (starting with a letter or digit), "
                           f"not {value!r}")
    return value


def _repositories(key: str, value: list[Any]) -> tuple[Glob, ...]:
    if not value:
        raise SettingError(f"'{key}' must name at least one repository")
    globs = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise SettingError(f"'{key}[{index}]' must be a string, not {type(item).__name__} {item!r}")
        try:
            globs.append(Glob.parse(item))
        except ValueError as e:
            raise SettingError(f"'{key}[{index}]' {item[:100]!r} is not a repository name or glob: it {e}") from None
    return tuple(globs)


def _patterns(key: str, value: list[Any]) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise SettingError(f"'{key}[{index}]' must be a string, not {type(item).__name__} {item!r}")
        try:
            patterns.append(re.compile(item))
        except re.error as e:
            raise SettingError(f"'{key}[{index}]' {item[:100]!r} is not a regular expression: {e}") from None
    return tuple(patterns)


def _platforms(key: str, value: list[Any]) -> tuple[Platform, ...]:
    platforms = []
    for index, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError(f"must be a string, not {type(item).__name__} {item!r}")
            platforms.append(parse_platform(item))
        except ValueError as e:
            raise SettingError(f"'{key}[{index}]': {e}") from None
    return tuple(platforms)


def _not_negative(key: str, value: int) -> int:
    if value < 0:
        raise SettingError(f"'{key}' must not be negative, not {value!r}")
    return value


@attrs.frozen
class SyncJob:
    """One ``[[sync]]`` table."""

    name: str = setting(kind=str, check=_name, required=True, doc="names the job: registryd sync --now NAME")
    upstream: str = setting(kind=str, check=lambda key, value: value.lower(), required=True,
                            doc="the namespace of one [[upstream]]")
    repositories: tuple[Glob, ...] = setting(kind=list, check=_repositories, required=True,
                                             doc="names or globs, as the upstream names them")
    include_tags: tuple[re.Pattern[str], ...] = setting((), list, _patterns,
                                                        "regular expressions a tag must match one of (all)")
    exclude_tags: tuple[re.Pattern[str], ...] = setting((), list, _patterns,
                                                        "regular expressions of tags to leave out")
    keep_latest: int = setting(0, int, _not_negative, "copy only the N newest selected tags (0: all)")
    platforms: tuple[Platform, ...] = setting((), list, _platforms, "children of an index to copy (all)")
    interval: int = setting(3600, int, positive, "seconds from one run's start to the next")
    continuous: bool = setting(False, bool, doc="run again poll_interval seconds after each run ends")
    poll_interval: int = setting(60, int, positive, "seconds between runs of a continuous job")
    concurrency: int = setting(2, int, positive, "images copied at once")
    mirror_deletes: bool = setting(False, bool, doc="remove a tag from the cache once it is gone upstream")
    referrers: bool = setting(True, bool, doc="copy each image's signatures, SBOMs and attestations")

    def selects_tag(self, tag: str) -> bool:
        """Included (by any include pattern, or all when there is none) and not excluded."""
        if self.include_tags and not any(p.fullmatch(tag) for p in self.include_tags):
            return False
        return not any(p.fullmatch(tag) for p in self.exclude_tags)


def sync_jobs(key: str, value: list[Any]) -> tuple[SyncJob, ...]:
    """``[[sync]]`` tables -> jobs, each checked; names unique."""
    jobs: list[SyncJob] = []
    for index, table in enumerate(value):
        job = SyncJob(**read_table(SyncJob, table, f"{key}[{index}]", shape="[[sync]]"))
        if any(j.name == job.name for j in jobs):
            raise ConfigError(f"'{key}[{index}].name': another [[sync]] job is named {job.name!r}")
        jobs.append(job)
    return tuple(jobs)


def check_sync_upstreams(jobs: tuple[SyncJob, ...], namespaces: set[str]) -> None:
    """Each job's upstream is the namespace of an [[upstream]] table."""
    for index, job in enumerate(jobs):
        if job.upstream not in namespaces:
            known = ", ".join(sorted(namespaces)) or "none"
            raise ConfigError(f"'sync[{index}].upstream' {job.upstream!r} is not the namespace of an "
                              f"[[upstream]] (configured: {known})")
