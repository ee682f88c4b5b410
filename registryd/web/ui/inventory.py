"""The repositories the UI lists: names, per-repository summaries and per-upstream totals.

Read through the Store protocol only. Nothing here walks the store for a
page view of tens of thousands of repositories:

* the names (local, then each upstream's cached ones) are one catalog walk
  per source (on a data directory, one trip to the maintenance pool), begun
  at start-up (``warm``) and kept for ``names_ttl`` seconds, a push adding
  its new name at once; a page waits for a walk still running at most
  ``names_wait`` seconds, then shows what is known and says it is counting;
* a summary (tags, size, last push, last pull) is made only for the rows a
  page shows, and kept until ``summary_ttl`` passes or the repository
  changes (``changed``, fed by every finished request); on a data directory
  a page's are made together in one trip to the IO pool (registryd.web.ui.offload);
* the mirror's totals (images and bytes cached per upstream) are one pass
  over the cached repositories (one trip to the IO pool per upstream on a
  data directory), in the background, at most every ``totals_ttl`` seconds;
  a page shows the last one with its age.

Manifest documents and blob sizes are content-addressed, so what they say
is remembered across summaries (bounded).
"""
from __future__ import annotations

import bisect
import collections
import time
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from registryd.deferreds import Coalescer, bounded_gather
from registryd.digest import Digest
from registryd.errors import RegistryError
from registryd.manifests import parse_manifest
from registryd.names import check_name
from registryd.storage.interface import RepositoryBackend, Store
from registryd.storage.outage import outage_reason
from registryd.web.ui.images import MANIFEST_LIMIT
from registryd.web.ui.offload import Offload

log = Logger()
T = TypeVar("T")

NAMES_TTL = 30.0
#: How long a page waits for a first walk of the names still running before it shows the rest.
NAMES_WAIT = 0.1
SUMMARY_TTL = 60.0
TOTALS_TTL = 300.0
#: Store calls one summary pass keeps in flight.
CONCURRENCY = 8
#: Summaries, manifest contents and blob sizes remembered.
KEPT = 50_000


