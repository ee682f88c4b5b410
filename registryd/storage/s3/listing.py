"""The blobs of a bucket, in one listing of ``blobs/``: each with its size and LastModified."""
from __future__ import annotations

from typing import Sequence

import attrs

from registryd.digest import Digest
from registryd.storage.layout import BLOBS
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.documents import ObjectEntry
from registryd.storage.scan import digest_or_none


@attrs.frozen
class BlobEntry:
    digest: Digest
    key: str
    size: int
    last_modified: float | None


def blob_digest(parts: Sequence[str]) -> Digest | None:
    """``<alg>/<2 hex>/<hex>`` as under ``blobs/``, or None."""
    if len(parts) != 3:
        return None
    digest = digest_or_none(parts[0], parts[2])
    return digest if digest is not None and digest.hex[:2] == parts[1] else None


async def list_blobs(client: S3Client, unexpected: list[ObjectEntry] | None = None) -> dict[Digest, BlobEntry]:
    """Every object under ``blobs/`` that is named by its digest.

    Anything else is fsck's business: it goes to ``unexpected`` when given.
    """
    found: dict[Digest, BlobEntry] = {}
    async for entry in client.list_objects(BLOBS):
        digest = blob_digest(entry.key[len(BLOBS):].split("/"))
        if digest is not None:
            found[digest] = BlobEntry(digest, entry.key, entry.size, entry.last_modified)
        elif unexpected is not None:
            unexpected.append(entry)
    return found
