"""A sync job's state, kept in the store (``_registryd/sync/<job>/state.json``): a restart resumes.

It holds the last finished run (for the schedule, ``/metrics`` and the
status page), the run in progress with every image it has finished (a
restart mid-job skips those and goes on with the rest), the tags the job
copied (to notice one that vanished upstream), and the creation time of
each image it looked at (``keep_latest`` without versions), so none is
asked for twice.
"""
from __future__ import annotations

import json
from typing import Any

import attrs

from registryd.storage.driver import Driver
from registryd.upkeep.pins import job_key

STATE_LIMIT = 64 * 1024 * 1024


@attrs.define
class RunSummary:
    """One finished run, as /metrics and the status page show it."""

    started: float
    ended: float
    images: int = 0         # images copied or updated
    bytes: int = 0          # blob bytes fetched from the upstream
    errors: int = 0
    messages: list[str] = attrs.field(factory=list)   # the first few errors

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    def as_json(self) -> dict[str, Any]:
        return {"started": self.started, "ended": self.ended, "duration_seconds": round(self.duration, 3),
                "images": self.images, "bytes": self.bytes, "errors": self.errors, "messages": self.messages}


@attrs.define
class JobState:
    last: RunSummary | None = None
    #: The run in progress: when it started, and "repository:tag" -> the manifests it keeps, once done.
    running_since: float | None = None
    done: dict[str, list[str]] = attrs.field(factory=dict)
    #: repository -> tag -> the manifests it keeps (its own first), for every tag the job copied and lists.
    synced: dict[str, dict[str, list[str]]] = attrs.field(factory=dict)
    #: manifest digest -> the image's creation time (seconds).
    created: dict[str, float] = attrs.field(factory=dict)

    def encode(self) -> bytes:
        document = {"last": self.last.as_json() if self.last is not None else None,
                    "running_since": self.running_since, "done": self.done, "synced": self.synced,
                    "created": self.created}
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> JobState:
        """The state in ``data``; an unreadable one is a fresh state (the job starts over, fetching
        only what the store lacks)."""
        try:
            document = json.loads(data)
            last = document.get("last")
            summary = None
            if last is not None:
                summary = RunSummary(float(last["started"]), float(last["ended"]), int(last["images"]),
                                     int(last["bytes"]), int(last["errors"]), [str(m) for m in last["messages"]])
            return cls(summary, document.get("running_since"),
                       {str(k): [str(d) for d in v] for k, v in document.get("done", {}).items()},
                       {str(r): {str(t): [str(d) for d in keeps] for t, keeps in tags.items()}
                        for r, tags in document.get("synced", {}).items()},
                       {str(k): float(v) for k, v in document.get("created", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls()


async def load_state(driver: Driver, job: str) -> JobState:
    data = await driver.read(job_key(job, "state.json"), STATE_LIMIT)
    return JobState() if data is None else JobState.decode(data)


async def save_state(driver: Driver, job: str, state: JobState) -> None:
    await driver.write(job_key(job, "state.json"), state.encode())
