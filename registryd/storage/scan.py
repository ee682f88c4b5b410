"""The data directory as a reader sees it: repositories, their links, revisions, tags and referrers; blobs.

Only reads: listing directories and reading small files, blocking (run it in
a thread). The layout is registryd.storage.layout's, the one the store
writes; fsck, the offline gc and the upkeep read the data directory through
this. Anything else found where these live is reported as unexpected, never
touched.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import attrs

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage import layout


def digest_or_none(algorithm: str, hexpart: str) -> Digest | None:
    try:
        return parse_digest(f"{algorithm}:{hexpart}")
    except RegistryError:
        return None


def read_file(path: str) -> bytes | None:
    """A small file's bytes, or None when it is gone or is no file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _entries(path: str) -> list[os.DirEntry[str]]:
    """The entries of a directory, sorted; none when it is missing or no directory."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_file(entry: os.DirEntry[str]) -> bool:
    return entry.is_file(follow_symlinks=False)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    return entry.is_dir(follow_symlinks=False)


@attrs.frozen
class Repository:
    """One repository: local, or a mirrored upstream repository."""

    name: str               # as a client pulls it: "team/app", "docker.io/library/alpine"
    remote: str             # its path under ``root``
    upstream: str | None    # the upstream namespace of a mirrored repository
    root: str               # DATA_DIR/repositories or DATA_DIR/mirror/<namespace>

    @property
    def kind(self) -> str:
        return "local" if self.upstream is None else "mirror"

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.remote)

    def revision_path(self, digest: Digest) -> str:
        return layout.local_path(self.path, layout.revision_key(digest))

    def link_path(self, digest: Digest) -> str:
        return layout.local_path(self.path, layout.link_key(digest))

    def pull_path(self, digest: Digest) -> str:
        """The marker whose mtime is when the manifest was last pulled."""
        return layout.local_path(self.path, layout.pull_key(digest))


@attrs.frozen
class Revision:
    digest: Digest
    path: str
    media_type: str | None
    error: str | None = None


@attrs.frozen
class Tag:
    name: str
    path: str
    digest: Digest | None
    error: str | None = None


@attrs.frozen
class Referrer:
    path: str
    subject: Digest | None
    digest: Digest | None
    error: str | None = None


@attrs.define
class RepositoryScan:
    """What one repository's directory holds."""

    repository: Repository
    links: dict[Digest, str] = attrs.field(factory=dict)
    revisions: dict[Digest, Revision] = attrs.field(factory=dict)
    tags: list[Tag] = attrs.field(factory=list)
    referrers: list[Referrer] = attrs.field(factory=list)
    unexpected: list[str] = attrs.field(factory=list)

    def tags_of(self, digest: Digest) -> list[str]:
        return [t.name for t in self.tags if t.digest == digest]


@attrs.frozen
class BlobFile:
    path: str
    digest: Digest
    size: int


def _read_revision(digest: Digest, path: str) -> Revision:
    data = read_file(path)
    if data is None:
        return Revision(digest, path, None, "the revision file cannot be read")
    return parse_revision(digest, path, data)


