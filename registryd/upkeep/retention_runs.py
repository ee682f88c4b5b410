"""The server's retention runs: on each rule's ``interval`` and for ``POST /admin/retention``.

One run at a time (a DeferredLock): a scheduled run and an admin's never
interleave their removals. Each run is logged in one line and counted on
/metrics (``registryd_retention_*``); a run that fails is logged and
counted, and the timers go on. The policy itself is registryd.upkeep.retention.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from registryd.retention_rules import RetentionRule
from registryd.storage import Store
from registryd.storage.outage import outage_reason
from registryd.upkeep.retention import Clock, Retention

log = Logger()


class RetentionMetrics:
    """What the server's retention runs did since start-up, on the server's /metrics registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter("registryd_retention_runs", "Retention runs in the server (scheduled and "
                            "POST /admin/retention, dry runs not counted), by outcome", ["outcome"], registry=registry)
        self.removed_tags = Counter("registryd_retention_removed_tags", "Tags of local repositories removed "
                                    "by [[retention]] rules", registry=registry)
        self.removed_manifests = Counter("registryd_retention_removed_manifests", "Manifests of local "
                                         "repositories removed by [[retention]] rules", registry=registry)
        self.last_success = Gauge("registryd_retention_last_success_timestamp_seconds", "When the last "
                                  "successful retention run ended", registry=registry)


class RetentionRuns:
    """The rules of ``[[retention]]`` applied to a server's store."""

    def __init__(self, store: Store, rules: Sequence[RetentionRule], manifest_limit: int,
                 registry: CollectorRegistry, clock: Clock = time.time) -> None:
        self.rules = tuple(rules)
        self._retention = Retention(store.repositories, store.blobs, self.rules, store.location(),
                                    manifest_limit, clock)
        self.metrics = RetentionMetrics(registry)
        self._lock = DeferredLock()

    def schedules(self) -> list[tuple[float, tuple[RetentionRule, ...]]]:
        """(interval, the rules run on it) for every interval but 0 (run by the command only)."""
        by_interval: dict[float, list[RetentionRule]] = defaultdict(list)
        for rule in self.rules:
            if rule.interval > 0:
                by_interval[rule.interval].append(rule)
        return [(interval, tuple(rules)) for interval, rules in sorted(by_interval.items())]

    async def run(self, dry_run: bool = False, due: Sequence[RetentionRule] | None = None) -> dict[str, Any]:
        """One run (every rule, or the repositories of ``due``); its report, as ``registryd retention --json``."""
        await self._lock.acquire()
        started = time.time()
        try:
            report = await self._retention.run(dry_run, due)
        except Exception as e:
            if not dry_run:
                self.metrics.runs.labels("failed").inc()
            reason = outage_reason(e)
            if reason is None and not isinstance(e, OSError):
                log.failure("retention run failed; the next one runs as planned")
            else:
                log.error("retention run failed: {error}; the next one runs as planned", error=reason or str(e))
            raise
        finally:
            self._lock.release()
        if not dry_run:
            counts = report["counts"]
            self.metrics.runs.labels("ok").inc()
            self.metrics.removed_tags.inc(counts["tag"])
            self.metrics.removed_manifests.inc(counts["manifest"])
            self.metrics.last_success.set(time.time())
            log.info("retention removed {tags} tags and {manifests} manifests in {repositories} matching "
                     "repositories in {seconds:.1f}s", tags=counts["tag"], manifests=counts["manifest"],
                     repositories=report["repositories_matched"], seconds=time.time() - started)
        return report

    async def scheduled(self, due: Sequence[RetentionRule]) -> None:
        try:
            await self.run(due=due)
        except Exception:
            pass  # logged and counted by run; the next run goes as planned
