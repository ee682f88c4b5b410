"""``registryd sync``: run a ``[[sync]]`` job now, in a running server or alongside it.

With ``--url`` the server runs it (``POST /admin/sync``, joining a run
already under way) while this polls ``GET /admin/sync`` for the progress
bar; without, this process runs the same code (registryd.sync.job) on the
store the config names, through its own mirror cache. Either way each image
is reported (copied, updated, unchanged, kept, deleted, FAILED), then one
summary line.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

from registryd.admin import EXIT_DAMAGE, EXIT_OK, EXIT_USAGE, AdminError
from registryd.admin.progress import Progress
from registryd.admin.remote import add_remote_arguments, authorization, check_url, post_admin
from registryd.admin.store_access import add_store_arguments, load_admin_config, run_with_store, store_errors_reported
from registryd.units import human_size


DESCRIPTION = """\
Copy the repositories a [[sync]] job of the config names from its upstream
into the mirror cache now, as its schedule would: each selected tag's
manifest is asked for with a HEAD, and only what the store lacks is fetched;
tags that moved upstream are updated, tags gone upstream kept or removed per
the job's mirror_deletes. --dry-run lists what would be copied and copies
nothing.

With --url URL the running server does it (POST /admin/sync, for an admin
user; a run of that job already under way is joined). Without --url this
command does it on the store the config names (-c), alongside a running
server or with none: both write only through the mirror cache's atomic
writes. A progress bar goes to standard error when it is a terminal.

Without --now, the jobs and their last runs are listed."""

EPILOG = """\
exit status:
  0  done: every image is copied (with --dry-run: nothing was changed)
  1  some image or repository failed (each one says why)
  2  bad arguments, or no [[sync]] job of that name
  3  the job could not run: bad config, data directory or bucket, its upstream is offline (jobs are
     paused), --url unreachable or refusing"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--now", metavar="JOB", help="run the [[sync]] job JOB now")
    parser.add_argument("-n", "--dry-run", action="store_true", help="list what would be copied, copy nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON document (for scripts) instead of lines")
    add_remote_arguments(parser, "run the job in (POST /admin/sync, for an admin user)")
    local = parser.add_argument_group("on the store itself (without --url)")
    add_store_arguments(local)  # type: ignore[arg-type]


def _check_arguments(args: argparse.Namespace) -> None:
    if args.url is not None:
        if args.config is not None or args.data_dir is not None:
            raise AdminError("--config and --data-dir are for running here, not with --url", EXIT_USAGE)
        check_url(args.url)
    else:
        given = [f for f, v in (("--user", args.user), ("--password-file", args.password_file),
                                ("--ca-file", args.ca_file), ("--insecure", args.insecure)) if v]
        if given:
            raise AdminError(f"{given[0]} goes with --url", EXIT_USAGE)
    if args.dry_run and args.now is None:
        raise AdminError("--dry-run goes with --now JOB", EXIT_USAGE)


def _get_admin(args: argparse.Namespace, query: dict[str, str]) -> dict[str, Any]:
    """GET /admin/sync of --url (the progress), as --user."""
    headers = {"Accept": "application/json"}
    credentials = authorization(args)
    if credentials is not None:
        headers["Authorization"] = credentials
    context = None
    if args.url.startswith("https://"):
        import ssl
        context = ssl.create_default_context(cafile=args.ca_file)
        if args.insecure:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(f"{check_url(args.url)}/admin/sync?{urllib.parse.urlencode(query)}",
                                     headers=headers)
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        return dict(json.load(response))