def parse_revision(digest: Digest, where: str, data: bytes) -> Revision:
    """A revision file's content (``{"mediaType": ...}``), from a file or an object at ``where``."""
    try:
        media_type = json.loads(data)["mediaType"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return Revision(digest, where, None, 'the revision file is not JSON {"mediaType": ...}')
    if not isinstance(media_type, str):
        return Revision(digest, where, None, "the revision file's mediaType is not a string")
    return Revision(digest, where, media_type)


def read_tag(name: str, path: str) -> Tag:
    data = read_file(path)
    if data is None:
        return Tag(name, path, None, "the tag file cannot be read")
    return parse_tag(name, path, data)


def parse_tag(name: str, where: str, data: bytes) -> Tag:
    """A tag file's content: the digest it points at."""
    try:
        return Tag(name, where, parse_digest(data.decode("utf-8").strip()))
    except (UnicodeDecodeError, RegistryError):
        return Tag(name, where, None, f"the tag file does not hold a digest: {data[:80]!r}")


def _read_referrer(subject: Digest | None, path: str) -> Referrer:
    return parse_referrer(subject, path, read_file(path))


def parse_referrer(subject: Digest | None, where: str, data: bytes | None) -> Referrer:
    """A referrer entry ``.../<subject alg>/<subject hex>/<alg>-<hex>``: the descriptor of its manifest."""
    algorithm, _, hexpart = where.rpartition("/")[2].partition("-")
    digest = digest_or_none(algorithm, hexpart)
    if subject is None or digest is None:
        return Referrer(where, subject, digest, "unexpected entry name")
    try:
        document = json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        document = None
    if not isinstance(document, dict) or document.get("digest") != str(digest):
        return Referrer(where, subject, digest, "the entry is not the descriptor of its manifest")
    return Referrer(where, subject, digest)


def _digest_files(directory: str, unexpected: list[str]) -> Iterator[tuple[Digest, str]]:
    """``<alg>/<hex>`` files under ``directory``."""
    for alg in _entries(directory):
        if not _is_dir(alg):
            unexpected.append(alg.path)
            continue
        for entry in _entries(alg.path):
            digest = digest_or_none(alg.name, entry.name)
            if digest is None or not _is_file(entry):
                unexpected.append(entry.path)
            else:
                yield digest, entry.path


def scan_repository(repository: Repository) -> RepositoryScan:
    """Read one repository's links, revisions, tags and referrer entries."""
    scan = RepositoryScan(repository)
    base = repository.path
    for digest, path in _digest_files(layout.local_path(base, layout.LINKS), scan.unexpected):
        scan.links[digest] = path
    revisions = layout.local_path(base, layout.REVISIONS)
    for digest, path in _digest_files(revisions, scan.unexpected):
        scan.revisions[digest] = _read_revision(digest, path)
    for entry in _entries(layout.local_path(base, layout.TAGS)):
        if _is_file(entry):
            scan.tags.append(read_tag(entry.name, entry.path))
        else:
            scan.unexpected.append(entry.path)
    for alg in _entries(layout.local_path(base, layout.REFERRERS)):
        if not _is_dir(alg):
            scan.unexpected.append(alg.path)
            continue
        for subject_dir in _entries(alg.path):
            if not _is_dir(subject_dir):
                scan.unexpected.append(subject_dir.path)
                continue
            subject = digest_or_none(alg.name, subject_dir.name)
            for entry in _entries(subject_dir.path):
                scan.referrers.append(_read_referrer(subject, entry.path))
    return scan


def _walk_names(directory: str, prefix: str) -> Iterator[str]:
    """Repository names under a store root (as Repositories.catalog finds them)."""
    entries = _entries(directory)
    names = {entry.name for entry in entries}
    if prefix and any(marker in names for marker in layout.MARKERS):
        yield prefix.rstrip("/")
    for entry in entries:
        if not entry.name.startswith("_") and _is_dir(entry):
            yield from _walk_names(entry.path, prefix + entry.name + "/")


@attrs.frozen
class DataDir:
    """A registryd data directory, and how its mirror folders map to upstreams."""

    root: str
    namespaces: dict[str, str] = attrs.field(factory=dict)   # folder under mirror/ -> namespace

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def blob_path(self, digest: Digest) -> str:
        return layout.local_path(self.root, layout.blob_key(digest))

    def namespace(self, folder: str) -> str:
        return layout.folder_namespace(folder, self.namespaces)

    def repositories(self) -> list[Repository]:
        """Local repositories, then mirrored ones, each sorted by name."""
        local_root = layout.local_path(self.root, layout.REPOSITORIES)
        found = [Repository(name, name, None, local_root) for name in sorted(_walk_names(local_root, ""))]
        for folder in _entries(layout.local_path(self.root, layout.MIRROR)):
            if not _is_dir(folder):
                continue
            namespace = self.namespace(folder.name)
            for remote in sorted(_walk_names(folder.path, "")):
                found.append(Repository(f"{namespace}/{remote}", remote, namespace, folder.path))
        return found

    def blob_files(self, unexpected: list[str]) -> Iterator[BlobFile]:
        """Every file in the blob store that is named by a digest (and where it belongs)."""
        for alg in _entries(layout.local_path(self.root, layout.BLOBS)):
            if not _is_dir(alg):
                unexpected.append(alg.path)
                continue
            for prefix in _entries(alg.path):
                if not _is_dir(prefix):
                    unexpected.append(prefix.path)
                    continue
                for entry in _entries(prefix.path):
                    digest = digest_or_none(alg.name, entry.name)
                    if digest is None or digest.hex[:2] != prefix.name or not _is_file(entry):
                        unexpected.append(entry.path)
                        continue
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # removed while we looked (a running server's delete)
                    yield BlobFile(entry.path, digest, size)