#: The time of a listing a fill made out of date (listed again at the next view).
CHANGED = float("-inf")


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
                 totals_ttl: float = TOTALS_TTL, pace: Callable[[], Any] | None = None,
                 offload: Offload | None = None, reactor: Any = None, names_wait: float = NAMES_WAIT) -> None:
        self.store = store
        # Longest first: a name is matched against the most specific namespace.
        self.namespaces = sorted(namespaces, key=len, reverse=True)
        self._clock = clock
        self.names_ttl, self.summary_ttl, self.totals_ttl = names_ttl, summary_ttl, totals_ttl
        self._pace = pace       # a Pacer factory: long loops give the reactor back (registryd.web.ui.pacing)
        self._offload = offload
        self._reactor = reactor     # for ``names_wait`` (without one a page waits for the walk)
        self.names_wait = names_wait
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

    def warm(self) -> None:
        """Begin every source's walk now (at start-up), so a first page view need not wait for it."""
        for source in [None, *sorted(self.namespaces)]:
            if source not in self._names:
                self._walk_behind(source)

    def counting(self) -> bool:
        """Whether some source's first walk is still running (its names are not listed yet)."""
        return any(source not in self._names for source in [None, *self.namespaces])

    async def names(self) -> list[RepoRef]:
        """Every repository, local first, then each upstream's, each sorted by name
        (without a source whose first walk outlasts ``names_wait``: see ``counting``)."""
        found: list[RepoRef] = []
        for source in [None, *sorted(self.namespaces)]:
            found += await self._source_names(source)
        return found

    def _walk_behind(self, source: str | None) -> None:
        refresh = self._walks.run(source or "", lambda: self._walk(source))
        refresh.addErrback(_walk_failed)

    async def _source_names(self, source: str | None) -> list[RepoRef]:
        """The cached names; past their time the walk starts anew behind the page, which
        shows what was known. Before a source's first walk ends, a page waits for it at most
        ``names_wait`` seconds."""
        cached = self._names.get(source)
        if cached is not None and cached[0] != CHANGED:
            if self._clock() - cached[0] >= self.names_ttl:
                self._walk_behind(source)
            return cached[1]
        # Never listed, or a fill cached something new: worth a short wait.
        waiting = self._walks.run(source or "", lambda: self._walk(source))
        if self._reactor is None:
            return await waiting
        self._walk_behind(source)       # carries on (and logs a failure) if this page stops waiting
        waiting.addTimeout(self.names_wait, self._reactor)
        try:
            return await waiting
        except defer.TimeoutError:
            return [] if cached is None else cached[1]

    async def _walk(self, source: str | None) -> list[RepoRef]:
        started, epoch = self._clock(), self._epoch
        if source is None:
            refs = [RepoRef(name, name, None) for name in await self.store.repositories.catalog()]
        else:
            remotes = await self.store.mirror_repositories(source).catalog()
            refs = [RepoRef(f"{source}/{remote}", remote, source) for remote in remotes]
        names = frozenset(ref.name for ref in refs)
        if source is None:
            # Pushed while the walk ran (it may have passed their folder): listed too.
            late = sorted(name for name, when in self._changed.items()
                          if when > epoch and name not in names and _valid(name))
            if late:
                refs = sorted([*refs, *(RepoRef(name, name, None) for name in late)], key=lambda ref: ref.name)
                names = names | frozenset(late)
        self._names[source] = (started, refs, names)
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
                self._names[upstream] = (CHANGED, cached[1], cached[2])
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
        """The rows' summaries: those not kept made together, in one trip to the IO pool where
        the store has a blocking twin, else a few at a time."""
        kept = {ref.name: self._kept(ref) for ref in refs}
        missing = [ref for ref in refs if kept[ref.name] is None]
        epoch, at = self._epoch, self._clock()
        for summary in await self._summarize(missing):
            self._summaries.put(summary.ref.name, (at, epoch, summary))
            kept[summary.ref.name] = summary
        return [summary for summary in (kept[ref.name] for ref in refs) if summary is not None]

    async def summary(self, ref: RepoRef) -> RepoSummary:
        return (await self.summaries([ref]))[0]

    def _kept(self, ref: RepoRef) -> RepoSummary | None:
        """The summary kept, while fresh and nothing changed the repository since."""
        cached = self._summaries.get(ref.name)
        if cached is None:
            return None
        at, epoch, summary = cached
        fresh = self._clock() - at < self.summary_ttl
        unchanged = epoch >= self._changed.get(ref.name, 0) and epoch >= self._upstream_changed.get(ref.upstream, 0)
        return summary if fresh and unchanged else None  # type: ignore[no-any-return]

    async def _summarize(self, refs: list[RepoRef]) -> list[RepoSummary]:
        offload = self._offload
        if not refs:
            return []
        twins = [offload.backend(self.backend(ref)) for ref in refs] if offload is not None else []
        if offload is None or any(twin is None for twin in twins):
            return await bounded_gather(refs, lambda ref: self._summarize_over(
                ref, self.backend(ref), self._paced(self._named_by), self._paced(self._size)), CONCURRENCY)
        blobs = offload.blobs
        named: dict[Digest, frozenset[Digest]] = {}
        sizes: dict[Digest, int] = {}

        async def all_of_them() -> list[RepoSummary]:
            return [await self._summarize_over(ref, twin, lambda d: self._named_by(d, blobs, named),
                                               lambda d: self._size(d, blobs, sizes))
                    for ref, twin in zip(refs, twins) if twin is not None]

        summaries = await offload.run(all_of_them)
        for digest, blobs_named in named.items():
            self._named.put(digest, blobs_named)
        for digest, size in sizes.items():
            self._sizes.put(digest, size)
        return summaries

    async def _summarize_over(self, ref: RepoRef, backend: RepositoryBackend,
                              named_by: Callable[[Digest], Awaitable[frozenset[Digest]]],
                              size_of: Callable[[Digest], Awaitable[int | None]]) -> RepoSummary:
        revisions = await backend.revisions(ref.remote)
        tags = await backend.tags(ref.remote)
        pulls = await backend.pulls(ref.remote)
        digests: set[Digest] = set(revisions)
        for named in await bounded_gather(list(revisions), named_by, CONCURRENCY):
            digests.update(named)
        sizes = await bounded_gather(list(digests), size_of, CONCURRENCY)   # any order (sorting Digests is slow)
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

    async def _named_by(self, digest: Digest, blobs: Any = None,
                        learned: dict[Digest, frozenset[Digest]] | None = None) -> frozenset[Digest]:
        """The blobs a manifest names (nothing if it is not stored or not a manifest).
        In a worker thread (``blobs``: the twin's) what is read goes to ``learned``, for the
        reactor to keep."""
        known = self._named.get(digest)
        if known is not None:
            return known  # type: ignore[no-any-return]
        content = await (blobs or self.store.blobs).read(digest, MANIFEST_LIMIT)
        if content is None:
            return frozenset()
        try:
            named = frozenset(parse_manifest(content, None).blobs)
        except RegistryError:
            named = frozenset()
        if learned is None:
            self._named.put(digest, named)
        else:
            learned[digest] = named
        return named

    async def _size(self, digest: Digest, blobs: Any = None, learned: dict[Digest, int] | None = None) -> int | None:
        known = self._sizes.get(digest)
        if known is not None:
            return known  # type: ignore[no-any-return]
        size = await (blobs or self.store.blobs).size(digest)
        if size is not None:
            if learned is None:
                self._sizes.put(digest, size)
            else:
                learned[digest] = size
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
        offload = self._offload
        for namespace in sorted(self.namespaces):
            refs = await self._walks.run(namespace, lambda: self._walk(namespace))
            backend = self.store.mirror_repositories(namespace)
            twin = offload.backend(backend) if offload is not None else None
            if offload is None or twin is None:
                upstreams[namespace] = await self._measure_over(refs, backend, self._paced(self._named_by),
                                                                self._paced(self._size))
                continue
            # One trip to the IO pool per upstream, however many repositories it cached.
            blobs = offload.blobs
            named: dict[Digest, frozenset[Digest]] = {}
            sizes: dict[Digest, int] = {}
            upstreams[namespace] = await offload.run(lambda: self._measure_over(
                refs, twin, lambda d: self._named_by(d, blobs, named), lambda d: self._size(d, blobs, sizes)))
            for digest, blobs_named in named.items():
                self._named.put(digest, blobs_named)
            for digest, size in sizes.items():
                self._sizes.put(digest, size)
        self._totals = TotalsReport(started, upstreams)
        return self._totals

    @staticmethod
    async def _measure_over(refs: list[RepoRef], backend: RepositoryBackend,
                            named_by: Callable[[Digest], Awaitable[frozenset[Digest]]],
                            size_of: Callable[[Digest], Awaitable[int | None]]) -> MirrorTotals:
        digests: set[Digest] = set()
        images = 0

        async def one(ref: RepoRef) -> None:
            nonlocal images
            revisions = await backend.revisions(ref.remote)
            images += len(revisions)
            digests.update(revisions)
            for named in await bounded_gather(list(revisions), named_by, CONCURRENCY):
                digests.update(named)

        await bounded_gather(refs, one, CONCURRENCY)
        sizes = await bounded_gather(list(digests), size_of, CONCURRENCY)   # any order (sorting Digests is slow)
        return MirrorTotals(len(refs), images, sum(s for s in sizes if s is not None))


def _walk_failed(failure: Failure) -> None:
    """A store that cannot answer: one line (the next view walks again); anything else: logged whole."""
    reason = outage_reason(failure.value)
    if reason is None:
        log.failure("listing repositories for the UI failed", failure)
    else:
        log.warn("listing repositories for the UI failed: {reason}", reason=reason)


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except RegistryError:
        return False
    return True
