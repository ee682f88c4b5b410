"""``registryd prune``: drop cached tags and manifests of mirrored repositories.

Only ``mirror/<namespace>/...`` is touched, and only its tag and manifest
revision files (with the referrer entries of removed manifests); blobs stay
for ``registryd gc``, which removes them once nothing references them.
With ``--url`` the server does the same (registryd.upkeep.online_prune), on
either storage driver, and this prints its report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from registryd.admin import EXIT_USAGE, EXIT_OK, AdminError
from registryd.admin.gc import parse_duration, referenced_digests
from registryd.admin.remote import add_remote_arguments, post_admin
from registryd.admin.layout import (
    DataDir,
    Repository,
    RepositoryScan,
    add_store_arguments,
    open_data_dir,
    os_errors_reported,
    read_file,
    read_tag,
    scan_repository,
)
from registryd.digest import Digest
from registryd.storage.files import mtime_of, prune_empty_dirs, unlink_durably

HELP = "remove cached tags and manifests of mirrored repositories (--older-than, --unused-for, --pattern)"

DESCRIPTION = """\
Remove tags and manifest revisions that the mirror cache holds for upstream
repositories (mirror/<namespace>/...), in the repositories matching
--pattern, whose cache time is older than --older-than, or that nobody pulled
for --unused-for. A tag's cache time is when the upstream last confirmed it; a
manifest's is when it was cached; a pull of a manifest (by tag or digest,
GET or HEAD) counts as a use of it and of the tags pointing at it. A manifest
that a kept tag points at, or that a kept index lists, is kept.
Local (pushed) repositories are never touched. Removed content is fetched
again from the upstream on the next pull.

--pattern GLOB is matched against <namespace>/<repository>, as clients pull
it (docker.io/library/alpine): * matches within one path component, ** across
components; give it several times to match any of them. Without --pattern,
every mirrored repository; without --older-than or --unused-for, whatever
its age (at least one of the three is required).

Blobs are not removed by prune: layers may be shared with content that is
kept. Run `registryd gc` afterwards to reclaim the space of blobs nothing
references any more.

With --url, prune works inside a running server (POST /admin/prune, for an
admin user), on either storage driver: the way to prune a mirror cache in a
shared S3 bucket. Without --url, it works on the data directory (filesystem
driver), with the server stopped or alongside a running server. Either way it
only removes mirror tags and manifest revisions, re-checks each one's age just
before, and a pull that needs them fetches them again from the upstream."""

EPILOG = """\
exit status:
  0  done (with --dry-run: nothing was removed)
  2  bad arguments (a bad duration, or none of --older-than, --unused-for, --pattern)
  3  prune could not be done: missing or unreadable data directory, bad
     config file, permission denied, an unlink that failed; with --url: the
     server cannot be reached or refused (not an admin, wrong password)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                        help="only content cached longer ago than this: 90s, 30m, 12h, 7d, 2w")
    parser.add_argument("--unused-for", type=parse_duration, metavar="DURATION",
                        help="only content neither cached nor pulled for this long (last pull times as "
                             "`registryd ls` shows them)")
    parser.add_argument("-p", "--pattern", action="append", metavar="GLOB", default=[],
                        help="only repositories matching <namespace>/<repository> "
                             "(* within a component, ** across); repeatable")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="report what would be removed, remove nothing")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")
    add_remote_arguments(parser, "prune in (POST /admin/prune, for an admin user; either storage driver)")


