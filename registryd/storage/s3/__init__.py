"""An S3-compatible object store as shared storage for several registryd nodes.

``S3Settings`` (the ``[storage.s3]`` table) says where and how; ``S3Client``
does the requests over Twisted. Importing this package is cheap: botocore,
used only to compute SigV4 signatures, is imported when a client is made.
"""
from __future__ import annotations

from registryd.storage.s3.bodies import FileRegion
from registryd.storage.s3.client import S3Client
from registryd.storage.s3.documents import DeleteFailure, ObjectEntry, ObjectInfo, Part, UploadInfo
from registryd.storage.s3.errors import ObjectTooLarge, S3Error, S3Unavailable
from registryd.storage.s3.settings import S3ConfigError, S3Settings

__all__ = [
    "DeleteFailure", "FileRegion", "ObjectEntry", "ObjectInfo", "ObjectTooLarge", "Part", "S3Client",
    "S3ConfigError", "S3Error", "S3Settings", "S3Unavailable", "UploadInfo",
]