def _run_remote(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """POST the run (it answers when the run ends) while the progress is polled beside it."""
    outcome: dict[str, Any] = {}

    def post() -> None:
        try:
            query = [("job", args.now), *([("dry_run", "1")] if args.dry_run else [])]
            outcome["document"] = post_admin(args, "/admin/sync", query, f"the sync of {args.now}")
        except AdminError as e:
            outcome["error"] = e

    worker = threading.Thread(target=post, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if progress.enabled and worker.is_alive() and not args.dry_run:
            try:
                status = _get_admin(args, {"job": args.now}).get("progress")
            except Exception:
                continue    # the progress is only a courtesy: the POST says how it went
            if status:
                progress.items = status["planned"]
                progress.advance(size=status["bytes"] - progress.size_done,
                                 items=status["done"] - progress.items_done)
    if "error" in outcome:
        raise outcome["error"]
    return dict(outcome["document"])


def _run_local(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    from registryd.mirror.cache import MirrorCache
    from registryd.sync.job import SyncRun
    from registryd.sync.report import ImageReport
    from registryd.sync.report import Progress as RunProgress

    config = load_admin_config(args)
    job = next((j for j in config.syncs if j.name == args.now), None)
    if job is None:
        known = ", ".join(j.name for j in config.syncs) or "none"
        raise AdminError(f"the config has no [[sync]] job named {args.now!r} (it has: {known})", EXIT_USAGE)
    upstream = next(u for u in config.upstreams if u.namespace == job.upstream)
    if config.offline or upstream.offline:
        raise AdminError(f"sync job {job.name} is paused: upstream {job.upstream} is offline")

    def tell(state: RunProgress, report: ImageReport | None) -> None:
        progress.items = state.planned
        progress.advance(size=state.bytes - progress.size_done, items=state.done - progress.items_done)

    async def main(store: Any, reactor: Any) -> dict[str, Any]:
        try:
            store.prepare()  # creates missing directories (tmp/ for the fills); never recover(): a server may run
        except OSError as e:
            raise AdminError(f"the data directory {config.data_dir} is not usable: {e.filename}: {e.strerror}") \
                from None
        cache = MirrorCache(store, config, reactor)
        try:
            with store_errors_reported(store.location()):
                run = SyncRun(job, cache, store, reactor, args.dry_run, RunProgress(listeners=[tell]),
                              config.max_manifest_size)
                return (await run.run()).as_json()
        finally:
            await cache.settle_fills(config.shutdown_timeout)
            await cache.close()

    return run_with_store(config, main, allow_empty=True)


def _list_jobs(args: argparse.Namespace) -> int:
    if args.url is not None:
        jobs = _get_admin(args, {})["jobs"]
    else:
        from registryd.sync.state import load_state

        config = load_admin_config(args)

        async def main(store: Any, reactor: Any) -> list[dict[str, Any]]:
            found = []
            for job in config.syncs:
                state = await load_state(store.objects, job.name)
                found.append({"job": job.name, "upstream": job.upstream, "running": state.running_since is not None,
                              "last": state.last.as_json() if state.last else None})
            return found

        jobs = run_with_store(config, main, allow_empty=True)
    if args.json:
        json.dump({"jobs": jobs}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for job in jobs:
        last = job.get("last")
        when = "never ran" if last is None else (
            f"last run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(last['started']))} "
            f"({last['duration_seconds']:.1f}s): {last['images']} images, {human_size(last['bytes'])}, "
            f"{last['errors']} errors")
        print(f"{job['job']} ({job['upstream']}){' running' if job.get('running') else ''}: {when}")
    if not jobs:
        print("no [[sync]] jobs are configured")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    if args.now is None:
        return _list_jobs(args)
    progress = Progress(f"registryd sync {args.now}", 0, 0)
    try:
        document = _run_remote(args, progress) if args.url is not None else _run_local(args, progress)
    finally:
        progress.close()
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from registryd.sync.report import ImageReport

        for entry in document["report"]:
            print(ImageReport(**entry).line())
        verb = "would copy" if args.dry_run else "copied"
        print(f"sync {document['job']}: {verb} {document['images'] if not args.dry_run else _would(document)} "
              f"images ({human_size(document['bytes'])}) from {len(document['repositories'])} repositories in "
              f"{document['duration_seconds']:.1f}s; {document['errors']} errors"
              + (f"; {document['resumed']} done before a restart" if document.get("resumed") else ""))
        for message in document["messages"]:
            print(f"error: {message}", file=sys.stderr)
    return EXIT_DAMAGE if document["errors"] else EXIT_OK


def _would(document: dict[str, Any]) -> int:
    return sum(1 for entry in document["report"] if entry["outcome"] in ("would copy", "would update"))
