"""One survey of the store: what each byte is kept for, and when mirror content was last used.

The result (a Survey) feeds the store-size metrics and the mirror cache
limit (registryd.upkeep.eviction). It is built from listings, over any
storage driver (a data directory, a bucket, memory): one of ``blobs/``
(sizes), one flat listing each of ``repositories/`` and ``mirror/``
(revisions, pull markers and blob links with their times; the keys are
taken apart by registryd.upkeep.marker), and each manifest document read
once, a few at a time. Documents are content-addressed, so what one names
is remembered from one survey to the next (``Documents``): a survey of a
store that changed little costs its listings. On a driver with a threaded
twin (the data directory) the whole pass runs in one worker thread, so
thousands of stats never reach the reactor.

The rules: a local repository's revisions keep what their documents name,
and its blob links keep their blobs (a pushed layer's manifest may still
be on its way); that is never evicted. Tags are not read: a tag points at
a revision of its own repository, which keeps the same digests already (a
tag without its revision is fsck's business). Everything else a mirrored
repository holds is the mirror cache: its manifests, used when last
pulled (or else when cached), and blob links that no cached manifest
names (a blob-only pull), used when written.
"""
from __future__ import annotations

import json
import time
from typing import AbstractSet, Callable, Mapping

import attrs
from twisted.logger import Logger

from registryd.deferreds import bounded_each
from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage.driver import Driver, TooLarge, finish
from registryd.storage.layout import (
    LINKS_MARKER, MANIFESTS_MARKER, PULLS_MARKER, REVISIONS_FOLDER, folder_namespace, link_key, repositories_root,
)
from registryd.storage.listing import list_blobs
from registryd.storage.scan import digest_or_none
from registryd.upkeep.pins import Pin
from registryd.upkeep.marker import (
    CONCURRENCY, TrashEntry, list_trash, read_document, referenced_digests, repository_entries,
)

log = Logger()


@attrs.frozen
class SurveyedRepository:
    """A repository as the survey names it, and where eviction finds its keys."""

    name: str               # as a client pulls it: "team/app", "docker.io/library/alpine"
    remote: str             # its name under its root (in its upstream, for a mirrored one)
    upstream: str | None    # the upstream namespace of a mirrored repository
    folder: str | None      # its folder under ``mirror/`` (the namespace with ':' as '_')

    @property
    def root(self) -> str:
        return repositories_root(self.folder)

    def key(self, *parts: str) -> str:
        """``<root><remote>/<parts...>``: one of the repository's keys."""
        return "/".join([f"{self.root}{self.remote}", *parts])

    def link_key(self, digest: Digest) -> str:
        return self.key(link_key(digest))


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
    #: What the manifests a [[sync]] job lists keep (upkeep.pins): mirror content, never evicted.
    pinned: set[Digest] = attrs.field(factory=set)

    @property
    def total_bytes(self) -> int:
        return sum(self.blob_sizes.values())

    def mirror_only(self) -> set[Digest]:
        """Stored blobs that only mirror content keeps: what eviction may free."""
        held = {d for m in self.manifests for d in m.keeps} | {link.digest for link in self.links} | self.pinned
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


@attrs.frozen
class Document:
    """What one manifest document keeps: itself and every digest it names; and its subject."""

    keeps: frozenset[Digest]
    subject: Digest | None


class Documents:
    """What each manifest document names, remembered from one survey to the next."""

    def __init__(self) -> None:
        self._known: dict[Digest, Document] = {}

    async def read(self, driver: Driver, digests: set[Digest],
                   trash: Mapping[Digest, list[TrashEntry]]) -> dict[Digest, Document]:
        """Those of ``digests``; documents read only for the ones not known yet.

        One that is nowhere (a revision whose push is still in flight, a
        broken store) keeps only its digest this time and is read again next
        time. What is no longer listed is forgotten.
        """
        found = {digest: self._known[digest] for digest in digests if digest in self._known}

        async def read_one(digest: Digest) -> None:
            try:
                content = await read_document(driver, digest, trash)
            except TooLarge:
                # No manifest is that large (the API refuses them): fsck's business.
                log.warn("manifest {digest} is too large to read; the survey counts it alone",
                         digest=str(digest))
                found[digest] = self._known[digest] = Document(frozenset([digest]), None)
                return
            if content is None:
                found[digest] = Document(frozenset([digest]), None)
                return
            found[digest] = self._known[digest] = Document(
                frozenset({digest, *referenced_digests(content)}), subject_of(content))

        await bounded_each(sorted(digests - found.keys(), key=str), read_one, CONCURRENCY)
        self._known = {digest: document for digest, document in self._known.items() if digest in digests}
        return found


