"""``registryd retention``: apply the config's ``[[retention]]`` rules to local repositories now.

One implementation for every way it runs: registryd.upkeep.retention, over
the storage interface. With ``--url`` a server applies its own rules
(``POST /admin/retention``) and this prints its report; without, this
process applies the rules of ``--config`` to the store the config names,
the data directory or the S3 bucket, beside a running server or not.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from registryd.admin import EXIT_OK, EXIT_USAGE, AdminError
from registryd.admin.inventory import log_problems_to_stderr
from registryd.admin.remote import add_remote_arguments, post_admin
from registryd.admin.store_access import add_store_arguments, load_admin_config, run_with_store, store_errors_reported
from registryd.storage.interface import Store


DESCRIPTION = """\
Apply the config's [[retention]] rules to the local (pushed) repositories
they match; the server also applies each rule every `interval` seconds.
In a matching repository a tag or manifest stays when any matching rule
keeps it:

  tags         those matching keep_tags, and the keep_latest newest of the
               others by push time (when the tag was last written);
               without keep_latest, all of them
  manifests    those a kept tag points at, with everything they need: the
               manifests they name (an index's children, a referrer's
               subject) and their referrers (signatures, SBOMs,
               attestations), recursively;
               untagged manifests until they are older than untagged_after
  the rest     removed: tags, then manifests (with their referrer entries);
               a referrer goes with its subject

Tags of the tag schema (sha256-<hex>, cosign's sha256-<hex>.sig, .att,
.sbom) belong to the manifest they name: they stay and go with it and
count toward no keep_latest. Mirrored repositories are never touched.

Blobs are not removed by retention: `registryd gc` (or the server's own
[gc] interval) reclaims those no manifest references any more.

Without --url, the rules of --config are applied to the store that config
names: the data directory, or with [storage] driver = "s3" the bucket every
node shares, with the servers stopped or beside them (through the storage
interface, as the server would: a tag pushed meanwhile, and what it needs,
stays). With --url URL, the server applies its own rules (POST
/admin/retention, for an admin user). Removals are listed per repository."""

EPILOG = """\
exit status:
  0  done (with --dry-run: nothing was removed)
  2  bad arguments; the config (or the --url server's) has no [[retention]] rules
  3  retention could not be done: missing or unreadable data directory, the
     S3 bucket cannot be reached or refused, bad config file, permission
     denied, an I/O error; with --url: the server cannot be reached or
     refused (not an admin, wrong password)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="report what would be removed, remove nothing")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of lines")
    add_remote_arguments(parser, "apply its own rules in (POST /admin/retention, for an admin user)")


def _run_remote(args: argparse.Namespace) -> dict[str, Any]:
    return post_admin(args, "/admin/retention", [("dry_run", "1")] if args.dry_run else [], "the retention run")


def _run_local(args: argparse.Namespace) -> dict[str, Any]:
    """Apply the config's rules to its store in this process, as a server does."""
    from registryd.upkeep.retention import Retention

    config = load_admin_config(args)
    if not config.retention:
        where = f"the config file {args.config}" if args.config else "the config (no --config given)"
        raise AdminError(f"{where} has no [[retention]] rules", EXIT_USAGE)

    async def main(store: Store, reactor: Any) -> dict[str, Any]:
        with store_errors_reported(store.location()):
            retention = Retention(store.repositories, store.blobs, config.retention, store.location(),
                                  config.max_manifest_size)
            return await retention.run(args.dry_run)

    log_problems_to_stderr()
    return run_with_store(config, main)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe(entry: dict[str, Any]) -> str:
    """One removal as a line says it (without the verb), from its report entry."""
    if entry["kind"] == "tag":
        digest = entry.get("digest")
        return f"tag {entry['repository']}:{entry['tag']}" + (f" -> {digest}" if digest else "")
    return f"manifest {entry['repository']}@{entry['digest']} ({entry['reason']})"


def print_report(document: dict[str, Any], dry_run: bool) -> None:
    """Each removal, then a line per matching repository and the totals."""
    verb = "would remove" if dry_run else "removed"
    for entry in document["removed"]:
        print(f"{verb} {describe(entry)}")
    passive = "would be removed" if dry_run else "removed"
    for repository in document["repositories"]:
        print(f"{repository['repository']}: {_plural(repository['tags_removed'], 'tag')} and "
              f"{_plural(repository['manifests_removed'], 'manifest')} {passive}; "
              f"{_plural(repository['tags_kept'], 'tag')} and {_plural(repository['manifests_kept'], 'manifest')} "
              f"kept")
    counts, matched = document["counts"], document["repositories_matched"]
    touched = len({entry["repository"] for entry in document["removed"]})
    print(f"{_plural(counts['tag'], 'tag')} and {_plural(counts['manifest'], 'manifest')} {passive} in "
          f"{touched} of {matched} matching {'repository' if matched == 1 else 'repositories'}")
    if counts["manifest"]:
        print("blobs are not removed by retention: `registryd gc` (or the server's [gc] interval) reclaims "
              "those no longer referenced")


def run(args: argparse.Namespace) -> int:
    document = _run_remote(args) if args.url is not None else _run_local(args)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(document, args.dry_run)
    return EXIT_OK
