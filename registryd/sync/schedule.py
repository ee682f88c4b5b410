"""When a sync job runs next.

An ``interval`` job runs every ``interval`` seconds counted from the start
of its last run (a run longer than that is followed at once by the next); a
``continuous`` job runs again ``poll_interval`` seconds after its last run
ended. A job that never ran, or whose last run was cut off (a restart),
runs at once: the cut-off run resumes where it stopped.
"""
from __future__ import annotations

import attrs

from registryd.sync_settings import SyncJob


@attrs.frozen
class LastRun:
    """What the job's state says of its last run (None: never)."""

    started: float | None = None
    ended: float | None = None      # None with a start: cut off, to resume


def next_run(job: SyncJob, last: LastRun, now: float) -> float:
    """The time the job should next start (``now`` or earlier: at once)."""
    if last.started is None or last.ended is None:
        return now
    if job.continuous:
        return last.ended + job.poll_interval
    return last.started + job.interval


def delay_until_next(job: SyncJob, last: LastRun, now: float) -> float:
    """Seconds to wait from ``now`` (0: start now)."""
    return max(0.0, next_run(job, last, now) - now)
