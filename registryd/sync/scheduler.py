"""The ``[[sync]]`` jobs of a running server: their timers, one run at a time each, their figures.

Each job is started when its schedule (registryd.sync.schedule) says, from
the times its state in the store keeps, so a restart neither runs a job
early nor forgets one: a run cut off by the restart resumes at once. The
jobs of one upstream take turns (``[[upstream]] sync_jobs`` at once, one by
default). While the upstream is offline (``[mirror] offline`` or the
upstream's ``offline``) its jobs are paused: no run starts, on a timer or on
request. ``run_now`` is ``registryd sync --now JOB --url``: it joins the run
already going, or starts one.

The figures of each job's last run are exported at ``/metrics`` (a collector
that reads them at each scrape) and shown on the status page.
"""
from __future__ import annotations

import html
import time
from typing import Any, Iterator

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from registryd.config import Config
from registryd.deferreds import Shared
from registryd.metrics import Metrics
from registryd.mirror.cache import MirrorCache
from registryd.storage import Store
from registryd.storage.outage import outage_reason
from registryd.sync.errors import RunStopped
from registryd.sync.job import SyncRun
from registryd.sync.report import Progress, RunResult
from registryd.sync.schedule import LastRun, delay_until_next
from registryd.sync.state import RunSummary, load_state
from registryd.sync_settings import SyncJob
from registryd.units import human_size

log = Logger()

#: After a run that failed as a whole (the store away), try again this much later at the latest.
RETRY_AFTER_FAILURE = 300.0


class JobPaused(Exception):
    """The job's upstream is offline: the message says so."""


@attrs.define
class JobSlot:
    job: SyncJob
    last: RunSummary | None = None
    running: Shared[RunResult] | None = None
    work: Deferred[RunResult] | None = None     # the run itself, to cancel at a stop
    run: SyncRun | None = None
    progress: Progress | None = None
    timer: IDelayedCall | None = None
    next_at: float | None = None
    runs: int = 0
    images: int = 0
    bytes: int = 0
    errors: int = 0


