"""The repositories the UI lists: names, per-repository summaries and per-upstream totals.

Read through the Store protocol only. Nothing here walks the store for a
page view of tens of thousands of repositories:

* the names (local, then each upstream's cached ones) are one catalog walk
  per source (on a data directory, one trip to the IO pool), kept for
  ``names_ttl`` seconds or until a push shows a new name;
* a summary (tags, size, last push, last pull) is made only for the rows a
  page shows, and kept until ``summary_ttl`` passes or the repository
  changes (``changed``, fed by every finished request);
* the mirror's totals (images and bytes cached per upstream) are one pass
  over the cached repositories, in the background, at most every
  ``totals_ttl`` seconds; a page shows the last one with its age.

Manifest documents and blob sizes are content-addressed, so what they say
is remembered across summaries (bounded).
"""
from __future__ import annotations

import bisect
import collections
import time
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import attrs
from twisted.logger import Logger

from registryd.deferreds import Coalescer, bounded_gather
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import parse_manifest
from registryd.names import check_name
from registryd.storage.interface import RepositoryBackend, Store
from registryd.web.ui.images import MANIFEST_LIMIT

log = Logger()
T = TypeVar("T")

NAMES_TTL = 30.0
SUMMARY_TTL = 60.0
TOTALS_TTL = 300.0
#: Store calls one summary pass keeps in flight.
CONCURRENCY = 8
#: Summaries, manifest contents and blob sizes remembered.
KEPT = 50_000


@attrs.frozen
class RepoRef:
    """One repository as a client pulls it: local, or ``<namespace>/<name upstream>``."""

    name: str
    remote: str
    upstream: str | None

    @property
    def kind(self) -> str:
        return "local" if self.upstream is None else "mirror"


@attrs.frozen
class RepoSummary:
    ref: RepoRef
    tags: int
    manifests: int
    size: int
    last_push: float | None      # the newest manifest revision (for a mirror: when it was cached)
    last_pull: float | None

    def document(self) -> dict[str, Any]:
        return {"name": self.ref.name, "kind": self.ref.kind, "upstream": self.ref.upstream,
                "tags": self.tags, "manifests": self.manifests, "size": self.size,
                "last_push": iso(self.last_push), "last_pull": iso(self.last_pull)}


@attrs.frozen
class MirrorTotals:
    repositories: int
    images: int          # manifests cached
    bytes: int           # unique blobs (manifests included) cached for this upstream

    def document(self) -> dict[str, Any]:
        return {"repositories": self.repositories, "images": self.images, "bytes": self.bytes}


@attrs.frozen
class TotalsReport:
    measured_at: float
    upstreams: dict[str, MirrorTotals]


