"""``registryd gc [--dry-run]``: mark and sweep the blob store.

One pass of registryd.upkeep.collector on the configured store, the data
directory or an S3 bucket: the collector every server runs, which is safe
alongside them.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet.defer import Deferred

from registryd.admin import EXIT_OK, AdminError
from registryd.admin.inventory import log_problems_to_stderr
from registryd.admin.store_access import add_store_arguments, store_errors_reported
from registryd import units
from registryd.units import human_size
from registryd.admin.remote import add_remote_arguments, post_admin
from registryd.admin.store_access import load_admin_config, run_with_store
from registryd.config import Config
from registryd.storage.layout import BLOBS
from registryd.storage.interface import Store
from registryd.upkeep.collector import Collector, referenced_digests

__all__ = ["parse_duration", "referenced_digests"]


DESCRIPTION = """\
Garbage-collect the blob store. Mark: every manifest revision of every
repository, local and mirrored, keeps its own content, its config and layers,
its child manifests (an image index), and anything else its descriptors name;
so do tags and referrer entries. Sweep: a blob that nothing keeps is removed
when it, and every repository link to it, are older than --delay (default
3600 seconds); then repository blob links (_blobs/...) to blobs that are
gone, and the directories this leaves empty. Each removed blob is one line
with its size; the last line gives the bytes reclaimed. uploads/, tmp/ and
quarantine/ are never touched.

A blob to remove is first moved to trash/ (a rename on the filesystem, a
copy and a delete in a bucket); then every repository is marked again, and
a blob that a manifest committed meanwhile names, or that got a new link,
is put back; only the rest is purged. A push
that reuses a blob while it is in trash/ fails cleanly
(MANIFEST_BLOB_UNKNOWN), and pushing again uploads it. An interrupted run
(Ctrl-C) puts back every blob it removed before it exits; what a crashed
one left in trash/ a later run restores or purges after an hour. --json
also gives "restored".

Where it runs (the same collection everywhere, safe alongside running
servers and other collections):

  --url URL   one pass inside a running server (POST /admin/gc, for an
              admin user). The server also knows which blobs its uploads,
              pushes and mirror fills are using at that moment and keeps
              them. It collects by itself every [gc] interval too.
  -d/-c       on the data directory, the server stopped or alongside a
              running server: a blob pushed or fetched moments ago, whose
              manifest has not arrived yet, is younger than --delay and
              stays. Keep --delay well above the longest push (never
              --delay 0 while a server runs).
  -c          with [storage] driver = "s3" in the config: one pass on the
              bucket, the same collection every node runs on its own.
              Times are the bucket's LastModified (to the second).

To reclaim the space of mirrored images, first remove their tags and
manifests with `registryd prune`, then run gc."""

EPILOG = """\
exit status:
  0  done (with --dry-run: nothing was removed)
  2  bad arguments
  3  gc could not be done: missing or unreadable data directory, the S3
     bucket cannot be reached or refused, bad config file, permission
     denied, an unlink that failed; with --url: the server cannot be
     reached or refused (not an admin, wrong password)
  130  interrupted (on S3: after putting back what the run had moved)"""

DEFAULT_DELAY = 3600.0

def parse_duration(text: str) -> float:
    """``90`` or ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds (argparse type; registryd.units' grammar)."""
    try:
        return units.parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="report what would be removed, remove nothing")
    parser.add_argument("--delay", type=parse_duration, default=DEFAULT_DELAY, metavar="SECONDS",
                        help="only remove blobs (and links) untouched for this long (default 3600; "
                             "units s, m, h, d are accepted too)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")
    add_remote_arguments(parser, "collect in (POST /admin/gc, for an admin user)")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _run_remote(args: argparse.Namespace) -> dict[str, Any]:
    """Ask the server for one pass (POST /admin/gc): its BlobGuard makes it safe under load."""
    query = [("delay", f"{args.delay:g}"), *([("dry_run", "1")] if args.dry_run else [])]
    return post_admin(args, "/admin/gc", query, "the collection")


async def collect_in_command(collector: Collector, reactor: Any) -> dict[str, Any] | None:
    """One run of ``collector``: its report, or None when an interrupt (SIGINT, SIGTERM) cancelled it.

    A cancelled run puts back every blob it moved to ``trash/`` before it
    ends, and shutdown waits for that (on a data directory, the pool's
    thread finishes the run): without it a blob that is still referenced
    would stay missing until a later run finds the leftover.
    """
    run = Deferred.fromCoroutine(collector.collect())
    ended: Deferred[None] = Deferred()
    interrupted: list[bool] = []

    def interrupt() -> Deferred[None]:
        interrupted.append(True)
        run.cancel()
        return ended

    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    try:
        await run
    except BaseException:
        if not interrupted:
            raise
    finally:
        if interrupted:
            ended.callback(None)
        else:
            reactor.removeSystemEventTrigger(trigger)
    return None if interrupted else collector.report()


def _run_on_store(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    """One pass of the collector on the configured store, as a server runs it."""
    async def main(store: Store, reactor: Any) -> dict[str, Any] | None:
        if store.self_collecting:
            raise AdminError(f"{store.location()} collects its own garbage (containerd: from its images, "
                             "leases and gc.ref labels); registryd gc has nothing to do there")
        with store_errors_reported(store.location()):
            document = await collect_in_command(Collector(store.objects, args.delay, args.dry_run), reactor)
            if document is not None and not args.dry_run:
                # The blob folders the run emptied (a server's runs leave them: they are reused).
                document["removed_directories"] += await store.objects.tidy(BLOBS)
            return document

    log_problems_to_stderr()
    document = run_with_store(config, main)
    assert document is not None  # an interrupted run raised AdminError("interrupted")
    return document


def _echo(document: dict[str, Any], dry_run: bool) -> None:
    """A line for each blob and link removed, from a report."""
    verb = "would remove" if dry_run else "removed"
    for blob in document["removed_blobs"]:
        print(f"{verb} blob {blob['digest']} ({human_size(blob['size'])}, {blob['size']} bytes)")
    for link in document["removed_links"]:
        print(f"{verb} link {link['repository']} -> {link['digest']} (its blob is gone)")


def run(args: argparse.Namespace) -> int:
    if args.url is not None:
        document = _run_remote(args)
        if not args.json:
            _echo(document, args.dry_run)
    else:
        document = _run_on_store(args, load_admin_config(args))
        if not args.json:
            _echo(document, args.dry_run)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    verb = "would be removed" if args.dry_run else "removed"
    reclaim = "would be reclaimed" if args.dry_run else "reclaimed"
    blobs, links, reclaimed = document["removed_blobs"], document["removed_links"], document["bytes_reclaimed"]
    young = (f"; {_plural(document['kept_young'], 'unreferenced blob')} younger than {args.delay:g}s kept"
             if document["kept_young"] else "")
    # Blobs moved to trash/ and put back (named again meanwhile, or a crashed run's leftovers).
    restored = f"; {_plural(document['restored'], 'blob')} put back from trash/" if document.get("restored") else ""
    print(f"{_plural(len(blobs), 'blob')} {verb}, {human_size(reclaimed)} ({reclaimed} bytes) "
          f"{reclaim}; {_plural(len(links), 'link')} {verb}; {_plural(document['kept_referenced'], 'blob')} "
          f"in use by {_plural(document['manifests'], 'manifest')} in "
          f"{_plural(document['repositories'], 'repository').replace('repositorys', 'repositories')}{young}"
          f"{restored}")
    return EXIT_OK
