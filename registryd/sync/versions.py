"""Which tags are the newest: by version where every tag reads as one, else by creation time.

``keep_latest = N`` keeps the N newest selected tags. Tags such as ``1.25``,
``v1.25.3``, ``1.26.0-rc.1`` are versions (as ``packaging.version`` reads
them: a leading ``v`` is allowed, a pre-release sorts before its release);
``latest``, ``bookworm`` or ``1.25-alpine`` are not. Version order is used
only when every candidate is a version, since mixing the two orders has no
meaning; otherwise the images' creation times (from their config) decide,
the tag name breaking ties.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from packaging.version import InvalidVersion, Version


def as_version(tag: str) -> Version | None:
    """The tag read as a version, or None."""
    try:
        return Version(tag)
    except InvalidVersion:
        return None


def all_versions(tags: Iterable[str]) -> bool:
    """Does every tag read as a version (so no creation time is needed)?"""
    return all(as_version(tag) is not None for tag in tags)


def newest(tags: Iterable[str], keep: int, created: Mapping[str, float] | None = None) -> list[str]:
    """The ``keep`` newest of ``tags`` (all when ``keep`` is 0), newest first.

    ``created``: tag -> the image's creation time (seconds), needed unless
    every tag is a version; a tag without one counts as oldest.
    """
    candidates = sorted(set(tags))
    versions = {tag: as_version(tag) for tag in candidates}
    if all(v is not None for v in versions.values()):
        ordered = sorted(candidates, key=lambda t: (versions[t], t), reverse=True)
    else:
        times = created or {}
        ordered = sorted(candidates, key=lambda t: (times.get(t, float("-inf")), t), reverse=True)
    return ordered if keep <= 0 else ordered[:keep]