def compile_glob(pattern: str) -> re.Pattern[str]:
    """``*`` within one component, ``**`` across (``a/**/b`` also matches ``a/b``)."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def describe(entry: dict[str, Any]) -> str:
    """One removal as a line says it (without the verb), from its report entry."""
    if entry["kind"] == "tag":
        digest = entry.get("digest")
        return f"tag {entry['repository']}:{entry['tag']}" + (f" -> {digest}" if digest else "")
    if entry["kind"] == "referrer":
        return f"referrer entry {entry['repository']}: {entry['digest']} -> {entry['subject']}"
    return f"manifest {entry['repository']}@{entry['digest']}"


class Pruner:
    def __init__(self, data: DataDir, cutoff: float, dry_run: bool, echo: bool,
                 unused_cutoff: float | None = None) -> None:
        self.data = data
        self.cutoff = cutoff
        self.unused_cutoff = unused_cutoff
        self.dry_run = dry_run
        self.echo = echo
        self.verb = "would remove" if dry_run else "removed"
        self.removed: list[dict[str, Any]] = []

    def _old(self, repository: Repository, path: str, digest: Digest | None) -> bool:
        """Cached before the --older-than cutoff, and neither cached nor pulled since --unused-for."""
        mtime = mtime_of(path)
        if mtime is None or mtime >= self.cutoff:
            return False
        if self.unused_cutoff is None:
            return True
        pulled = mtime_of(repository.pull_path(digest)) if digest is not None else None
        return max(mtime, pulled or 0.0) < self.unused_cutoff

    def _report(self, kind: str, scan: RepositoryScan, path: str, digest: Digest | None,
                tag: str | None = None, subject: Digest | None = None) -> None:
        entry: dict[str, Any] = {"kind": kind, "repository": scan.repository.name,
                                 "path": self.data.rel(path)}
        if tag is not None:
            entry["tag"] = tag
        if digest is not None:
            entry["digest"] = str(digest)
        if subject is not None:
            entry["subject"] = str(subject)
        self.removed.append(entry)
        if self.echo:
            print(f"{self.verb} {describe(entry)}", flush=True)

    def prune(self, scan: RepositoryScan) -> None:
        repo = scan.repository
        kept_tags: list[Digest] = []
        for tag in scan.tags:
            if not self._old(repo, tag.path, tag.digest):
                if tag.digest is not None:
                    kept_tags.append(tag.digest)
                continue
            # Re-checked: the upstream may have confirmed it since the scan.
            if self.dry_run or (self._old(repo, tag.path, tag.digest) and unlink_durably(tag.path)):
                self._report("tag", scan, tag.path, tag.digest, tag.name)
        # Tags written meanwhile (not in the scan) keep their manifests too.
        tags_dir = os.path.join(repo.path, "_manifests", "tags")
        if not self.dry_run and os.path.isdir(tags_dir):
            for name in os.listdir(tags_dir):
                digest = read_tag(name, os.path.join(tags_dir, name)).digest
                if digest is not None:
                    kept_tags.append(digest)

        keep: set[Digest] = set()
        todo = kept_tags + [d for d, r in scan.revisions.items() if not self._old(repo, r.path, d)]
        while todo:
            digest = todo.pop()
            if digest in keep or digest not in scan.revisions:
                continue
            keep.add(digest)
            content = read_file(self.data.blob_path(digest))
            if content is not None:
                todo.extend(referenced_digests(content))
        doomed = {d: r for d, r in scan.revisions.items() if d not in keep}

        for referrer in scan.referrers:
            if referrer.digest in doomed:
                if self.dry_run or unlink_durably(referrer.path):
                    if not self.dry_run:
                        prune_empty_dirs(os.path.dirname(referrer.path), os.path.join(repo.path, "_referrers"))
                    self._report("referrer", scan, referrer.path, referrer.digest, subject=referrer.subject)
        for digest, revision in sorted(doomed.items(), key=lambda item: str(item[0])):
            if self.dry_run or (self._old(repo, revision.path, digest) and unlink_durably(revision.path)):
                if not self.dry_run:
                    prune_empty_dirs(os.path.dirname(revision.path),
                                     os.path.join(repo.path, "_manifests", "revisions"))
                    pull = repo.pull_path(digest)
                    if unlink_durably(pull):
                        prune_empty_dirs(os.path.dirname(pull), os.path.join(repo.path, "_pulls"))
                self._report("manifest", scan, revision.path, digest)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _run_remote(args: argparse.Namespace) -> dict[str, Any]:
    """Ask the server to prune (POST /admin/prune): it reaches the mirror cache on either driver."""
    query = [*([("older_than", repr(args.older_than))] if args.older_than is not None else []),
             *([("unused_for", repr(args.unused_for))] if args.unused_for is not None else []),
             *(("pattern", pattern) for pattern in args.pattern),
             *([("dry_run", "1")] if args.dry_run else [])]
    return post_admin(args, "/admin/prune", query, "the prune")


def _run_local(args: argparse.Namespace) -> dict[str, Any]:
    data = open_data_dir(args)
    patterns = [compile_glob(p) for p in args.pattern]
    cutoff = time.time() - args.older_than if args.older_than is not None else float("inf")
    unused_cutoff = time.time() - args.unused_for if args.unused_for is not None else None
    pruner = Pruner(data, cutoff, args.dry_run, echo=not args.json, unused_cutoff=unused_cutoff)
    matched = 0
    with os_errors_reported():
        for repository in data.repositories():
            if repository.upstream is None:
                continue  # local content is never pruned
            if patterns and not any(p.fullmatch(repository.name) for p in patterns):
                continue
            matched += 1
            pruner.prune(scan_repository(repository))
    kinds = {kind: sum(1 for r in pruner.removed if r["kind"] == kind) for kind in ("tag", "manifest", "referrer")}
    return {"data_dir": data.root, "dry_run": args.dry_run, "older_than": args.older_than,
            "unused_for": args.unused_for, "patterns": args.pattern, "repositories_matched": matched,
            "removed": pruner.removed, "counts": kinds}


def run(args: argparse.Namespace) -> int:
    if args.older_than is None and args.unused_for is None and not args.pattern:
        raise AdminError("give --older-than DURATION, --unused-for DURATION, --pattern GLOB or several "
                         "(--pattern '**' selects the whole mirror cache)", EXIT_USAGE)
    if args.url is not None:
        document = _run_remote(args)
        if not args.json:
            verb = "would remove" if args.dry_run else "removed"
            for entry in document["removed"]:
                print(f"{verb} {describe(entry)}")
    else:
        document = _run_local(args)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    kinds, matched, removed = document["counts"], document["repositories_matched"], document["removed"]
    pruned = len({entry["repository"] for entry in removed})
    verb = "would be removed" if args.dry_run else "removed"
    print(f"{_plural(kinds['tag'], 'tag')}, {_plural(kinds['manifest'], 'manifest')} and "
          f"{_plural(kinds['referrer'], 'referrer entry').replace('entrys', 'entries')} {verb} in "
          f"{pruned} of {matched} matching mirrored "
          f"{'repository' if matched == 1 else 'repositories'}")
    if removed:
        print("blobs are not removed by prune: run `registryd gc` to reclaim the space of those no longer "
              "referenced")
    return EXIT_OK
