"""``registryd prune``: drop cached tags and manifests of mirrored repositories.

Only the mirror cache (``mirror/<namespace>/...``) is touched, and only its
tags and manifest revisions (with the referrer entries and pull times of
removed manifests); blobs stay for ``registryd gc``, which removes them once
nothing references them.

One implementation for every way it runs: registryd.upkeep.online_prune,
over the storage interface. With ``--url`` a server runs it
(``POST /admin/prune``) and this prints its report; without, this process
runs it on the store the config names, the data directory or the S3 bucket.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from registryd.admin import EXIT_USAGE, EXIT_OK, AdminError
from registryd.admin.gc import parse_duration
from registryd.admin.inventory import log_problems_to_stderr, mirror_namespaces, namespace_of
from registryd.admin.remote import add_remote_arguments, post_admin
from registryd.admin.store_access import add_store_arguments, load_admin_config, run_with_store, store_errors_reported
from registryd.globs import Glob
from registryd.storage.interface import Store


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
it (docker.io/library/alpine), as [[access]] rules match names: * matches
within one path component, ** as a whole component across components
(docker.io/** is every repository of docker.io); give it several times to
match any of them. Without --pattern, every mirrored repository; without
--older-than or --unused-for, whatever its age (at least one of the three
is required).

Blobs are not removed by prune: layers may be shared with content that is
kept. Run `registryd gc` afterwards to reclaim the space of blobs nothing
references any more.

Without --url, prune works on the store the config names: the data
directory, or with [storage] driver = "s3" the bucket every node shares. With
--url URL, it works inside a running server (POST /admin/prune, for an admin
user). Both run the same code, on either driver, with the servers stopped or
alongside a running server: prune only removes mirror tags and manifest
revisions (through the storage interface, as the server would), re-checks
each one's age just before, and a pull that needs them fetches them again
from the upstream. The removals are listed once the prune is done."""

EPILOG = """\
exit status:
  0  done (with --dry-run: nothing was removed)
  2  bad arguments (a bad duration or glob, or none of --older-than, --unused-for, --pattern)
  3  prune could not be done: missing or unreadable data directory, the S3
     bucket cannot be reached or refused, bad config file, permission denied,
     an unlink that failed; with --url: the server cannot be reached or
     refused (not an admin, wrong password)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--older-than", type=parse_duration, metavar="DURATION",
                        help="only content cached longer ago than this: 90s, 30m, 12h, 7d, 2w")
    parser.add_argument("--unused-for", type=parse_duration, metavar="DURATION",
                        help="only content neither cached nor pulled for this long (last pull times as "
                             "`registryd ls` shows them)")
    parser.add_argument("-p", "--pattern", action="append", type=parse_pattern, metavar="GLOB", default=[],
                        help="only repositories matching <namespace>/<repository> "
                             "(* within a component, ** across); repeatable")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="report what would be removed, remove nothing")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")
    add_remote_arguments(parser, "prune in (POST /admin/prune, for an admin user; either storage driver)")


def parse_pattern(text: str) -> str:
    """A ``--pattern`` that is a glob of registryd.globs (argparse type)."""
    try:
        Glob.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text[:100]!r} is not a glob of <namespace>/<repository>: it {e}") from None
    return text


def describe(entry: dict[str, Any]) -> str:
    """One removal as a line says it (without the verb), from its report entry."""
    if entry["kind"] == "tag":
        digest = entry.get("digest")
        return f"tag {entry['repository']}:{entry['tag']}" + (f" -> {digest}" if digest else "")
    if entry["kind"] == "referrer":
        return f"referrer entry {entry['repository']}: {entry['digest']} -> {entry['subject']}"
    return f"manifest {entry['repository']}@{entry['digest']}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _run_remote(args: argparse.Namespace) -> dict[str, Any]:
    """Ask the server to prune (POST /admin/prune): it reaches the mirror cache on either driver."""
    query = [*([("older_than", repr(args.older_than))] if args.older_than is not None else []),
             *([("unused_for", repr(args.unused_for))] if args.unused_for is not None else []),
             *(("pattern", pattern) for pattern in args.pattern),
             *([("dry_run", "1")] if args.dry_run else [])]
    return post_admin(args, "/admin/prune", query, "the prune")


#: Why a store that collects its own garbage is never pruned: its images are the node's too.
NOT_PRUNED = ("{location} holds the node's own images (the kubelet's too) and collects its own garbage: "
              "registryd prunes nothing there")


def _run_local(args: argparse.Namespace) -> dict[str, Any]:
    """Prune the configured store in this process, as a server does for POST /admin/prune."""
    from registryd.upkeep.online_prune import MIN_MANIFEST_LIMIT, OnlinePruner, PruneSelection
    from registryd.upkeep.pins import read_pins

    config = load_admin_config(args)
    namespaces = mirror_namespaces(config)
    selection = PruneSelection(args.older_than, args.unused_for, tuple(args.pattern), args.dry_run)
    # Nothing larger than max_manifest_size was cached; a document cut short would hide an index's children.
    limit = max(config.max_manifest_size, MIN_MANIFEST_LIMIT)

    async def main(store: Store, reactor: Any) -> dict[str, Any]:
        if store.self_collecting:
            raise AdminError(NOT_PRUNED.format(location=store.location()))
        with store_errors_reported(store.location()):
            # Every upstream folder in the store, configured or not (as `registryd ls` lists them).
            mirrors = {namespace_of(folder, namespaces): store.mirror_repositories(folder)
                       for folder in await store.mirror_folders()}
            pinned = await read_pins(store.objects, [job.name for job in config.syncs])
            return await OnlinePruner(mirrors, store.blobs, store.location(), limit, pinned=pinned).run(selection)

    log_problems_to_stderr()
    return run_with_store(config, main)


def run(args: argparse.Namespace) -> int:
    if args.older_than is None and args.unused_for is None and not args.pattern:
        raise AdminError("give --older-than DURATION, --unused-for DURATION, --pattern GLOB or several "
                         "(--pattern '**' selects the whole mirror cache)", EXIT_USAGE)
    document = _run_remote(args) if args.url is not None else _run_local(args)
    if not args.json:
        verb = "would remove" if args.dry_run else "removed"
        for entry in document["removed"]:
            print(f"{verb} {describe(entry)}")
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
