"""Surveys and the mirror cache limit on a shared S3 bucket, while every node serves.

The survey is registryd.upkeep.survey's Survey, by the same rules, built
from listings instead of a walk: one of ``blobs/`` (sizes), one flat listing
each of ``repositories/`` and ``mirror/`` (revisions, pull markers and blob
links with their LastModified; registryd.upkeep.s3_marker takes the keys
apart), and each manifest document read once, a few at a time. Documents
are content-addressed, so what one names is remembered from one survey to
the next (``Documents``): a survey of a bucket that changed little costs
its listings. Tags are not read: a tag points at a revision of its own
repository, which keeps the same digests already (a tag without its
revision is fsck's business; the collector, which decides what goes, reads
tags).

Eviction cannot delete a blob as the filesystem's does (under the
BlobGuard): another node may have just claimed it, for a push that HEADed
it or a fill that committed it, and that claim is in the other node's
memory. So ``evict_s3`` deletes metadata only: the planned manifests,
through their mirror folder's RepositoryBackend (their tags, referrer entry
and pull marker go with them), and the blob-only links whose blobs the plan
frees. The blobs nothing keeps then are left to the S3 collector and its
trash/re-mark protocol (registryd.upkeep.s3_collector): the scheduler runs
one collection right after, which removes those older than ``[gc] delay``.

Every deletion is checked first against times listed again: a manifest
pulled (or cached again) since the survey stays, and so do its blobs; a
link written again since (a fill) stays. Every node may evict at the same
time: deletions are idempotent, so overlapping runs only find less to do
(though two nodes that both found a manifest before either deleted it both
count it in their eviction metrics).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Mapping

import attrs
from twisted.logger import Logger

from registryd.deferreds import bounded_each
from registryd.digest import Digest
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.errors import ObjectTooLarge
from registryd.storage.s3.listing import list_blobs
from registryd.storage import layout
from registryd.storage.s3.store import S3Store
from registryd.storage.scan import digest_or_none
from registryd.upkeep.collector import referenced_digests
from registryd.upkeep.eviction import Eviction, EvictionPlan
from registryd.upkeep.s3_marker import (
    CONCURRENCY, TrashEntry, list_trash, read_document, repository_entries,
)
from registryd.upkeep.survey import MirrorLink, MirrorManifest, Survey, subject_of

log = Logger()


@attrs.frozen
class S3Repository:
    """A repository in the bucket: as the survey names it, and where eviction finds it."""

    name: str               # as a client pulls it: "team/app", "docker.io/library/alpine"
    remote: str             # its name under its root
    upstream: str | None    # the upstream namespace of a mirrored repository
    folder: str | None      # its folder under ``mirror/`` (the namespace with ':' as '_')

    @property
    def root(self) -> str:
        return layout.repositories_root(self.folder)

    def link_key(self, digest: Digest) -> str:
        return f"{self.root}{self.remote}/{layout.link_key(digest)}"


@attrs.frozen
class Document:
    """What one manifest document keeps: itself and every digest it names; and its subject."""

    keeps: frozenset[Digest]
    subject: Digest | None


class Documents:
    """What each manifest document names, remembered from one survey to the next."""

    def __init__(self) -> None:
        self._known: dict[Digest, Document] = {}

    async def read(self, client: S3Client, digests: set[Digest],
                   trash: Mapping[Digest, list[TrashEntry]]) -> dict[Digest, Document]:
        """Those of ``digests``; documents read only for the ones not known yet.

        One that is nowhere (a revision whose push is still in flight, a
        broken store) keeps only its digest this time and is read again next
        time. What is no longer listed is forgotten.
        """
        found = {digest: self._known[digest] for digest in digests if digest in self._known}

        async def read_one(digest: Digest) -> None:
            try:
                content = await read_document(client, digest, trash)
            except ObjectTooLarge:
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
    """One repository's keys: digest -> LastModified."""

    revisions: dict[Digest, float] = attrs.field(factory=dict)
    pulls: dict[Digest, float] = attrs.field(factory=dict)
    links: dict[Digest, float] = attrs.field(factory=dict)


def _digest(parts: list[str]) -> Digest | None:
    return digest_or_none(parts[0], parts[1]) if len(parts) == 2 else None


