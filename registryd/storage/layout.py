"""Where everything lives in a store: the one path mapper of both drivers.

Keys are relative and ``/``-separated: an object key under the bucket's
prefix (the S3 client adds the prefix), a path under the data directory
(``local_path``). The layout::

    blobs/<alg>/<2 hex>/<hex>                         immutable content
    repositories/<name>/_blobs/<alg>/<hex>            link: the blob is in <name>
    repositories/<name>/_manifests/revisions/<alg>/<hex>  {"mediaType": ...}
    repositories/<name>/_manifests/tags/<tag>         the digest it points at
    repositories/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>  a descriptor
    repositories/<name>/_pulls/<alg>/<hex>            last pull (mtime / LastModified)
    mirror/<namespace folder>/<name>/...              the same, for a mirrored repository
    uploads/<id>/...                                  upload sessions
    trash/<run>/<alg>/<2 hex>/<hex>                   a blob a garbage collection moved aside

A namespace folder is the upstream's namespace (a host, with an optional
``:port``) with ``:`` as ``_``. Name components never start with ``_``, so
a repository's own folders never collide with a nested repository.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

from registryd.digest import Digest

BLOBS = "blobs/"
REPOSITORIES = "repositories/"
MIRROR = "mirror/"
UPLOADS = "uploads/"
TMP = "tmp/"
#: Blobs a garbage collection (registryd.upkeep.collector) moved aside, one folder per run.
TRASH = "trash/"
#: What a registryd data directory has (at least one of).
TOP_LEVEL = (BLOBS, REPOSITORIES, MIRROR, UPLOADS, TMP)
#: The small object every node writes and reads back to prove the bucket usable.
READY_PROBE = "_registryd/ready"

# Inside one repository's folder: its own folders (markers) start with ``_``.
LINKS_MARKER = "_blobs"
MANIFESTS_MARKER = "_manifests"
REFERRERS_MARKER = "_referrers"
PULLS_MARKER = "_pulls"
REVISIONS_FOLDER = "revisions"     # in _manifests/
TAGS_FOLDER = "tags"               # in _manifests/
#: A folder holding one of these is a repository.
MARKERS = (MANIFESTS_MARKER, LINKS_MARKER)
LINKS = f"{LINKS_MARKER}/"
REVISIONS = f"{MANIFESTS_MARKER}/{REVISIONS_FOLDER}/"
TAGS = f"{MANIFESTS_MARKER}/{TAGS_FOLDER}/"
REFERRERS = f"{REFERRERS_MARKER}/"
PULLS = f"{PULLS_MARKER}/"


def local_path(root: str, key: str) -> str:
    """The file or folder of ``key`` in the data directory ``root``."""
    return os.path.join(root, *(part for part in key.split("/") if part))


def blob_key(digest: Digest) -> str:
    return f"{BLOBS}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def trash_key(run: str, digest: Digest) -> str:
    """Where collection ``run`` puts the blob ``digest`` aside."""
    return f"{TRASH}{run}/{blob_key(digest)[len(BLOBS):]}"


def namespace_folder(namespace: str) -> str:
    """The folder under ``mirror/`` of an upstream namespace: ``registry.local:5000`` -> ``registry.local_5000``."""
    return namespace.replace(":", "_")


def folder_namespace(folder: str, known: Mapping[str, str] | None = None) -> str:
    """The namespace a folder under ``mirror/`` stands for: a configured one, else the folder
    read back (a namespace is a host[:port]; only the port's ``:`` became ``_``)."""
    return (known or {}).get(folder) or folder.replace("_", ":")


def namespace_folders(namespaces: Iterable[str]) -> dict[str, str]:
    """Folder under ``mirror/`` -> namespace, for the configured upstreams' namespaces."""
    return {namespace_folder(namespace): namespace for namespace in namespaces}


def repositories_root(namespace: str | None) -> str:
    """Where the local repositories (None) or one upstream's mirrored ones live."""
    if namespace is None:
        return REPOSITORIES
    return f"{MIRROR}{namespace_folder(namespace)}/"


def upload_prefix(upload_id: str) -> str:
    return f"{UPLOADS}{upload_id}/"


def session_of(key: str) -> str | None:
    """The upload session id in a key under ``uploads/``, or None."""
    rest = key[len(UPLOADS):] if key.startswith(UPLOADS) else ""
    upload_id = rest.partition("/")[0]
    return upload_id or None


# Keys inside one repository's folder (``<root><name>/`` + key).

def link_key(digest: Digest) -> str:
    return f"{LINKS}{digest.algorithm}/{digest.hex}"


def revision_key(digest: Digest) -> str:
    return f"{REVISIONS}{digest.algorithm}/{digest.hex}"


def tag_key(tag: str) -> str:
    return f"{TAGS}{tag}"


def referrers_key(subject: Digest) -> str:
    """The folder of the referrer entries of ``subject``."""
    return f"{REFERRERS}{subject.algorithm}/{subject.hex}/"


def referrer_entry(digest: Digest) -> str:
    """The name of the referrer entry of the manifest ``digest`` in its subject's folder."""
    return f"{digest.algorithm}-{digest.hex}"


def referrer_key(subject: Digest, digest: Digest) -> str:
    return referrers_key(subject) + referrer_entry(digest)


def pull_key(digest: Digest) -> str:
    return f"{PULLS}{digest.algorithm}/{digest.hex}"
