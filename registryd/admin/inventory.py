"""``registryd ls``: the repositories in a data directory, read-only."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

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
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import parse_manifest
from registryd.storage.files import mtime_of

HELP = "list repositories (local and mirrored), their tags, sizes and manifest counts"

DESCRIPTION = """\
List every repository in the data directory: local (pushed) ones, then the
mirrored ones cached from upstreams (named <upstream namespace>/<repository>,
as cri-o and podman pull them), with their tags, the number of manifests, and
their size: the bytes of the unique blobs their manifests reference plus the
manifests themselves, counted once per repository (a layer shared by two
repositories counts in both). Blobs a mirrored repository has not fetched yet
count for nothing.

LAST PULL is when a manifest of the repository was last pulled (GET or HEAD
of a manifest, by tag or digest), in UTC; "-" (null in --json) when none has
been pulled since registryd began recording pulls. The server writes pull
times at most once a second per manifest.

ls only reads the data directory, so it is safe while the server is stopped
or running alongside it (a push in progress may or may not be counted)."""

EPILOG = """\
exit status:
  0  listed
  2  bad arguments
  3  the data directory is missing or cannot be read, or the config file is bad"""

_TAGS_WIDTH = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of a table")


@attrs.frozen
class RepositorySummary:
    repository: Repository
    tags: list[str]
    manifests: int
    size: int
    blobs: int
    blobs_absent: int
    last_pull: float | None

    def document(self) -> dict[str, Any]:
        repo = self.repository
        return {
            "name": repo.name,
            "kind": repo.kind,
            "upstream": repo.upstream,
            "repository": repo.remote,
            "tags": self.tags,
            "manifests": self.manifests,
            "size": self.size,
            "blobs": self.blobs,
            "blobs_absent": self.blobs_absent,
            "last_pull": _iso(self.last_pull),
        }


def summarize(data: DataDir, repository: Repository) -> RepositorySummary:
    scan = scan_repository(repository)
    digests: set[Digest] = set(scan.revisions)
    for revision in scan.revisions.values():
        if revision.media_type is None:
            continue
        content = read_file(data.blob_path(revision.digest))
        if content is None:
            continue
        try:
            digests.update(parse_manifest(content, revision.media_type).blobs)
        except RegistryError:
            continue
    size = absent = 0
    for digest in digests:
        try:
            size += os.stat(data.blob_path(digest)).st_size
        except (FileNotFoundError, NotADirectoryError):
            absent += 1
    tags = sorted(tag.name for tag in scan.tags)
    blobs = len(digests - set(scan.revisions))
    pulls = [mtime_of(repository.pull_path(digest)) for digest in scan.revisions]
    last_pull = max((t for t in pulls if t is not None), default=None)
    return RepositorySummary(repository, tags, len(scan.revisions), size, blobs, absent, last_pull)


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _tag_column(tags: list[str]) -> str:
    if not tags:
        return "-"
    shown: list[str] = []
    for i, tag in enumerate(tags):
        rest = len(tags) - i - 1
        candidate = ", ".join(shown + [tag])
        suffix = f", ... (+{rest})" if rest else ""
        if shown and len(candidate) + len(suffix) > _TAGS_WIDTH:
            return ", ".join(shown) + f", ... (+{len(tags) - len(shown)})"
        shown.append(tag)
    return ", ".join(shown)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {2, 3}  # MANIFESTS, SIZE
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    data = open_data_dir(args)
    store_blobs = store_size = 0
    with os_errors_reported():
        summaries = [summarize(data, repository) for repository in data.repositories()]
        for blob in data.blob_files([]):
            store_blobs += 1
            store_size += blob.size
    local = sum(1 for s in summaries if s.repository.kind == "local")
    if args.json:
        document = {
            "data_dir": data.root,
            "repositories": [s.document() for s in summaries],
            "store": {"blobs": store_blobs, "size": store_size},
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if summaries:
        rows = [["REPOSITORY", "TYPE", "MANIFESTS", "SIZE", "LAST PULL", "TAGS"]]
        for s in summaries:
            kind = "local" if s.repository.upstream is None else f"mirror:{s.repository.upstream}"
            rows.append([s.repository.name, kind, str(s.manifests), human_size(s.size),
                         _iso(s.last_pull) or "-",
                         _tag_column(s.tags)])
        print(_table(rows))
        print()
    noun = "repository" if len(summaries) == 1 else "repositories"
    print(f"{len(summaries)} {noun} ({local} local, {len(summaries) - local} mirrored) in {data.root}; "
          f"blob store: {store_blobs} blobs, {human_size(store_size)}")
    return EXIT_OK