@attrs.define
class _Listed:
    """One repository's keys: digest -> time written."""

    revisions: dict[Digest, float] = attrs.field(factory=dict)
    pulls: dict[Digest, float] = attrs.field(factory=dict)
    links: dict[Digest, float] = attrs.field(factory=dict)


def _digest(parts: list[str]) -> Digest | None:
    return digest_or_none(parts[0], parts[1]) if len(parts) == 2 else None


async def list_repositories(driver: Driver, namespaces: Mapping[str, str]) -> dict[SurveyedRepository, _Listed]:
    """Local repositories, then mirrored ones, in key order (``namespaces``: mirror folder -> namespace)."""
    found: dict[SurveyedRepository, _Listed] = {}
    names: dict[tuple[str | None, str], SurveyedRepository] = {}
    async for place, entry in repository_entries(driver):
        repository = names.get((place.folder, place.remote))
        if repository is None:
            if place.folder is None:
                repository = SurveyedRepository(place.remote, place.remote, None, None)
            else:
                namespace = folder_namespace(place.folder, namespaces)
                repository = SurveyedRepository(f"{namespace}/{place.remote}", place.remote, namespace,
                                                place.folder)
            names[(place.folder, place.remote)] = repository
        when = entry.modified or 0.0
        digest: Digest | None
        if place.marker == MANIFESTS_MARKER and place.rest[:1] == [REVISIONS_FOLDER]:
            digest = _digest(place.rest[1:])
            if digest is not None:
                found.setdefault(repository, _Listed()).revisions[digest] = when
        elif place.marker == PULLS_MARKER:
            digest = _digest(place.rest)
            if digest is not None:
                found.setdefault(repository, _Listed()).pulls[digest] = when
        elif place.marker == LINKS_MARKER:
            digest = _digest(place.rest)
            if digest is not None:
                found.setdefault(repository, _Listed()).links[digest] = when
    return found


async def take_survey(driver: Driver, namespaces: Mapping[str, str], documents: Documents | None = None,
                      clock: Callable[[], float] = time.time, pinned: AbstractSet[Pin] = frozenset()) -> Survey:
    """The survey of the store ``driver`` holds (``namespaces``: mirror folder -> namespace).

    ``pinned``: the manifests [[sync]] jobs list (upkeep.pins), kept out of eviction.
    Whole in one worker thread over the driver's threaded twin, if it has one.
    """
    twin = driver.threaded()
    if twin is None:
        return await _take_survey(driver, namespaces, documents or Documents(), clock, pinned)
    blocking, pool = twin
    known = documents or Documents()
    return await pool.run(lambda: finish(_take_survey(blocking, namespaces, known, clock, pinned)))


async def _take_survey(driver: Driver, namespaces: Mapping[str, str], documents: Documents,
                       clock: Callable[[], float], pinned: AbstractSet[Pin] = frozenset()) -> Survey:
    survey = Survey(taken_at=clock())
    survey.blob_sizes = {digest: blob.size for digest, blob in (await list_blobs(driver)).items()}
    repositories = await list_repositories(driver, namespaces)
    wanted = {digest for listed in repositories.values() for digest in listed.revisions}
    # A collection in progress (in any process or node) may hold a document in its trash.
    read = await documents.read(driver, wanted, await list_trash(driver) if wanted else {})
    named: set[Digest] = set()
    link_candidates: list[tuple[SurveyedRepository, Digest, float]] = []
    for repository, listed in repositories.items():
        local = repository.upstream is None
        for digest, written in listed.revisions.items():
            document = read[digest]
            if local:
                survey.local.update(document.keeps)
                continue
            named.update(document.keeps)
            if (repository.upstream, repository.remote, digest) in pinned:
                survey.pinned.update(document.keeps)
                continue
            survey.manifests.append(MirrorManifest(repository, digest, max(written, listed.pulls.get(digest, 0.0)),
                                                   document.keeps, document.subject))
        for digest, written in listed.links.items():
            if local:
                survey.local.add(digest)   # pushed, its manifest maybe still on its way
            else:
                link_candidates.append((repository, digest, written))
    for repository, digest, written in link_candidates:
        if digest not in named:
            survey.links.append(MirrorLink(repository, digest, written))
    return survey
