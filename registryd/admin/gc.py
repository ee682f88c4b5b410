"""``registryd gc [--dry-run]``: mark and sweep the blob store.

Mark: every manifest revision of every repository, local and mirrored, keeps
its own content and every digest its document names (config, layers, child
manifests, subject, anything in a descriptor). Tags and referrer entries keep
the digests they name too. Sweep: a blob nothing keeps goes only when its file
and every repository link to it are older than ``--delay``; then links to
blobs that are gone, and the directories this emptied.

``uploads/``, ``tmp/`` and ``quarantine/`` are never looked at.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Iterator

import attrs

from registryd.admin import EXIT_OK
from registryd.admin.layout import (
    DataDir,
    Repository,
    add_store_arguments,
    open_data_dir,
    os_errors_reported,
    read_file,
    scan_repository,
)
from registryd.admin.progress import human_size
from registryd.digest import Digest, parse_digest
from registryd.errors import RegistryError
from registryd.storage.files import mtime_of, prune_empty_dirs, unlink_durably

HELP = "remove blobs no manifest references (mark and sweep); --dry-run only reports"

DESCRIPTION = """\
Garbage-collect the blob store. Mark: every manifest revision of every
repository, local and mirrored, keeps its own content, its config and layers,
its child manifests (an image index), and anything else its descriptors name;
so do tags and referrer entries. Sweep: a blob that nothing keeps is removed
when its file, and every repository link to it, are older than --delay
(default 3600 seconds); then repository blob links (_blobs/...) to blobs that
are gone, and the directories this leaves empty. Each removed blob is one line
with its size; the last line gives the bytes reclaimed. uploads/, tmp/ and
quarantine/ are never touched. Deletions are unlinks, each made durable
(the directory is fsynced).

gc works with the server stopped, and safely alongside a running server: a
blob pushed or fetched moments ago, whose manifest has not arrived yet, is
younger than --delay and stays, and a manifest committed before the sweep
starts keeps its blobs. Keep --delay well above the longest push (do not use
--delay 0 while the server runs). One case remains: a manifest pushed during
the sweep that reuses a blob nothing referenced before (an image re-pushed
right after its manifests were deleted) can lose that blob; `registryd fsck`
reports it and pushing the image again restores it.

To reclaim the space of mirrored images, first remove their tags and
manifests with `registryd prune`, then run gc."""

EPILOG = """\
exit status:
  0  done (with --dry-run: nothing was removed)
  2  bad arguments
  3  gc could not be done: missing or unreadable data directory, bad config
     file, permission denied, an unlink that failed"""

DEFAULT_DELAY = 3600.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def parse_duration(text: str) -> float:
    """``90`` or ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds (argparse type)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: a number with an optional unit s, m, h, d or w (like 90s, 12h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="report what would be removed, remove nothing")
    parser.add_argument("--delay", type=parse_duration, default=DEFAULT_DELAY, metavar="SECONDS",
                        help="only remove blobs (and links) untouched for this long (default 3600; "
                             "units s, m, h, d are accepted too)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")


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


class Collector:
    def __init__(self, data: DataDir, delay: float, dry_run: bool, echo: bool) -> None:
        self.data = data
        self.delay = delay
        self.dry_run = dry_run
        self.echo = echo
        self.result = Collection()
        self.verb = "would remove" if dry_run else "removed"

    def _say(self, line: str) -> None:
        if self.echo:
            print(line, flush=True)

    def run(self) -> Collection:
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
        cutoff = time.time() - self.delay
        gone: set[Digest] = set()
        for blob in candidates:
            if blob.digest in marker.keep:
                self.result.kept += 1
                continue
            times = [mtime_of(blob.path)] + [mtime_of(path) for _, path in marker.links.get(blob.digest, [])]
            if times[0] is None:
                gone.add(blob.digest)  # removed meanwhile
                continue
            if any(t is not None and t > cutoff for t in times):
                self.result.young += 1
                continue
            if not self.dry_run:
                if not unlink_durably(blob.path):
                    gone.add(blob.digest)
                    continue
                self._prune(os.path.dirname(blob.path), os.path.join(self.data.root, "blobs", blob.digest.algorithm))
            gone.add(blob.digest)
            self.result.blobs.append({"digest": str(blob.digest), "size": blob.size,
                                      "path": self.data.rel(blob.path)})
            self._say(f"{self.verb} blob {blob.digest} ({human_size(blob.size)}, {blob.size} bytes)")
        self._sweep_links(gone, cutoff)
        return self.result

    def _sweep_links(self, gone: set[Digest], cutoff: float) -> None:
        for digest, places in sorted(self.marker.links.items(), key=lambda item: str(item[0])):
            if digest not in gone and os.path.isfile(self.data.blob_path(digest)):
                continue
            for repository, path in places:
                mtime = mtime_of(path)
                if mtime is None or (mtime > cutoff and digest not in gone):
                    continue  # gone, or just made (its blob may be on its way)
                if not self.dry_run:
                    if os.path.isfile(self.data.blob_path(digest)) or not unlink_durably(path):
                        continue  # the blob came back meanwhile
                    self._prune(os.path.dirname(path), os.path.join(repository.path, "_blobs"))
                self.result.links.append({"repository": repository.name, "digest": str(digest),
                                          "path": self.data.rel(path)})
                self._say(f"{self.verb} link {repository.name} -> {digest} (its blob is gone)")

    def _prune(self, directory: str, stop: str) -> None:
        if os.path.isdir(directory):
            prune_empty_dirs(directory, stop)
            if not os.path.isdir(directory):
                self.result.directories += 1


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run(args: argparse.Namespace) -> int:
    data = open_data_dir(args)
    collector = Collector(data, args.delay, args.dry_run, echo=not args.json)
    with os_errors_reported():
        result = collector.run()
    marker = collector.marker
    if args.json:
        document = {
            "data_dir": data.root,
            "dry_run": args.dry_run,
            "delay": args.delay,
            "removed_blobs": result.blobs,
            "removed_links": result.links,
            "removed_directories": result.directories,
            "bytes_reclaimed": result.reclaimed,
            "kept_referenced": result.kept,
            "kept_young": result.young,
            "repositories": marker.repositories,
            "manifests": marker.manifests,
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    verb = "would be removed" if args.dry_run else "removed"
    reclaim = "would be reclaimed" if args.dry_run else "reclaimed"
    young = (f"; {_plural(result.young, 'unreferenced blob')} younger than {args.delay:g}s kept"
             if result.young else "")
    print(f"{_plural(len(result.blobs), 'blob')} {verb}, {human_size(result.reclaimed)} ({result.reclaimed} bytes) "
          f"{reclaim}; {_plural(len(result.links), 'link')} {verb}; {_plural(result.kept, 'blob')} in use by "
          f"{_plural(marker.manifests, 'manifest')} in "
          f"{_plural(marker.repositories, 'repository').replace('repositorys', 'repositories')}{young}")
    return EXIT_OK
