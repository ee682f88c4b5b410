"""Online garbage collection and store surveys, on timers, while the server serves.

Both go over the whole store, one at a time (a DeferredLock): in the IO pool
on a data directory, over the network on a shared S3 bucket, where every
node runs them (registryd.upkeep.collector and registryd.upkeep.eviction
say why overlapping runs are safe). A pass that fails is logged and
counted; the timers go on, so the next pass runs as planned.

A survey sets the store-size metrics and, over ``[mirror] max_size``,
evicts from the mirror cache, on whichever driver the store has. Where the
eviction leaves the freed blobs to a collection (a shared bucket), one
runs right after (``collect``, with ``[gc] delay``).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from registryd.config import Config
from registryd.metrics import Metrics
from registryd.storage import Store, layout
from registryd.storage.outage import STORE_ERRORS, outage_reason
from registryd.upkeep.pins import read_pins
from registryd.upkeep.retention_runs import RetentionRuns
from registryd.upkeep.survey import Documents, Survey, take_survey

if TYPE_CHECKING:
    # Imported where a collection or an eviction runs: a worker that never runs one never loads them.
    from registryd.upkeep.collector import Collection
    from registryd.upkeep.eviction import Eviction

log = Logger()

@attrs.define
class GCReport:
    """One online collection, as /admin/gc and the log report it."""

    started: float
    duration: float
    collection: Collection
    document: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {**self.document, "started": self.started, "duration_seconds": round(self.duration, 3)}


@attrs.frozen
class StoreSize:
    """What the last survey measured (the survey itself is dropped: it grows with the store)."""

    taken_at: float
    blobs: int
    total_bytes: int
    local_bytes: int
    mirror_bytes: int


class Upkeep:
    """Runs collections every ``[gc] interval`` and surveys every ``[server] usage_interval``."""

    def __init__(self, store: Store, config: Config, metrics: Metrics, reactor: Any) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._reactor = reactor
        # Folder under mirror/ -> namespace: how the survey names mirrored repositories.
        self._namespaces = layout.namespace_folders(u.namespace for u in config.upstreams)
        self._sync_jobs = [job.name for job in config.syncs]     # whose pins eviction spares
        self._lock = DeferredLock()
        self.last_size: StoreSize | None = None
        self._documents = Documents()     # S3: what each manifest names, kept between surveys
        self._loops: list[LoopingCall] = []
        metrics.mirror_max_size.set(config.mirror_max_size)
        # [[retention]] rules on their own intervals (registryd.upkeep.retention_runs).
        self.retention = RetentionRuns(store, config.retention, config.max_manifest_size, metrics.registry,
                                       reactor.seconds)

    def start(self) -> None:
        # A store that collects its own garbage (containerd) never sees registryd's collection.
        if self._config.gc_interval > 0 and not self._store.self_collecting:
            self._every(self._config.gc_interval, self._scheduled_gc, now=False)
        self._every(self._config.usage_interval, self._scheduled_survey, now=True)
        for interval, rules in self.retention.schedules():
            self._every(interval, lambda rules=rules: self.retention.scheduled(rules), now=False)

    def _every(self, interval: float, work: Any, now: bool) -> None:
        loop = LoopingCall(lambda: Deferred.fromCoroutine(work()))
        loop.clock = self._reactor
        loop.start(interval, now=now).addErrback(lambda f: log.failure("an upkeep timer stopped", f))
        self._loops.append(loop)

    def stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []

    async def _scheduled_gc(self) -> None:
        try:
            await self.collect()
        except Exception:
            pass  # logged and counted by collect; the next pass runs as planned

    async def _scheduled_survey(self) -> None:
        try:
            await self.survey()
        except STORE_ERRORS as e:
            log.error("surveying the store failed: {error}; the next survey runs as planned", error=str(e))
        except Exception:
            log.failure("surveying the store failed; the next survey runs as planned")

    async def collect(self, delay: float | None = None, dry_run: bool = False) -> GCReport:
        """One mark and sweep (registryd.upkeep.collector), sparing what the store's BlobGuard saw claimed."""
        delay = self._config.gc_delay if delay is None else delay
        await self._lock.acquire()
        started = time.time()
        from registryd.upkeep.collector import Collector

        # Every process and node may collect: runs overlap safely (see collector).
        collector = Collector(self._store.objects, delay, dry_run=dry_run, guard=self._store.guard)
        try:
            collection = await collector.collect()
        except OSError as e:
            self._metrics.gc_runs.labels("failed").inc()
            log.error("garbage collection failed: {error}; the next pass runs as planned", error=str(e))
            raise
        except Exception as e:
            self._metrics.gc_runs.labels("failed").inc()
            reason = outage_reason(e)
            if reason is None:
                log.failure("garbage collection failed; the next pass runs as planned")
            else:
                log.error("garbage collection failed: {error}; the next pass runs as planned", error=reason)
            raise
        finally:
            self._lock.release()
        report = GCReport(started, time.time() - started, collection, collector.report())
        if dry_run:
            return report
        self._metrics.gc_runs.labels("ok").inc()
        self._metrics.gc_removed_blobs.inc(len(collection.blobs))
        self._metrics.gc_reclaimed.inc(collection.reclaimed)
        self._metrics.gc_last_success.set(report.started + report.duration)
        self._metrics.gc_duration.set(report.duration)
        log.info("garbage collection removed {blobs} blobs ({bytes} bytes) and {links} links in {seconds:.1f}s",
                 blobs=len(collection.blobs), bytes=collection.reclaimed, links=len(collection.links),
                 seconds=report.duration)
        return report

    async def survey(self) -> StoreSize:
        """Measure the store, and evict from the mirror cache if it is over ``max_size``.

        The freed blobs go with the eviction where this process's BlobGuard
        sees every claim; otherwise through one collection right after (see
        upkeep.eviction).
        """
        from registryd.upkeep.eviction import EvictionPlan, evict, plan_eviction

        limit = self._config.mirror_max_size
        driver = self._store.objects
        await self._lock.acquire()
        try:
            survey = await take_survey(driver, self._namespaces, self._documents,
                                       pinned=await read_pins(driver, self._sync_jobs))
            self._measured(survey)
            # Nothing is evicted from a store whose content is not registryd's alone (containerd).
            plan = plan_eviction(survey, limit) if limit and not self._store.self_collecting else EvictionPlan()
            if not (plan.manifests or plan.blobs):
                assert self.last_size is not None
                return self.last_size
            done = await evict(driver, survey, plan, None if self._store.shared else self._store.guard)
        finally:
            self._lock.release()
        left = len(done.left)
        if done.left:
            try:
                # Through collect: its lock, its metrics, its log line; never delay 0 (see collector).
                report = await self.collect()
            except Exception:
                pass  # logged and counted by collect; a later collection removes the blobs
            else:
                removed = {entry["digest"] for entry in report.collection.blobs}
                taken = [size for digest, size in done.left.items() if str(digest) in removed]
                done.blobs, done.bytes = done.blobs + len(taken), done.bytes + sum(taken)
        self._evicted(plan.size_before, limit, done, left)
        await self._lock.acquire()
        try:
            self._measured(await take_survey(driver, self._namespaces, self._documents))
        finally:
            self._lock.release()
        assert self.last_size is not None
        return self.last_size

    def _measured(self, survey: Survey) -> None:
        mirror = survey.mirror_bytes
        local = survey.local_bytes
        self.last_size = StoreSize(survey.taken_at, len(survey.blob_sizes), survey.total_bytes, local, mirror)
        self._metrics.store_bytes.labels("local").set(local)
        self._metrics.store_bytes.labels("mirror").set(mirror)
        self._metrics.store_bytes.labels("unreferenced").set(max(0, survey.total_bytes - local - mirror))
        self._metrics.store_blobs.set(len(survey.blob_sizes))

    def _evicted(self, before: int, limit: int, done: Eviction, left: int) -> None:
        """The eviction counters: what the eviction deleted, with the blobs the collection that followed removed."""
        self._metrics.evicted_manifests.inc(done.manifests)
        self._metrics.evicted_blobs.inc(done.blobs)
        self._metrics.evicted_bytes.inc(done.bytes)
        log.info("mirror cache at {before} bytes is over max_size {limit}: evicted {manifests} manifests, "
                 "{links} blob-only links and {blobs} blobs ({bytes} bytes), least recently pulled first "
                 "({kept} pulled since the survey stay, {gone} were gone already){rest}",
                 before=before, limit=limit, manifests=done.manifests, links=done.links, blobs=done.blobs,
                 bytes=done.bytes, kept=done.kept, gone=done.gone,
                 rest=f"; {left} freed blobs were left to the collection that followed, later collections "
                      "remove those younger than [gc] delay" if left else "")
