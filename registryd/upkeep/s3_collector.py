"""The collector on an S3Client: registryd.upkeep.collector.Collector on an S3Driver.

For callers that hold a client (tests, tools); the server and ``registryd
gc`` give the Collector their store's driver, whichever it is.
"""
from __future__ import annotations

import time
from typing import Callable

from registryd.storage.guard import BlobGuard
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.driver import S3Driver
from registryd.upkeep.collector import LEFTOVER_AGE, Collection, Collector

__all__ = ["LEFTOVER_AGE", "S3Collection", "S3Collector"]

S3Collection = Collection


class S3Collector(Collector):
    """One mark and sweep of the bucket ``client`` works on; ``guard`` is this node's BlobGuard."""

    def __init__(self, client: S3Client, delay: float, dry_run: bool, guard: BlobGuard | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(S3Driver(client), delay, dry_run, guard=guard, clock=clock)

    async def run(self) -> Collection:  # type: ignore[override]  # on the reactor: a bucket needs it
        return await self.collect()
