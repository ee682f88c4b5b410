"""The mark: what the repositories keep, read over a storage driver (any: disk, bucket, memory).

A revision keeps its digest and every digest its manifest document names;
a tag keeps the digest it holds; a referrer entry keeps its subject and its
manifest. Read from one flat listing each of ``repositories/`` and
``mirror/``. Blob links are remembered with their times, for the
collector's young check and its link sweep.

A document that is not under ``blobs/`` may be in ``trash/``, moved there
by a collection in progress (this one, or another process's or node's):
the trash copy is read then, or layers of a manifest committed meanwhile
would look unused.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

import attrs
from registryd.deferreds import bounded_each

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage.driver import Driver, Entry
from registryd.storage.layout import (
    LINKS_MARKER, MANIFESTS_MARKER, MARKERS, MIRROR, REFERRERS_MARKER, REPOSITORIES, REVISIONS_FOLDER, TAGS_FOLDER,
    TRASH, blob_key, folder_namespace,
)
from registryd.storage.listing import blob_digest
from registryd.storage.scan import digest_or_none

#: Manifest documents are read whole; the API serves none larger (MANIFEST_READ_LIMIT).
MANIFEST_LIMIT = 64 * 1024 * 1024
#: A tag holds one digest.
TAG_LIMIT = 4096
#: Small reads, moves and stats in flight at once.
CONCURRENCY = 8


def referenced_digests(content: bytes) -> Iterator[Digest]:
    """Every digest a manifest document names in a descriptor (``"digest": ...``).

    Wider than parse_manifest on purpose: it also covers non-distributable
    layers that were pushed anyway, subjects, and documents kept as an
    upstream sent them that do not parse as a manifest.
    """
    try:
        document = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return
    stack: list[Any] = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            digest = value.get("digest")
            if isinstance(digest, str):
                try:
                    yield parse_digest(digest)
                except RegistryError:
                    pass
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


@attrs.frozen
class Link:
    """``<root><name>/_blobs/<alg>/<hex>``: the blob is in ``repository``."""

    digest: Digest
    repository: str
    key: str
    last_modified: float | None


@attrs.frozen
class TrashEntry:
    """``trash/<run>/<alg>/<2 hex>/<hex>``: a blob that collection ``run`` moved aside."""

    digest: Digest
    key: str
    run: str
    size: int
    last_modified: float | None


async def list_trash(driver: Driver) -> dict[Digest, list[TrashEntry]]:
    """What every collection, running or crashed, holds in ``trash/``."""
    found: dict[Digest, list[TrashEntry]] = {}
    async for entry in driver.list(TRASH):
        run, _, rest = entry.key[len(TRASH):].partition("/")
        digest = blob_digest(rest.split("/"))
        if run and digest is not None:
            found.setdefault(digest, []).append(TrashEntry(digest, entry.key, run, entry.size, entry.modified))
    return found


@attrs.frozen
class RepositoryKey:
    """Where a key under ``repositories/`` or ``mirror/<folder>/`` sits in its repository."""

    root: str               # "repositories/" or "mirror/<folder>/"
    folder: str | None      # the mirror folder (a namespace with ':' as '_'); None for a local repository
    remote: str             # the repository's path under ``root``
    marker: str             # the first component that starts with '_': MANIFESTS_MARKER, LINKS_MARKER, ...
    rest: list[str]         # the components after the marker

    @property
    def name(self) -> str:
        """The repository as a client names it (a mirror folder read back as its namespace)."""
        return self.remote if self.folder is None else f"{folder_namespace(self.folder)}/{self.remote}"


def split_repository_key(key: str) -> RepositoryKey | None:
    """A key under ``repositories/`` or ``mirror/`` taken apart, or None if it is in no repository.

    Name components never start with ``_``: the first one that does is the marker.
    """
    folder: str | None = None
    if key.startswith(REPOSITORIES):
        root = REPOSITORIES
    elif key.startswith(MIRROR):
        folder = key[len(MIRROR):].partition("/")[0]
        if not folder:
            return None
        root = f"{MIRROR}{folder}/"
    else:
        return None
    parts = key[len(root):].split("/")
    for index, part in enumerate(parts):
        if part.startswith("_"):
            if index == 0:
                return None
            return RepositoryKey(root, folder, "/".join(parts[:index]), part, parts[index + 1:])
    return None


async def repository_entries(driver: Driver) -> AsyncIterator[tuple[RepositoryKey, Entry]]:
    """Every key in a repository, local ones then mirrored ones: one flat listing of each root.

    Keys in no repository (fsck's business) are left out.
    """
    for root in (REPOSITORIES, MIRROR):
        async for entry in driver.list(root):
            place = split_repository_key(entry.key)
            if place is not None:
                yield place, entry


@attrs.define
class Marker:
    """What the repositories keep; ``update`` lists afresh and reads only documents not read yet.

    ``keep`` only grows: a digest kept by the first mark stays kept through the second.
    """

    driver: Driver
    keep: set[Digest] = attrs.field(factory=set)
    links: dict[Digest, list[Link]] = attrs.field(factory=dict)
    #: Revisions of this pass whose document was nowhere to be read: (key, time).
    unreadable: list[tuple[str, float | None]] = attrs.field(factory=list)
    manifests: int = 0
    repositories: int = 0
    _documents: set[Digest] = attrs.field(factory=set)
    _revisions: set[str] = attrs.field(factory=set)
    _tags: set[tuple[str, str]] = attrs.field(factory=set)

    async def update(self, trash: Mapping[Digest, Sequence[TrashEntry]]) -> None:
        self.links = {}
        self.unreadable = []
        names: set[str] = set()
        unread: dict[Digest, list[Entry]] = {}
        tags: list[Entry] = []
        async for place, entry in repository_entries(self.driver):
            name, folder, rest = place.name, place.marker, place.rest
            if folder in MARKERS:
                names.add(name)
            if folder == LINKS_MARKER and len(rest) == 2:
                digest = digest_or_none(*rest)
                if digest is not None:
                    self.links.setdefault(digest, []).append(Link(digest, name, entry.key, entry.modified))
            elif folder == MANIFESTS_MARKER and len(rest) == 3 and rest[0] == REVISIONS_FOLDER:
                digest = digest_or_none(rest[1], rest[2])
                if digest is not None:
                    self.keep.add(digest)
                    if entry.key not in self._revisions:
                        unread.setdefault(digest, []).append(entry)
            elif folder == MANIFESTS_MARKER and len(rest) == 2 and rest[0] == TAGS_FOLDER:
                if (entry.key, entry.version) not in self._tags:
                    tags.append(entry)
            elif folder == REFERRERS_MARKER and len(rest) == 3:
                algorithm, _, hexpart = rest[2].partition("-")
                self.keep.update(d for d in (digest_or_none(rest[0], rest[1]), digest_or_none(algorithm, hexpart))
                                 if d is not None)
        self.repositories = len(names)
        await bounded_each(tags, self._read_tag, CONCURRENCY)
        await bounded_each(unread.items(), lambda item: self._read_revisions(item[0], item[1], trash), CONCURRENCY)

    async def _read_tag(self, entry: Entry) -> None:
        data = await self.driver.read(entry.key, TAG_LIMIT)
        if data is None:
            return  # deleted since the listing
        try:
            self.keep.add(parse_digest(data.decode("utf-8").strip()))
        except (UnicodeDecodeError, RegistryError):
            pass  # not a digest: fsck reports it
        self._tags.add((entry.key, entry.version))

    async def _read_revisions(self, digest: Digest, entries: list[Entry],
                              trash: Mapping[Digest, Sequence[TrashEntry]]) -> None:
        if digest not in self._documents:
            # TooLarge propagates: a document we cannot read whole could name
            # anything, so the collection stops rather than guess.
            content = await read_document(self.driver, digest, trash)
            if content is None:
                self.unreadable.extend((entry.key, entry.modified) for entry in entries)
                return
            self._documents.add(digest)
            self.keep.update(referenced_digests(content))
        self._revisions.update(entry.key for entry in entries)
        self.manifests += len(entries)


async def read_document(driver: Driver, digest: Digest,
                        trash: Mapping[Digest, Sequence[TrashEntry]]) -> bytes | None:
    """A manifest document from ``blobs/``, a trash copy, or ``blobs/`` again (restored meanwhile).

    None when it is nowhere; TooLarge past MANIFEST_LIMIT.
    """
    content = await driver.read(blob_key(digest), MANIFEST_LIMIT)
    for entry in trash.get(digest, ()):
        if content is not None:
            break
        content = await driver.read(entry.key, MANIFEST_LIMIT)
    if content is None and trash.get(digest):
        content = await driver.read(blob_key(digest), MANIFEST_LIMIT)
    return content
