"""``registryd fsck`` over a bucket's S3Client: registryd.admin.fsck's StoreFsck on an S3Driver.

fsck is written once, over any storage driver (registryd.admin.fsck);
this name remains for callers that hold a client (tests/test_cli_fsck_s3.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable

from registryd.admin.fsck import StoreFsck
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.driver import S3Driver


class S3Fsck(StoreFsck):
    """One run over the bucket ``client`` works on."""

    def __init__(self, client: S3Client, namespaces: dict[str, str], upload_expiry: float, gc_delay: float,
                 stream: Any = None, progress: bool | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(S3Driver(client), namespaces, upload_expiry, gc_delay, stream, progress, clock)
        self.client = client
