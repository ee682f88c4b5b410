"""What a sync run did: a report per image, the run's result, its progress as it goes."""
from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.logger import Logger

from registryd.sync.state import RunSummary
from registryd.units import human_size

log = Logger()


@attrs.define
class ImageReport:
    """What happened to one tag."""

    repository: str
    tag: str
    outcome: str        # copied, updated, unchanged, resumed, deleted, kept, failed; dry run: would copy/update
    digest: str | None = None
    previous: str | None = None
    manifests: int = 0
    blobs: int = 0          # fetched
    bytes: int = 0          # fetched
    error: str | None = None

    def line(self) -> str:
        ref = f"{self.repository}:{self.tag}"
        if self.error is not None:
            return f"FAILED {ref}: {self.error}"
        detail = ""
        if self.outcome in ("copied", "updated"):
            detail = f" ({self.manifests} manifests, {self.blobs} blobs fetched, {human_size(self.bytes)})"
        moved = f" (was {self.previous})" if self.previous and self.previous != self.digest else ""
        return f"{self.outcome} {ref} {self.digest or ''}{moved}{detail}".replace("  ", " ").rstrip()

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class RunResult:
    job: str
    dry_run: bool
    summary: RunSummary
    images: list[ImageReport] = attrs.field(factory=list)
    repositories: list[str] = attrs.field(factory=list)
    resumed: int = 0        # images a cut-off run had finished, skipped
    throttled: int = 0      # 429 answers waited out

    def as_json(self) -> dict[str, Any]:
        return {"job": self.job, "dry_run": self.dry_run, **self.summary.as_json(),
                "repositories": self.repositories, "resumed": self.resumed, "throttled": self.throttled,
                "report": [image.as_json() for image in self.images]}


@attrs.define
class Progress:
    """What a running job has done so far (for ``registryd sync`` and the status page)."""

    planned: int = 0
    done: int = 0
    bytes: int = 0
    listeners: list[Callable[[Progress, ImageReport | None], None]] = attrs.field(factory=list)

    def tell(self, report: ImageReport | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(self, report)
            except Exception:
                log.failure("a sync progress listener failed")
