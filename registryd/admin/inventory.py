"""``registryd ls``: the repositories of the store, read-only, on either storage driver.

One implementation over the storage interface (registryd.storage.interface),
as the server reads: the data directory, or the S3 bucket of
``[storage] driver = "s3"``. What a listing gives (repository names,
revisions, tags, pull times, blob sizes) costs one listing; only manifest
documents are read one by one, each once however many repositories hold
it, and a bounded number at a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import attrs
from twisted.internet.defer import DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner
from twisted.logger import textFileLogObserver

from registryd.admin import EXIT_OK
from registryd.admin.store_access import add_store_arguments, load_admin_config, run_with_store, store_errors_reported
from registryd.deferreds import bounded_gather
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import parse_manifest
from registryd.storage import layout
from registryd.storage.interface import RepositoryBackend, Store
from registryd.units import human_size

T = TypeVar("T")


DESCRIPTION = """\
List every repository in the store: local (pushed) ones, then the mirrored
ones cached from upstreams (named <upstream namespace>/<repository>, as cri-o
and podman pull them), with their tags, the number of manifests, and their
size: the bytes of the unique blobs their manifests reference plus the
manifests themselves, counted once per repository (a layer shared by two
repositories counts in both). Blobs a mirrored repository has not fetched yet
count for nothing.

The store is the one the config names: the data directory, or with
[storage] driver = "s3" the bucket (and prefix) of [storage.s3], which every
node shares. The last line names it and gives the size of its whole blob
store, referenced or not.

LAST PULL is when a manifest of the repository was last pulled (GET or HEAD
of a manifest, by tag or digest), in UTC; "-" (null in --json) when none has
been pulled since registryd began recording pulls. The server writes pull
times at most once a second per manifest (to the second on S3).

ls only reads the store, so it is safe while the server is stopped or running
alongside it, on this node or on others (a push in progress may or may not be
counted)."""

EPILOG = """\
exit status:
  0  listed
  2  bad arguments
  3  the data directory is missing or cannot be read, the S3 bucket cannot be
     reached or refused, or the config file is bad"""

_TAGS_WIDTH = 60
#: Manifest documents (the API serves none larger than this).
MANIFEST_LIMIT = 64 * 1024 * 1024
#: Store calls in flight at once: S3 rewards a few parallel requests, and
#: Agent's pool does not bound connections by itself.
CONCURRENCY = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (for scripts) instead of a table")


def log_problems_to_stderr() -> None:
    """Warnings and errors (a failed S3 delete, a trash copy left behind) reach the operator; nothing else."""
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def mirror_namespaces(config: Any) -> dict[str, str]:
    """Folder under ``mirror/`` -> the upstream namespace it caches, for the configured upstreams."""
    return layout.namespace_folders(u.namespace for u in config.upstreams)


def namespace_of(folder: str, namespaces: Mapping[str, str]) -> str:
    return layout.folder_namespace(folder, dict(namespaces))


@attrs.frozen
class Repository:
    """One repository: local, or a mirrored upstream repository."""

    name: str               # as a client pulls it: "team/app", "docker.io/library/alpine"
    remote: str             # its name in its backend (the upstream's name for a mirrored one)
    upstream: str | None    # the upstream namespace of a mirrored repository

    @property
    def kind(self) -> str:
        return "local" if self.upstream is None else "mirror"


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


@attrs.frozen
class Inventory:
    """What ``ls`` found: every repository, and the whole blob store."""

    location: str
    driver: str
    summaries: list[RepositorySummary]
    blobs: int
    size: int


class _Survey:
    """Summarizes repositories of one store; store calls go ``CONCURRENCY`` at a time."""

    def __init__(self, store: Store, sizes: dict[Digest, int], clock: IReactorTime) -> None:
        self._store = store
        self._clock = clock
        self._sizes = sizes
        self._limit = DeferredSemaphore(CONCURRENCY)
        #: What each manifest document names, read once for every repository that holds it.
        self._named: dict[Digest, frozenset[Digest]] = {}

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        await self._limit.acquire()
        try:
            return await fn(*args)
        finally:
            # Released on the next turn: a release wakes the next waiter on this
            # stack, and calls that answer at once (no I/O) would chain every
            # waiting repository onto it until it overflows.
            self._clock.callLater(0, self._limit.release)

    async def repositories(self, namespaces: Mapping[str, str]) -> list[tuple[Repository, RepositoryBackend]]:
        """Local repositories, then mirrored ones by upstream folder, each sorted by name."""
        local = self._store.repositories
        found = [(Repository(name, name, None), local) for name in await local.catalog()]
        for folder in await self._store.mirror_folders():
            backend = self._store.mirror_repositories(folder)
            namespace = namespace_of(folder, namespaces)
            found += [(Repository(f"{namespace}/{remote}", remote, namespace), backend)
                      for remote in await backend.catalog()]
        return found

    async def _named_by(self, digest: Digest) -> frozenset[Digest]:
        """The blobs a manifest names (nothing if it is not stored, or is no manifest we parse)."""
        if digest not in self._named:
            content = await self._call(self._store.blobs.read, digest, MANIFEST_LIMIT)
            named: frozenset[Digest] = frozenset()
            if content is not None:
                try:
                    # The document's own mediaType (or shape) says what it is: no read of the revision.
                    named = frozenset(parse_manifest(content, None).blobs)
                except RegistryError:
                    pass
            self._named[digest] = named
        return self._named[digest]

    async def summarize(self, repository: Repository, backend: RepositoryBackend) -> RepositorySummary:
        remote = repository.remote
        # One after the other: repositories are summarized side by side already.
        revisions = await self._call(backend.revisions, remote)
        tags = await self._call(backend.tags, remote)
        pulls = await self._call(backend.pulls, remote)
        digests: set[Digest] = set(revisions)
        for named in await bounded_gather(revisions, self._named_by, None):
            digests.update(named)
        present = [self._sizes[d] for d in digests if d in self._sizes]
        last_pull = max((pulls[d] for d in revisions if d in pulls), default=None)
        return RepositorySummary(repository, sorted(tags or []), len(revisions), sum(present),
                                 len(digests - set(revisions)), len(digests) - len(present), last_pull)


async def take_inventory(store: Store, namespaces: Mapping[str, str], clock: IReactorTime) -> Inventory:
    """Every repository of ``store`` summarized, and its blob store measured (one listing)."""
    sizes = await store.blob_sizes()
    survey = _Survey(store, sizes, clock)
    repositories = await survey.repositories(namespaces)
    summaries = await bounded_gather(repositories, lambda found: survey.summarize(*found), None)
    return Inventory(store.location(), store.driver, summaries, len(sizes), sum(sizes.values()))


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
    config = load_admin_config(args)
    namespaces = mirror_namespaces(config)

    async def main(store: Store, reactor: Any) -> Inventory:
        with store_errors_reported(store.location()):
            return await take_inventory(store, namespaces, reactor)

    log_problems_to_stderr()
    found = run_with_store(config, main)
    summaries = found.summaries
    local = sum(1 for s in summaries if s.repository.kind == "local")
    if args.json:
        document = {
            "data_dir": found.location,     # the name scripts know; s3://bucket/prefix on S3
            "driver": found.driver,
            "repositories": [s.document() for s in summaries],
            "store": {"location": found.location, "blobs": found.blobs, "size": found.size},
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
    print(f"{len(summaries)} {noun} ({local} local, {len(summaries) - local} mirrored) in {found.location}; "
          f"blob store: {found.blobs} blobs, {human_size(found.size)}")
    return EXIT_OK