class SyncScheduler:
    """Runs a server's sync jobs; see the module docstring."""

    def __init__(self, config: Config, cache: MirrorCache, store: Store, metrics: Metrics, reactor: Any) -> None:
        self._config = config
        self._cache = cache
        self._store = store
        self._reactor = reactor
        self.slots = {job.name: JobSlot(job) for job in config.syncs}
        self._turns = {u.namespace: DeferredSemaphore(u.sync_jobs) for u in config.upstreams}
        self._started = False
        if self.slots:
            metrics.registry.register(SyncCollector(self))

    def offline(self, job: SyncJob) -> bool:
        upstream = self._cache.mirrors[job.upstream].config
        return self._config.offline or upstream.offline

    def start(self) -> None:
        self._started = True
        for slot in self.slots.values():
            Deferred.fromCoroutine(self._plan(slot)).addErrback(
                lambda f: log.failure("planning a sync job failed", f))

    def stop(self, timeout: float) -> Deferred[None]:
        """Cancel the timers; let the runs under way finish the images they began (for at most
        ``timeout`` seconds, then cancel them) and stop. Their state resumes them at the next start."""
        self._started = False
        waits = []
        for slot in self.slots.values():
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
            if slot.running is not None and slot.work is not None:
                if slot.run is not None:
                    slot.run.stopping = True
                wait = slot.running.wait()
                wait.addTimeout(timeout, self._reactor, onTimeoutCancel=_cancelling(slot.work))
                waits.append(wait)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    async def _plan(self, slot: JobSlot) -> None:
        """Arm the job's timer from its state (a paused job gets none)."""
        if not self._started or self.offline(slot.job):
            slot.next_at = None
            return
        try:
            state = await load_state(self._store.objects, slot.job.name)
        except Exception as e:
            log.warn("sync {job}: reading its state failed ({error}); trying again later", job=slot.job.name,
                     error=outage_reason(e) or str(e))
            self._arm(slot, RETRY_AFTER_FAILURE)
            return
        if slot.last is None:
            slot.last = state.last
        last = LastRun(state.last.started if state.last else None,
                       None if state.running_since is not None else (state.last.ended if state.last else None))
        self._arm(slot, delay_until_next(slot.job, last, time.time()))

    def _arm(self, slot: JobSlot, delay: float) -> None:
        if not self._started:
            return
        if slot.timer is not None and slot.timer.active():
            slot.timer.cancel()
        slot.next_at = time.time() + delay
        slot.timer = self._reactor.callLater(delay, self._due, slot)

    def _due(self, slot: JobSlot) -> None:
        slot.timer = None
        if slot.running is None:
            self._begin(slot, dry_run=False).wait().addErrback(lambda f: None)

    def run_now(self, name: str, dry_run: bool = False) -> Deferred[RunResult]:
        """Run job ``name`` now (or join its run under way); JobPaused while its upstream is offline."""
        slot = self.slots[name]
        if self.offline(slot.job):
            raise JobPaused(f"sync job {name} is paused: upstream {slot.job.upstream} is offline")
        if dry_run:
            return Deferred.fromCoroutine(self._run(slot, True, Progress()))
        running = slot.running if slot.running is not None else self._begin(slot, dry_run=False)
        return running.wait()

    def _begin(self, slot: JobSlot, dry_run: bool) -> Shared[RunResult]:
        slot.progress = Progress()
        slot.work = Deferred.fromCoroutine(self._run(slot, dry_run, slot.progress))
        shared = slot.running = Shared(slot.work)
        shared.wait().addBoth(lambda result: self._ended(slot, shared, result))
        return shared

    def _ended(self, slot: JobSlot, shared: Shared[RunResult], result: Any) -> None:
        """Count the run, and plan the next one; a failure is logged here (and so handled)."""
        if slot.running is shared:
            slot.running = slot.work = slot.run = None
        if isinstance(result, RunResult):
            slot.last = result.summary
            slot.runs += 1
            slot.images += result.summary.images
            slot.bytes += result.summary.bytes
            slot.errors += result.summary.errors
            log.info("sync {job}: {images} images copied ({size}), {errors} errors, in {seconds:.1f}s",
                     job=slot.job.name, images=result.summary.images, size=human_size(result.summary.bytes),
                     errors=result.summary.errors, seconds=result.summary.duration)
            Deferred.fromCoroutine(self._plan(slot)).addErrback(lambda f: log.failure("planning failed", f))
        elif result.check(RunStopped):
            log.info("sync {job} stopped with the server; it resumes at the next start", job=slot.job.name)
        elif not result.check(CancelledError):
            slot.errors += 1
            reason = outage_reason(result.value)
            if reason is None:
                log.failure("sync {job} failed", result, job=slot.job.name)
            else:
                log.warn("sync {job} failed: {reason}; trying again later", job=slot.job.name, reason=reason)
            self._arm(slot, RETRY_AFTER_FAILURE)

    async def _run(self, slot: JobSlot, dry_run: bool, progress: Progress) -> RunResult:
        turns = self._turns[slot.job.upstream]
        await turns.acquire()
        try:
            run = SyncRun(slot.job, self._cache, self._store, self._reactor, dry_run, progress,
                          self._config.max_manifest_size)
            if not dry_run:
                slot.run = run
            return await run.run()
        finally:
            turns.release()

    def status(self, name: str) -> dict[str, Any]:
        """One job's status, as ``GET /admin/sync`` gives it."""
        slot = self.slots[name]
        progress = slot.progress if slot.running is not None else None
        return {"job": name, "upstream": slot.job.upstream, "paused": self.offline(slot.job),
                "running": slot.running is not None, "next_run": slot.next_at,
                "progress": None if progress is None else
                {"planned": progress.planned, "done": progress.done, "bytes": progress.bytes},
                "last": slot.last.as_json() if slot.last is not None else None}

    def render_section(self, now: float) -> str:
        """The status page's section: each job's state and last run."""
        if not self.slots:
            return ""
        rows = []
        for name, slot in sorted(self.slots.items()):
            e = html.escape
            if self.offline(slot.job):
                state = '<span class="warn">paused (offline)</span>'
            elif slot.running is not None and slot.progress is not None:
                state = f"running: {slot.progress.done}/{slot.progress.planned} images"
            else:
                state = '<span class="muted">idle</span>'
            last = slot.last
            if last is None:
                figures = '<td class="muted" colspan="4">never ran</td>'
            else:
                errors = f'<span class="{"bad" if last.errors else "ok"}">{last.errors}</span>'
                figures = (f'<td>{e(time.strftime("%Y-%m-%d %H:%M", time.gmtime(last.started)))} '
                           f'({last.duration:.1f}s)</td><td class="n">{last.images}</td>'
                           f'<td class="n">{e(human_size(last.bytes))}</td><td class="n">{errors}</td>')
            message = f'<div class="wrap bad">{e(last.messages[0][:300])}</div>' if last and last.messages else ""
            rows.append(f'<tr><td class="wrap"><b>{e(name)}</b> <span class="muted">{e(slot.job.upstream)}</span>'
                        f"<div>{state}</div>{message}</td>{figures}</tr>")
        head = "".join(f"<th>{h}</th>" for h in ("Job", "Last run", "Images", "Bytes", "Errors"))
        return (f'<section id="sync"><h2>Sync jobs</h2><table><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table></section>')


