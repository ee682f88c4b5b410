"""An S3-compatible object store as shared storage for several registryd nodes.

``S3Settings`` (the ``[storage.s3]`` table) says where and how; ``S3Client``
does the requests over Twisted. Importing this package is cheap: botocore,
used only to compute SigV4 signatures, is imported when a client is made.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registryd.storage.s3.bodies import FileRegion
    from registryd.storage.s3.client import S3Client
    from registryd.storage.s3.documents import DeleteFailure, ObjectEntry, ObjectInfo, Part, UploadInfo
    from registryd.storage.s3.errors import ObjectTooLarge, S3Error, S3Unavailable
    from registryd.storage.s3.settings import S3ConfigError, S3Settings

__all__ = [
    "DeleteFailure", "FileRegion", "ObjectEntry", "ObjectInfo", "ObjectTooLarge", "Part", "S3Client",
    "S3ConfigError", "S3Error", "S3Unavailable", "S3Settings", "UploadInfo",
]

#: Where each name lives: imported on first use, so that a node on a data directory (which reads
#: only the settings) never loads the client, its HTTP stack and its XML parser.
_HOMES = {
    "FileRegion": "bodies", "S3Client": "client", "DeleteFailure": "documents", "ObjectEntry": "documents",
    "ObjectInfo": "documents", "Part": "documents", "UploadInfo": "documents", "ObjectTooLarge": "errors",
    "S3Error": "errors", "S3Unavailable": "errors", "S3ConfigError": "settings", "S3Settings": "settings",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
