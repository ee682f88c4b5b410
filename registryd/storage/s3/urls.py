"""Request URLs in both S3 addressing styles, encoded once, as SigV4 signs them.

Path style puts the bucket in the path (``http://host/bucket/key``), which
is what Ceph RGW and MinIO serve without wildcard DNS; virtual-host style
puts it in the host name (``https://bucket.host/key``), which AWS prefers.
Keys are percent-encoded segment by segment (``/`` kept, everything but
RFC 3986 unreserved characters escaped): S3's canonical request uses the
path exactly as sent, so the URL built here is both what goes on the wire
and what is signed.
"""
from __future__ import annotations

from typing import Sequence
from urllib.parse import quote, urlsplit

from registryd.storage.s3.settings import S3Settings

Query = Sequence[tuple[str, "str | None"]]

#: S3 refuses longer keys (UTF-8 bytes).
MAX_KEY_BYTES = 1024


def encode_key(key: str) -> str:
    """A key as it appears in a path or an x-amz-copy-source header."""
    return quote(key, safe="/")


def encode_query(query: Query) -> str:
    """``[("uploadId", "a b"), ("uploads", None)]`` -> ``uploadId=a%20b&uploads``."""
    parts = []
    for name, value in query:
        item = quote(name, safe="")
        if value is not None:
            item += "=" + quote(value, safe="")
        parts.append(item)
    return "&".join(parts)


def full_key(settings: S3Settings, key: str) -> str:
    """The key in the bucket: the configured prefix, then ``key``."""
    if not key:
        raise ValueError("an S3 key must not be empty")
    stored = settings.prefix + key
    if len(stored.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"S3 key longer than {MAX_KEY_BYTES} bytes: {stored[:80]!r}...")
    return stored


def bucket_url(settings: S3Settings, bucket: str | None = None) -> str:
    """The URL of the bucket itself (listing, create, batch delete)."""
    return _url(settings, bucket or settings.bucket, "")


def object_url(settings: S3Settings, key: str, query: Query = ()) -> str:
    """The URL of ``key`` (prefix applied), with ``query`` appended."""
    url = _url(settings, settings.bucket, encode_key(full_key(settings, key)))
    return with_query(url, query)


def with_query(url: str, query: Query) -> str:
    encoded = encode_query(query)
    return f"{url}?{encoded}" if encoded else url


def copy_source(settings: S3Settings, key: str) -> str:
    """The ``x-amz-copy-source`` value for ``key`` in our bucket."""
    return f"/{settings.bucket}/{encode_key(full_key(settings, key))}"


def _url(settings: S3Settings, bucket: str, encoded_key: str) -> str:
    parts = urlsplit(settings.endpoint)
    if settings.addressing == "virtual":
        return f"{parts.scheme}://{bucket}.{parts.netloc}/{encoded_key}"
    if encoded_key:
        return f"{parts.scheme}://{parts.netloc}/{bucket}/{encoded_key}"
    return f"{parts.scheme}://{parts.netloc}/{bucket}"
