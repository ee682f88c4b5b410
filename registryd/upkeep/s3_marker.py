"""The mark over an S3Client, for the S3 survey and fsck: registryd.upkeep.marker on an S3Driver.

Listings come back as the client's ObjectEntry (``last_modified``), as
those callers read them; the mark itself is written once, over any driver.
"""
from __future__ import annotations

from typing import AsyncIterator, Mapping, Sequence

from registryd.digest import Digest
from registryd.storage.driver import Entry
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.documents import ObjectEntry
from registryd.storage.s3.driver import S3Driver
from registryd.upkeep import marker
from registryd.upkeep.marker import (  # noqa: F401  (the names these callers import from here)
    CONCURRENCY, MANIFEST_LIMIT, TAG_LIMIT, TRASH, BlobEntry, Link, RepositoryKey, TrashEntry, blob_digest,
    repository_place, split_repository_key, trash_key,
)


def _object_entry(entry: Entry) -> ObjectEntry:
    return ObjectEntry(entry.key, entry.size, entry.modified, entry.version, entry.is_prefix)


async def list_blobs(client: S3Client, unexpected: list[ObjectEntry] | None = None) -> dict[Digest, BlobEntry]:
    """Every object under ``blobs/`` named by its digest; the others go to ``unexpected`` when given."""
    others: list[Entry] = []
    found = await marker.list_blobs(S3Driver(client), others)
    if unexpected is not None:
        unexpected.extend(_object_entry(entry) for entry in others)
    return found


async def list_trash(client: S3Client) -> dict[Digest, list[TrashEntry]]:
    """What every collection, running or crashed, holds in ``trash/``."""
    return await marker.list_trash(S3Driver(client))


async def repository_entries(client: S3Client) -> AsyncIterator[tuple[RepositoryKey, ObjectEntry]]:
    """Every key in a repository, local ones then mirrored ones (see marker.repository_entries)."""
    async for place, entry in marker.repository_entries(S3Driver(client)):
        yield place, _object_entry(entry)


async def read_document(client: S3Client, digest: Digest,
                        trash: Mapping[Digest, Sequence[TrashEntry]]) -> bytes | None:
    """A manifest document from ``blobs/`` or a trash copy (see marker.read_document)."""
    return await marker.read_document(S3Driver(client), digest, trash)