async def _list_repositories(client: S3Client, namespaces: Mapping[str, str]) -> dict[S3Repository, _Listed]:
    """Local repositories, then mirrored ones, in key order."""
    found: dict[S3Repository, _Listed] = {}
    names: dict[tuple[str | None, str], S3Repository] = {}
    async for place, entry in repository_entries(client):
        repository = names.get((place.folder, place.remote))
        if repository is None:
            if place.folder is None:
                repository = S3Repository(place.remote, place.remote, None, None)
            else:
                namespace = layout.folder_namespace(place.folder, dict(namespaces))
                repository = S3Repository(f"{namespace}/{place.remote}", place.remote, namespace, place.folder)
            names[(place.folder, place.remote)] = repository
        when = entry.last_modified or 0.0
        digest: Digest | None
        if place.marker == layout.MANIFESTS_MARKER and place.rest[:1] == [layout.REVISIONS_FOLDER]:
            digest = _digest(place.rest[1:])
            if digest is not None:
                found.setdefault(repository, _Listed()).revisions[digest] = when
        elif place.marker == layout.PULLS_MARKER:
            digest = _digest(place.rest)
            if digest is not None:
                found.setdefault(repository, _Listed()).pulls[digest] = when
        elif place.marker == layout.LINKS_MARKER:
            digest = _digest(place.rest)
            if digest is not None:
                found.setdefault(repository, _Listed()).links[digest] = when
    return found


async def take_s3_survey(client: S3Client, namespaces: Mapping[str, str], documents: Documents | None = None,
                         clock: Callable[[], float] = time.time) -> Survey:
    """The survey of the bucket ``client`` works on (``namespaces``: mirror folder -> namespace)."""
    survey = Survey(taken_at=clock())
    survey.blob_sizes = {digest: blob.size for digest, blob in (await list_blobs(client)).items()}
    repositories = await _list_repositories(client, namespaces)
    wanted = {digest for listed in repositories.values() for digest in listed.revisions}
    # A collection in progress (on any node) may hold a document in its trash.
    read = await (documents or Documents()).read(client, wanted, await list_trash(client) if wanted else {})
    named: set[Digest] = set()
    link_candidates: list[tuple[S3Repository, Digest, float]] = []
    for repository, listed in repositories.items():
        local = repository.upstream is None
        for digest, written in listed.revisions.items():
            document = read[digest]
            if local:
                survey.local.update(document.keeps)
                continue
            named.update(document.keeps)
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


@attrs.define
class S3Eviction(Eviction):
    """``evict_s3``'s deletions; ``blobs``/``bytes`` are filled in from the collection that follows."""

    gone: int = 0                                           # planned manifests already removed elsewhere
    kept_back: set[Digest] = attrs.field(factory=set)       # what the manifests pulled since keep


def _s3_repository(unit: MirrorManifest | MirrorLink) -> S3Repository:
    repository = unit.repository
    assert isinstance(repository, S3Repository) and repository.folder is not None, "a survey of a bucket"
    return repository


async def evict_s3(store: S3Store, survey: Survey, plan: EvictionPlan) -> S3Eviction:
    """Delete the plan's manifests and the blob-only links whose blobs it frees; never a blob."""
    done = S3Eviction()
    by_repository: dict[S3Repository, list[MirrorManifest]] = {}
    for manifest in plan.manifests:
        by_repository.setdefault(_s3_repository(manifest), []).append(manifest)

    async def evict_manifests(item: tuple[S3Repository, list[MirrorManifest]]) -> None:
        repository, manifests = item
        assert repository.folder is not None
        backend = store.mirror_repositories(repository.folder)
        # Listed again now: a pull, or a caching again, since the survey moved these times.
        revisions = await backend.revisions(repository.remote)
        pulls = await backend.pulls(repository.remote)
        for manifest in manifests:
            written = revisions.get(manifest.digest)
            if written is None:
                done.gone += 1
            elif max(written, pulls.get(manifest.digest, 0.0)) > manifest.last_used:
                done.kept += 1
                done.kept_back.update(manifest.keeps)
            elif await backend.delete_manifest(repository.remote, manifest.digest, manifest.subject):
                done.manifests += 1
                log.debug("evicted manifest {name}@{digest}", name=repository.name, digest=str(manifest.digest))
            else:
                done.gone += 1

    async def unlink(link: MirrorLink) -> None:
        repository = _s3_repository(link)
        assert repository.folder is not None
        info = await store.client.head_object(repository.link_key(link.digest))
        # A HEAD's Last-Modified is to the second; the listing's may be finer.
        if info is None or info.last_modified is None or info.last_modified >= math.floor(link.last_used) + 1:
            return  # gone already, or written again by a fill since the survey
        if await store.mirror_repositories(repository.folder).unlink_blob(repository.remote, link.digest):
            done.links += 1

    await bounded_each(by_repository.items(), evict_manifests, CONCURRENCY)
    await bounded_each(_freed_links(survey.links, plan), unlink, CONCURRENCY)
    return done


def _freed_links(links: Iterable[MirrorLink], plan: EvictionPlan) -> list[MirrorLink]:
    return [link for link in links if link.digest in plan.blobs]