def _cancelling(work: Deferred[RunResult]) -> Any:
    """What a stop does to a run that did not end in time: cancel it (its state resumes it)."""
    def cancel(result: Any, timeout: float) -> Any:
        work.cancel()
        return result
    return cancel


class SyncCollector:
    """Each job's figures as metrics, read at each scrape."""

    def __init__(self, scheduler: SyncScheduler) -> None:
        self._scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "last": GaugeMetricFamily("registryd_sync_last_run_timestamp_seconds",
                                      "When the job's last run started", labels=["job"]),
            "duration": GaugeMetricFamily("registryd_sync_last_duration_seconds", "How long the job's last run "
                                          "took", labels=["job"]),
            "last_images": GaugeMetricFamily("registryd_sync_last_images", "Images the job's last run copied or "
                                             "updated", labels=["job"]),
            "last_bytes": GaugeMetricFamily("registryd_sync_last_bytes", "Blob bytes the job's last run fetched",
                                            labels=["job"]),
            "last_errors": GaugeMetricFamily("registryd_sync_last_errors", "Errors in the job's last run",
                                             labels=["job"]),
            "running": GaugeMetricFamily("registryd_sync_running", "1 while the job runs", labels=["job"]),
            "runs": CounterMetricFamily("registryd_sync_runs", "Runs of the job since start", labels=["job"]),
            "images": CounterMetricFamily("registryd_sync_images_copied", "Images the job copied or updated since "
                                          "start", labels=["job"]),
            "bytes": CounterMetricFamily("registryd_sync_bytes_copied", "Blob bytes the job fetched since start",
                                         labels=["job"]),
            "errors": CounterMetricFamily("registryd_sync_errors", "Errors of the job since start", labels=["job"]),
        }
        for name, slot in sorted(self._scheduler.slots.items()):
            if slot.last is not None:
                families["last"].add_metric([name], slot.last.started)
                families["duration"].add_metric([name], slot.last.duration)
                families["last_images"].add_metric([name], slot.last.images)
                families["last_bytes"].add_metric([name], slot.last.bytes)
                families["last_errors"].add_metric([name], slot.last.errors)
            families["running"].add_metric([name], 1 if slot.running is not None else 0)
            families["runs"].add_metric([name], slot.runs)
            families["images"].add_metric([name], slot.images)
            families["bytes"].add_metric([name], slot.bytes)
            families["errors"].add_metric([name], slot.errors)
        yield from families.values()
