"""Per-repository metadata: blob links, manifest revisions, tags, referrers.

``repositories/<name>/`` holds

* ``_blobs/<alg>/<hex>`` — empty file: the blob is visible in this repository;
* ``_manifests/revisions/<alg>/<hex>`` — JSON ``{"mediaType": ...}``: the
  manifest (content in the blob store) belongs to this repository;
* ``_manifests/tags/<tag>`` — the digest the tag points at;
* ``_referrers/<alg>/<subject hex>/<alg>-<hex>`` — the descriptor of a
  manifest whose ``subject`` is that digest;
* ``_pulls/<alg>/<hex>`` — empty file whose mtime is when the manifest was
  last pulled (advisory: written at most once a second, never fsynced).

Name components never start with ``_``, so these never collide with a
nested repository. Methods that write or walk block: run them in the pool.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage import layout
from registryd.storage.files import (
    fsync_dir,
    make_dirs,
    prune_empty_dirs,
    read_small,
    remove_file,
    write_atomic,
)

class RepositoryStore:
    """Reads and writes the metadata of every repository."""

    def __init__(self, root: str, tmp_dir: str) -> None:
        self.root = root
        self._tmp = tmp_dir

    def _path(self, name: str, *parts: str) -> str:
        return os.path.join(self.root, name, *parts)

    def _key(self, name: str, key: str) -> str:
        """The path of ``key`` (registryd.storage.layout) in the repository ``name``."""
        return layout.local_path(self._path(name), key)

    def _blob_link(self, name: str, digest: Digest) -> str:
        return self._key(name, layout.link_key(digest))

    def _revision(self, name: str, digest: Digest) -> str:
        return self._key(name, layout.revision_key(digest))

    def _tag(self, name: str, tag: str) -> str:
        return self._key(name, layout.tag_key(tag))

    def _referrers(self, name: str, subject: Digest) -> str:
        return self._key(name, layout.referrers_key(subject))

    def _pull(self, name: str, digest: Digest) -> str:
        return self._key(name, layout.pull_key(digest))

    # Reads: cheap enough for the reactor (a stat or a small file).

    def exists(self, name: str) -> bool:
        return any(os.path.isdir(self._path(name, marker)) for marker in layout.MARKERS)

    def has_blob(self, name: str, digest: Digest) -> bool:
        return os.path.exists(self._blob_link(name, digest))

    def manifest_media_type(self, name: str, digest: Digest) -> str | None:
        data = read_small(self._revision(name, digest))
        if data is None:
            return None
        return json.loads(data)["mediaType"]

    def resolve_tag(self, name: str, tag: str) -> Digest | None:
        data = read_small(self._tag(name, tag))
        if data is None:
            return None
        return parse_digest(data.decode().strip())

    def tags(self, name: str) -> list[str] | None:
        """Sorted tags, or None when the repository does not exist."""
        if not self.exists(name):
            return None
        try:
            return sorted(os.listdir(self._key(name, layout.TAGS)))
        except FileNotFoundError:
            return []

    # Writes and walks: blocking.

    def link_blob(self, name: str, digest: Digest, durable: bool = True) -> None:
        """Make the blob visible in ``name`` (an empty file: its creation is atomic)."""
        path = self._blob_link(name, digest)
        if os.path.exists(path):
            return
        directory = os.path.dirname(path)
        if durable:
            make_dirs(directory)
        else:
            os.makedirs(directory, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        if durable:
            fsync_dir(directory)

    def tag_mtime(self, name: str, tag: str) -> float:
        """When the tag was last written or confirmed (raises OSError if absent)."""
        return os.stat(self._tag(name, tag)).st_mtime

    def touch_tag(self, name: str, tag: str) -> None:
        try:
            os.utime(self._tag(name, tag))
        except FileNotFoundError:
            pass

    def unlink_blob(self, name: str, digest: Digest) -> bool:
        path = self._blob_link(name, digest)
        removed = remove_file(path)
        if removed:
            fsync_dir(os.path.dirname(path))
        return removed

    def add_manifest(self, name: str, digest: Digest, media_type: str, tags: list[str],
                     referrer: tuple[Digest, dict[str, Any]] | None) -> None:
        """Link a stored manifest, its referrer entry, then its tags.

        The order makes a crash harmless: a tag never points at a manifest
        the repository does not have.
        """
        write_atomic(self._tmp, self._revision(name, digest), json.dumps({"mediaType": media_type}).encode())
        if referrer is not None:
            subject, descriptor = referrer
            path = self._key(name, layout.referrer_key(subject, digest))
            write_atomic(self._tmp, path, json.dumps(descriptor).encode())
        for tag in tags:
            write_atomic(self._tmp, self._tag(name, tag), str(digest).encode())
        make_dirs(self._key(name, layout.TAGS))

    def set_tags(self, name: str, digest: Digest, tags: list[str]) -> None:
        for tag in tags:
            write_atomic(self._tmp, self._tag(name, tag), str(digest).encode())
        make_dirs(self._key(name, layout.TAGS))

    def record_pull(self, name: str, digest: Digest, when: float) -> None:
        """Note that ``digest`` was pulled from ``name`` at ``when`` (if it is still there)."""
        if not os.path.exists(self._revision(name, digest)):
            return
        path = self._pull(name, digest)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.utime(fd, (when, when))
        finally:
            os.close(fd)

    def delete_tag(self, name: str, tag: str) -> bool:
        path = self._tag(name, tag)
        removed = remove_file(path)
        if removed:
            fsync_dir(os.path.dirname(path))
        return removed

    def delete_manifest(self, name: str, digest: Digest, subject: Digest | None) -> bool:
        """Unlink a manifest revision, every tag pointing at it, its referrer entry."""
        path = self._revision(name, digest)
        if not os.path.exists(path):
            return False
        tags_dir = self._key(name, layout.TAGS)
        for tag in self.tags(name) or []:
            if self.resolve_tag(name, tag) == digest:
                remove_file(os.path.join(tags_dir, tag))
        if subject is not None:
            entry = self._key(name, layout.referrer_key(subject, digest))
            if remove_file(entry):
                prune_empty_dirs(os.path.dirname(entry), self._path(name))
        remove_file(path)
        fsync_dir(os.path.dirname(path))
        pull = self._pull(name, digest)
        if remove_file(pull):
            prune_empty_dirs(os.path.dirname(pull), self._path(name))
        if os.path.isdir(tags_dir):
            fsync_dir(tags_dir)
        return True

    def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        """Descriptors of the manifests in ``name`` whose subject is ``subject``."""
        directory = self._referrers(name, subject)
        try:
            entries = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            data = read_small(os.path.join(directory, entry))
            if data is not None:
                found.append(json.loads(data))
        return found

    def revisions(self, name: str) -> dict[Digest, float]:
        """Each manifest revision and its file's mtime (when it was written)."""
        return _stamps(self._key(name, layout.REVISIONS))

    def pulls(self, name: str) -> dict[Digest, float]:
        """Each pull marker's mtime: when its manifest was last pulled."""
        return _stamps(self._key(name, layout.PULLS))

    def catalog(self) -> list[str]:
        """Every repository name, sorted."""
        return sorted(self._walk(self.root, ""))

    def _walk(self, directory: str, prefix: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        names = {entry.name for entry in entries}
        if prefix and any(marker in names for marker in layout.MARKERS):
            yield prefix.rstrip("/")
        for entry in entries:
            if not entry.name.startswith("_") and entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path, prefix + entry.name + "/")



def _stamps(directory: str) -> dict[Digest, float]:
    """``<alg>/<hex>`` files below ``directory`` by digest, with their mtimes.

    A file removed between the listing and its stat is simply gone; a name
    that is no digest is not ours to report.
    """
    found: dict[Digest, float] = {}
    try:
        algorithms = [entry for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return found
    for algorithm in algorithms:
        try:
            entries = list(os.scandir(algorithm.path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                digest = parse_digest(f"{algorithm.name}:{entry.name}")
                if entry.is_file(follow_symlinks=False):
                    found[digest] = entry.stat(follow_symlinks=False).st_mtime
            except (RegistryError, FileNotFoundError):
                continue
    return found
