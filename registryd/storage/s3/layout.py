"""Object keys of a registryd store in a bucket: the filesystem layout, with keys for paths.

See registryd.storage.interface for the layout itself. The bucket prefix is
the client's business (S3Client adds it), so these keys are relative.
"""
from __future__ import annotations

from registryd.digest import Digest

BLOBS = "blobs/"
REPOSITORIES = "repositories/"
MIRROR = "mirror/"
UPLOADS = "uploads/"
#: The small object every node writes and reads back to prove the bucket usable.
READY_PROBE = "_registryd/ready"


def blob_key(digest: Digest) -> str:
    return f"{BLOBS}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def repositories_root(namespace: str | None) -> str:
    """Where the local repositories (None) or one upstream's mirrored ones live."""
    if namespace is None:
        return REPOSITORIES
    return f"{MIRROR}{namespace.replace(':', '_')}/"


def upload_prefix(upload_id: str) -> str:
    return f"{UPLOADS}{upload_id}/"
