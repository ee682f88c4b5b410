"""Mark and sweep of the blob store, shared by ``registryd gc`` and the server.

Mark: every manifest revision of every repository, local and mirrored, keeps
its own content and every digest its document names (config, layers, child
manifests, subject, anything in a descriptor). Tags and referrer entries keep
the digests they name too. Sweep: a blob nothing keeps goes only when its
file, every repository link to it and its last claim (see
``registryd.storage.guard``) are older than the delay; then links to blobs
that are gone, and the directories this emptied.

Run inside the server, deletions go through the store's BlobGuard, so a blob
an upload, a mount, a manifest or a mirror fill claimed during the run stays.
``uploads/``, ``tmp/`` and ``quarantine/`` are never looked at.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator

import attrs

from registryd.storage.scan import DataDir, Repository, read_file, scan_repository
from registryd.units import human_size
from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage.files import mtime_of, prune_empty_dirs, unlink_durably
from registryd.storage.guard import BlobGuard


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


@attrs.define
class Marker:
    """What the repositories keep; ``update`` re-reads only revisions not seen yet."""

    data: DataDir
    keep: set[Digest] = attrs.field(factory=set)
    links: dict[Digest, list[tuple[Repository, str]]] = attrs.field(factory=dict)
    seen: set[str] = attrs.field(factory=set)
    manifests: int = 0
    repositories: int = 0

    def update(self) -> None:
        self.links = {}
        self.repositories = 0
        for repository in self.data.repositories():
            self.repositories += 1
            scan = scan_repository(repository)
            for digest, path in scan.links.items():
                self.links.setdefault(digest, []).append((repository, path))
            for tag in scan.tags:
                if tag.digest is not None:
                    self.keep.add(tag.digest)
            for referrer in scan.referrers:
                self.keep.update(d for d in (referrer.subject, referrer.digest) if d is not None)
            for digest, revision in scan.revisions.items():
                self.keep.add(digest)
                if revision.path in self.seen:
                    continue
                content = read_file(self.data.blob_path(digest))
                if content is None:
                    continue  # not cached yet, or damaged: fsck's business
                self.seen.add(revision.path)
                self.manifests += 1
                self.keep.update(referenced_digests(content))




@attrs.define
class Collection:
    """One run's outcome."""

    blobs: list[dict[str, Any]] = attrs.field(factory=list)
    links: list[dict[str, Any]] = attrs.field(factory=list)
    young: int = 0
    kept: int = 0
    directories: int = 0

    @property
    def reclaimed(self) -> int:
        return sum(b["size"] for b in self.blobs)


def collection_report(where: str, dry_run: bool, delay: float, result: Collection, marker: Any) -> dict[str, Any]:
    """A collection as one JSON document, the same for both drivers (``where``: the store)."""
    return {
        "data_dir": where,
        "dry_run": dry_run,
        "delay": delay,
        "removed_blobs": result.blobs,
        "removed_links": result.links,
        "removed_directories": result.directories,
        "bytes_reclaimed": result.reclaimed,
        "kept_referenced": result.kept,
        "kept_young": result.young,
        "repositories": marker.repositories,
        "manifests": marker.manifests,
    }


class Collector:
    """One mark and sweep; ``guard`` is the server's BlobGuard when run inside it."""

    def __init__(self, data: DataDir, delay: float, dry_run: bool, echo: bool,
                 guard: BlobGuard | None = None, clock: Callable[[], float] = time.time) -> None:
        self.data = data
        self.delay = delay
        self.dry_run = dry_run
        self.echo = echo
        self.guard = guard or BlobGuard()
        self._clock = clock
        self.result = Collection()
        self.verb = "would remove" if dry_run else "removed"

    def _say(self, line: str) -> None:
        if self.echo:
            print(line, flush=True)

    def _delete(self, digest: Digest, path: str) -> bool:
        """Unlink ``path`` unless ``digest`` was claimed since the run began."""
        return self.guard.delete_unless_claimed(digest, self.started, lambda: unlink_durably(path))

    def run(self) -> Collection:
        self.started = self._clock()
        # Blobs are listed before marking: a blob committed later is no
        # candidate, and a manifest committed before the mark is seen by it.
        blobs = list(self.data.blob_files([]))
        marker = Marker(self.data)
        marker.update()
        self.marker = marker
        candidates = [b for b in blobs if b.digest not in marker.keep]
        self.result.kept = len(blobs) - len(candidates)
        if candidates:
            marker.update()  # manifests committed during the first pass
        cutoff = self.started - self.delay
        gone: set[Digest] = set()
        for blob in candidates:
            if blob.digest in marker.keep:
                self.result.kept += 1
                continue
            times = [mtime_of(blob.path), self.guard.last_claim(blob.digest)]
            times += [mtime_of(path) for _, path in marker.links.get(blob.digest, [])]
            if times[0] is None:
                gone.add(blob.digest)  # removed meanwhile
                continue
            if any(t is not None and t > cutoff for t in times):
                self.result.young += 1
                continue
            if not self.dry_run:
                if not self._delete(blob.digest, blob.path):
                    if os.path.exists(blob.path):
                        self.result.young += 1  # claimed meanwhile: in use
                    else:
                        gone.add(blob.digest)
                    continue
                self._prune(os.path.dirname(blob.path), os.path.join(self.data.root, "blobs", blob.digest.algorithm))
            gone.add(blob.digest)
            self.result.blobs.append({"digest": str(blob.digest), "size": blob.size,
                                      "path": self.data.rel(blob.path)})
            self._say(f"{self.verb} blob {blob.digest} ({human_size(blob.size)}, {blob.size} bytes)")
        self._sweep_links(gone, cutoff)
        return self.result

    def report(self) -> dict[str, Any]:
        """The run as one JSON document (``registryd gc --json`` and ``POST /admin/gc``)."""
        return collection_report(self.data.root, self.dry_run, self.delay, self.result, self.marker)

    def _sweep_links(self, gone: set[Digest], cutoff: float) -> None:
        for digest, places in sorted(self.marker.links.items(), key=lambda item: str(item[0])):
            if digest not in gone and os.path.isfile(self.data.blob_path(digest)):
                continue
            for repository, path in places:
                mtime = mtime_of(path)
                if mtime is None or (mtime > cutoff and digest not in gone):
                    continue  # gone, or just made (its blob may be on its way)
                if not self.dry_run:
                    if os.path.isfile(self.data.blob_path(digest)) or not self._delete(digest, path):
                        continue  # the blob came back, or was claimed, meanwhile
                    self._prune(os.path.dirname(path), os.path.join(repository.path, "_blobs"))
                self.result.links.append({"repository": repository.name, "digest": str(digest),
                                          "path": self.data.rel(path)})
                self._say(f"{self.verb} link {repository.name} -> {digest} (its blob is gone)")

    def _prune(self, directory: str, stop: str) -> None:
        if os.path.isdir(directory):
            prune_empty_dirs(directory, stop)
            if not os.path.isdir(directory):
                self.result.directories += 1
