"""One walk of the store: what each byte is kept for, and when mirror content was last used.

The result (a Survey) feeds the store-size metrics and the mirror cache
limit (registryd.upkeep.eviction), whichever the driver: ``take_survey``
walks the data directory (blocking: it lists every blob and reads every
manifest, so run it in the IO pool); registryd.upkeep.s3_survey builds the
same Survey from listings of a shared bucket.

The rules: a local repository's revisions keep what their documents name,
and its tags and blob links keep what they name (a pushed layer's manifest
may still be on its way); that is never evicted. Everything else a
mirrored repository holds is the mirror cache: its manifests, used when
last pulled (or else when cached), and blob links that no cached manifest
names (a blob-only pull), used when written.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Protocol

import attrs

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage.files import mtime_of
from registryd.storage.scan import DataDir, Repository, read_file, scan_repository
from registryd.upkeep.collector import referenced_digests


def last_used(repository: Repository, digest: Digest, cached_at: float | None) -> float:
    """When a manifest was last pulled, or else when it was cached or pushed."""
    times = [t for t in (mtime_of(repository.pull_path(digest)), cached_at) if t is not None]
    return max(times, default=0.0)


class SurveyedRepository(Protocol):
    """A mirrored repository as a survey names it; each driver's eviction knows its own kind
    (``storage.scan.Repository`` in a data directory, ``s3_survey.S3Repository`` in a bucket)."""

    @property
    def name(self) -> str:
        """As a client pulls it: ``<namespace>/<repository>``."""

    @property
    def remote(self) -> str:
        """Its name in its upstream, and in its mirror folder's RepositoryBackend."""

    @property
    def upstream(self) -> str | None:
        """The upstream namespace (None for a local repository)."""


@attrs.frozen
class MirrorManifest:
    """A manifest revision in the mirror cache, and everything it keeps."""

    repository: SurveyedRepository
    digest: Digest
    last_used: float
    keeps: frozenset[Digest]      # its own content and every digest it names
    subject: Digest | None


@attrs.frozen
class MirrorLink:
    """A blob linked into a mirrored repository that no cached manifest names."""

    repository: SurveyedRepository
    digest: Digest
    last_used: float


@attrs.define
class Survey:
    """What one survey found; ``taken_at`` is when it began."""

    taken_at: float
    blob_sizes: dict[Digest, int] = attrs.field(factory=dict)
    local: set[Digest] = attrs.field(factory=set)        # never evicted
    manifests: list[MirrorManifest] = attrs.field(factory=list)
    links: list[MirrorLink] = attrs.field(factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.blob_sizes.values())

    def mirror_only(self) -> set[Digest]:
        """Stored blobs that only mirror content keeps: what eviction may free."""
        held = {d for m in self.manifests for d in m.keeps} | {link.digest for link in self.links}
        return {d for d in held - self.local if d in self.blob_sizes}

    @property
    def mirror_bytes(self) -> int:
        return sum(self.blob_sizes[d] for d in self.mirror_only())

    @property
    def local_bytes(self) -> int:
        return sum(size for d, size in self.blob_sizes.items() if d in self.local)


def subject_of(content: bytes | None) -> Digest | None:
    """The digest of a manifest document's subject, if it has one."""
    try:
        subject = json.loads(content or b"").get("subject", {}).get("digest")
        return parse_digest(subject) if isinstance(subject, str) else None
    except (ValueError, AttributeError, UnicodeDecodeError, RegistryError):
        return None


def take_survey(data: DataDir, clock: Callable[[], float] = time.time) -> Survey:
    """The survey of a data directory (blocking)."""
    survey = Survey(taken_at=clock())
    for blob in data.blob_files([]):
        survey.blob_sizes[blob.digest] = blob.size
    named: set[Digest] = set()
    link_candidates: list[tuple[Repository, Digest, str]] = []
    for repository in data.repositories():
        scan = scan_repository(repository)
        local = repository.upstream is None
        for digest, revision in scan.revisions.items():
            content = read_file(data.blob_path(digest))
            keeps = frozenset({digest, *referenced_digests(content or b"")})
            if local:
                survey.local.update(keeps)
                continue
            named.update(keeps)
            survey.manifests.append(MirrorManifest(
                repository, digest, last_used(repository, digest, mtime_of(revision.path)), keeps,
                subject_of(content)))
        for tag in scan.tags:
            if local and tag.digest is not None:
                survey.local.add(tag.digest)
        for digest, path in scan.links.items():
            if local:
                survey.local.add(digest)   # pushed, its manifest maybe still on its way
            else:
                link_candidates.append((repository, digest, path))
    for repository, digest, path in link_candidates:
        if digest not in named:
            survey.links.append(MirrorLink(repository, digest, mtime_of(path) or 0.0))
    return survey