def iso(when: float | None) -> str | None:
    return None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class _Bounded(collections.OrderedDict[Any, Any]):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class Inventory:
    """Names, summaries and mirror totals of one store, as cheap as a page view needs."""

    def __init__(self, store: Store, namespaces: Iterable[str], clock: Callable[[], float],
                 names_ttl: float = NAMES_TTL, summary_ttl: float = SUMMARY_TTL,
                 totals_ttl: float = TOTALS_TTL, pace: Callable[[], Any] | None = None) -> None:
        self.store = store
        # Longest first: a name is matched against the most specific namespace.
        self.namespaces = sorted(namespaces, key=len, reverse=True)
        self._clock = clock
        self.names_ttl, self.summary_ttl, self.totals_ttl = names_ttl, summary_ttl, totals_ttl
        self._pace = pace       # a Pacer factory: long loops give the reactor back (registryd.web.ui.pacing)
        self._names: dict[str | None, tuple[float, list[RepoRef], frozenset[str]]] = {}
        self._summaries: _Bounded = _Bounded(KEPT)
        self._named: _Bounded = _Bounded(KEPT)     # manifest digest -> the blobs it names
        self._sizes: _Bounded = _Bounded(KEPT)     # blob digest -> size
        self._epoch = 0
        self._changed: dict[str, int] = {}          # repository name -> epoch of its last change
        self._upstream_changed: dict[str | None, int] = {}
        self._walks: Coalescer[list[RepoRef]] = Coalescer()
        self._totals: TotalsReport | None = None
        self._measuring: Coalescer[TotalsReport] = Coalescer()

    # --- which repository a name is -----------------------------------------------------

    def backend(self, ref: RepoRef) -> RepositoryBackend:
        return self.store.repositories if ref.upstream is None else self.store.mirror_repositories(ref.upstream)

    def ref(self, name: str) -> RepoRef | None:
        """The repository a UI name means (a mirrored one by its namespace), None for a bad name."""
        for namespace in self.namespaces:
            if name.startswith(namespace + "/"):
                remote = name[len(namespace) + 1:]
                return RepoRef(name, remote, namespace) if _valid(remote) else None
        return RepoRef(name, name, None) if _valid(name) else None

    # --- names ---------------------------------------------------------------------------

    async def names(self) -> list[RepoRef]:
        """Every repository, local first, then each upstream's, each sorted by name."""
        found: list[RepoRef] = []
        for source in [None, *sorted(self.namespaces)]:
            found += await self._source_names(source)
        return found

    async def _source_names(self, source: str | None) -> list[RepoRef]:
        """The cached names; past their time the walk starts anew behind the page, which
        shows what was known (only the very first view of a source waits for a walk)."""
        cached = self._names.get(source)
        if cached is not None:
            if self._clock() - cached[0] >= self.names_ttl:
                refresh = self._walks.run(source or "", lambda: self._walk(source))
                refresh.addErrback(lambda failure: log.failure("listing repositories for the UI failed", failure))
            return cached[1]
        return await self._walks.run(source or "", lambda: self._walk(source))

    async def _walk(self, source: str | None) -> list[RepoRef]:
        started = self._clock()
        if source is None:
            refs = [RepoRef(name, name, None) for name in await self.store.repositories.catalog()]
        else:
            remotes = await self.store.mirror_repositories(source).catalog()
            refs = [RepoRef(f"{source}/{remote}", remote, source) for remote in remotes]
        self._names[source] = (started, refs, frozenset(ref.name for ref in refs))
        return refs

    # --- changes -------------------------------------------------------------------------

    def changed(self, name: str | None, upstream: str | None = None) -> None:
        """A request changed a repository: a local ``name`` (pushed, deleted), or anything
        cached from ``upstream`` (a fill). Its summary is made again at the next view."""
        self._epoch += 1
        if upstream is not None:
            self._upstream_changed[upstream] = self._epoch
            cached = self._names.get(upstream)
            if cached is not None:      # listed again at the next view (behind it)
                self._names[upstream] = (float("-inf"), cached[1], cached[2])
            return
        if name is None:
            return
        self._changed[name] = self._epoch
        if len(self._changed) > KEPT:
            self._changed.clear()
            self._upstream_changed[None] = self._epoch
        cached = self._names.get(None)
        if cached is not None and name not in cached[2] and _valid(name):
            # A new repository shows at once, without a walk of all the others.
            refs = list(cached[1])
            bisect.insort(refs, RepoRef(name, name, None), key=lambda ref: ref.name)
            self._names[None] = (cached[0], refs, cached[2] | {name})

    # --- summaries -----------------------------------------------------------------------

    async def summaries(self, refs: list[RepoRef]) -> list[RepoSummary]:
        return await bounded_gather(refs, self.summary, CONCURRENCY)

    async def summary(self, ref: RepoRef) -> RepoSummary:
        cached = self._summaries.get(ref.name)
        if cached is not None:
            at, epoch, summary = cached
            fresh = self._clock() - at < self.summary_ttl
            unchanged = epoch >= self._changed.get(ref.name, 0) and epoch >= self._upstream_changed.get(
                ref.upstream, 0)
            if fresh and unchanged:
                return summary  # type: ignore[no-any-return]
        epoch, at = self._epoch, self._clock()
        summary = await self._summarize(ref)
        self._summaries.put(ref.name, (at, epoch, summary))
        return summary

    async def _summarize(self, ref: RepoRef) -> RepoSummary:
        backend = self.backend(ref)
        revisions = await backend.revisions(ref.remote)
        tags = await backend.tags(ref.remote)
        pulls = await backend.pulls(ref.remote)
        digests: set[Digest] = set(revisions)
        for named in await bounded_gather(list(revisions), self._paced(self._named_by), CONCURRENCY):
            digests.update(named)
        sizes = await bounded_gather(sorted(digests), self._paced(self._size), CONCURRENCY)
        last_pull = max((pulls[d] for d in revisions if d in pulls), default=None)
        return RepoSummary(ref, len(tags or []), len(revisions), sum(s for s in sizes if s is not None),
                           max(revisions.values(), default=None), last_pull)

    def _paced(self, work: Callable[[Digest], Awaitable[T]]) -> Callable[[Digest], Awaitable[T]]:
        """``work``, giving the reactor back now and then over a long run of cheap calls."""
        if self._pace is None:
            return work
        pacer = self._pace()

        async def paced(digest: Digest) -> T:
            await pacer.step()
            return await work(digest)
        return paced

    async def _named_by(self, digest: Digest) -> frozenset[Digest]:
        """The blobs a manifest names (nothing if it is not stored or not a manifest)."""
        known = self._named.get(digest)
        if known is not None:
            return known  # type: ignore[no-any-return]
        content = await self.store.blobs.read(digest, MANIFEST_LIMIT)
        if content is None:
            return frozenset()
        try:
            named = frozenset(parse_manifest(content, None).blobs)
        except RegistryError:
            named = frozenset()
        self._named.put(digest, named)
        return named

    async def _size(self, digest: Digest) -> int | None:
        known = self._sizes.get(digest)
        if known is not None:
            return known  # type: ignore[no-any-return]
        size = await self.store.blobs.size(digest)
        if size is not None:
            self._sizes.put(digest, size)
        return size

    # --- the mirror's totals ------------------------------------------------------------

    def totals(self) -> TotalsReport | None:
        """The last measure (None before the first); starts the next when it is old."""
        report = self._totals
        if report is None or self._clock() - report.measured_at >= self.totals_ttl:
            d = self._measuring.run("totals", self._measure)
            d.addErrback(lambda failure: log.failure("measuring the mirror cache for the UI failed", failure))
        return report

    async def measure_totals(self) -> TotalsReport:
        """A measure now (or the one running)."""
        return await self._measuring.run("totals", self._measure)

    async def _measure(self) -> TotalsReport:
        started = self._clock()
        upstreams: dict[str, MirrorTotals] = {}
        for namespace in sorted(self.namespaces):
            refs = await self._walk(namespace)
            backend = self.store.mirror_repositories(namespace)
            digests: set[Digest] = set()
            images = 0

            async def one(ref: RepoRef) -> None:
                nonlocal images
                revisions = await backend.revisions(ref.remote)
                images += len(revisions)
                digests.update(revisions)
                for named in await bounded_gather(list(revisions), self._paced(self._named_by), CONCURRENCY):
                    digests.update(named)

            await bounded_gather(refs, one, CONCURRENCY)
            sizes = await bounded_gather(sorted(digests), self._paced(self._size), CONCURRENCY)
            upstreams[namespace] = MirrorTotals(len(refs), images, sum(s for s in sizes if s is not None))
        self._totals = TotalsReport(started, upstreams)
        return self._totals


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except RegistryError:
        return False
    return True
