"""S3 operations on one bucket, for the storage layer shared by registryd nodes.

Keys are the caller's: the configured prefix is added on the way out and
removed from listings on the way back. Bodies never sit in memory whole:
uploads stream from files, downloads stream into an IConsumer with
backpressure; only ``get_small`` and the XML documents are collected, under
a limit.

Errors: S3Error for an answer with an error status (``.code`` is S3's,
e.g. ``NoSuchKey``, ``PreconditionFailed``), S3Unavailable when no usable
answer came. ``head_object`` and ``get_small`` return None for a missing key.
"""
from __future__ import annotations

import base64
import hashlib
from typing import Any, AsyncIterator, Mapping, Sequence

from twisted.internet.interfaces import IConsumer
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IResponse

from registryd.deferreds import bounded_gather
from registryd.storage.s3 import documents
from registryd.storage.s3.bodies import BytesBody, FileBody, FileRegion, RequestBody, drop_body, pipe_body, read_body
from registryd.storage.s3.documents import DeleteFailure, ObjectEntry, ObjectInfo, Part, UploadInfo
from registryd.storage.s3.errors import ObjectTooLarge, S3Error, S3Unavailable
from registryd.storage.s3.settings import MAX_PART_SIZE, S3Settings
from registryd.storage.s3.transport import S3Transport
from registryd.storage.s3.urls import Query, bucket_url, copy_source, full_key, object_url, with_query

#: Listings and other result documents: 1000 keys of 1 KiB each, with room.
DOCUMENT_LIMIT = 16 * 1024 * 1024
#: S3's limits: keys per DeleteObjects and per listing page, parts per upload.
DELETE_BATCH = 1000
MAX_PAGE = 1000
MAX_PARTS = 10000
#: Part copies of one copy_large running at the same time.
COPY_CONCURRENCY = 4

Body = bytes | str | FileRegion
ByteRange = tuple[int, int | None]


class S3Client:
    """One bucket of an S3-compatible store (Ceph RGW, MinIO, AWS), over Twisted."""

    def __init__(self, settings: S3Settings, reactor: Any, pool: HTTPConnectionPool | None = None) -> None:
        self.settings = settings
        self._transport = S3Transport(settings, reactor, pool)

    async def close(self) -> None:
        await self._transport.close()

    # -- plumbing -------------------------------------------------------------

    async def _call(self, method: str, url: str, operation: str, key: str | None, ok: Sequence[int] = (200,),
                    headers: Mapping[str, str] | None = None, body: RequestBody | None = None,
                    patient: bool = False) -> IResponse:
        """Send; an answer whose status is not in ``ok`` raises its S3Error.

        ``patient``: the store answers once it has done the work (copies,
        completions), so wait ``idle_timeout`` for it, not ``request_timeout``.
        """
        what = f"{operation} {key}" if key else operation
        response = await self._transport.send(method, url, what, headers, body, patient)
        if response.code not in ok:
            raise await self._transport.error(response, operation, key)
        return response

    async def _document(self, response: IResponse, operation: str, key: str | None) -> bytes:
        """A result document; S3 may answer 200 with an <Error> inside (copies, completes)."""
        body = await self._transport.read(response, operation, DOCUMENT_LIMIT)
        error = documents.parse_error(body)
        if error is not None:
            raise S3Error(response.code, error[0], error[1], key, operation)
        return body

    # -- buckets (tests, set-up tools) -----------------------------------------

    async def create_bucket(self) -> None:
        """Create the configured bucket (S3Error BucketAlreadyOwnedByYou if it exists)."""
        document = documents.bucket_document(self.settings.region)
        body = BytesBody(document) if document else None
        await self._discard(await self._call("PUT", bucket_url(self.settings), "CreateBucket", None, body=body))

    async def delete_bucket(self) -> None:
        """Delete the configured bucket, which must be empty."""
        await self._discard(await self._call("DELETE", bucket_url(self.settings), "DeleteBucket", None,
                                             ok=(200, 204)))

    async def _discard(self, response: IResponse) -> None:
        await self._transport.discard(response)

    # -- objects --------------------------------------------------------------

    async def head_object(self, key: str) -> ObjectInfo | None:
        """What the store knows about ``key``, or None if there is no such object."""
        response = await self._transport.send("HEAD", object_url(self.settings, key), f"HEAD {key}")
        if response.code == 404:
            await self._discard(response)
            return None
        if response.code != 200:
            raise await self._transport.error(response, "HEAD", key)
        await self._discard(response)
        return _object_info(response, head=True)

    async def get_object(self, key: str, consumer: IConsumer, byte_range: ByteRange | None = None) -> ObjectInfo:
        """Stream ``key`` (or ``byte_range``, first and last byte inclusive, last
        None for "to the end") into ``consumer``, as its push producer.

        Returns once the whole body was written; ``size`` is the object's.
        Cancelling drops the connection. The consumer is not finished or closed.
        """
        headers = {}
        if byte_range is not None:
            headers["Range"] = _range_header(byte_range)
        response = await self._call("GET", object_url(self.settings, key), "GET", key, ok=(200, 206),
                                    headers=headers)
        if byte_range is not None and response.code == 200 and not _whole(byte_range, response.length):
            # A store that ignored Range would hand the consumer the wrong bytes.
            drop_body(response)
            raise S3Unavailable(f"S3 GET {key}: the endpoint ignored the Range header")
        info = _object_info(response)
        await pipe_body(response, consumer, self._transport.reactor, self.settings.stall_timeout, f"S3 GET {key}")
        return info

    async def get_small(self, key: str, limit: int) -> bytes | None:
        """The whole of a small object (at most ``limit`` bytes), or None if missing."""
        url = object_url(self.settings, key)
        response = await self._transport.send("GET", url, f"GET {key}")
        if response.code == 404:
            error = await self._transport.error(response, "GET", key)
            if error.code == "NoSuchKey":
                return None
            raise error
        if response.code != 200:
            raise await self._transport.error(response, "GET", key)

        def too_large() -> Exception:
            return ObjectTooLarge(key, limit)

        return await read_body(response, self._transport.reactor, self.settings.stall_timeout, f"S3 GET {key}",
                               limit, too_large)

    async def put_object(self, key: str, body: Body, *, if_none_match: bool = False,
                         content_type: str | None = None, metadata: Mapping[str, str] | None = None) -> str:
        """Store ``body`` (bytes, a file path, or a FileRegion) as ``key``; returns the ETag.

        ``if_none_match``: only if ``key`` does not exist yet, atomically
        (S3Error ``PreconditionFailed``, status 412, otherwise). One PUT
        carries at most 5 GiB; larger files go through multipart.
        """
        headers = _object_headers(content_type, metadata)
        if if_none_match:
            headers["If-None-Match"] = "*"
        request_body = _request_body(body)
        response = await self._call("PUT", object_url(self.settings, key), "PUT", key, headers=headers,
                                    body=request_body)
        await self._discard(response)
        return _etag(response)

    async def copy_object(self, src_key: str, dst_key: str) -> str:
        """Server-side copy (at most 5 GiB; see ``copy_large``); returns the new ETag."""
        headers = {"x-amz-copy-source": copy_source(self.settings, src_key)}
        response = await self._call("PUT", object_url(self.settings, dst_key), "COPY", dst_key, headers=headers,
                                    patient=True)
        return documents.parse_etag(await self._document(response, "COPY", dst_key))

    async def copy_large(self, src_key: str, dst_key: str, size: int) -> str:
        """Copy of any size: CopyObject up to the copy threshold, UploadPartCopy above.

        A failed multipart copy is aborted, leaving no parts behind.
        """
        if size <= self.settings.copy_threshold:
            return await self.copy_object(src_key, dst_key)
        part_size = min(max(self.settings.part_size, -(-size // MAX_PARTS)), MAX_PART_SIZE)
        ranges = [(number, (start, min(start + part_size, size) - 1))
                  for number, start in enumerate(range(0, size, part_size), start=1)]
        upload_id = await self.create_multipart(dst_key)

        async def copy_part(part: tuple[int, tuple[int, int]]) -> Part:
            number, (first, last) = part
            etag = await self.upload_part_copy(dst_key, upload_id, number, src_key, (first, last))
            return Part(number, etag, last - first + 1)

        try:
            # On a failure, the abort comes once every part in flight has ended.
            parts = await bounded_gather(ranges, copy_part, COPY_CONCURRENCY)
            return await self.complete_multipart(dst_key, upload_id, parts)
        except BaseException:
            await self._abort_quietly(dst_key, upload_id)
            raise

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        try:
            await self.abort_multipart(key, upload_id)
        except (S3Error, S3Unavailable):
            pass  # an upload left behind is reaped by list_multipart_uploads + abort

    async def delete_object(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error (S3 says 204 either way)."""
        await self._discard(await self._call("DELETE", object_url(self.settings, key), "DELETE", key,
                                             ok=(200, 204)))

    async def delete_objects(self, keys: Sequence[str]) -> list[DeleteFailure]:
        """Remove many keys, 1000 per request; returns the ones the store refused."""
        failures: list[DeleteFailure] = []
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [full_key(self.settings, key) for key in keys[start:start + DELETE_BATCH]]
            document = documents.delete_document(batch)
            md5 = base64.b64encode(hashlib.md5(document, usedforsecurity=False).digest()).decode()
            url = with_query(bucket_url(self.settings), [("delete", None)])
            response = await self._call("POST", url, "DeleteObjects", None, body=BytesBody(document),
                                        headers={"Content-MD5": md5, "Content-Type": "application/xml"})
            body = await self._document(response, "DeleteObjects", None)
            failures.extend(documents.parse_delete_result(body, self.settings.prefix))
        return failures

    async def list_objects(self, prefix: str = "", delimiter: str | None = None,
                           page_size: int = MAX_PAGE) -> AsyncIterator[ObjectEntry]:
        """Every key under ``prefix`` in key order (ListObjectsV2, page by page).

        With a ``delimiter``, keys below the next delimiter are rolled up into
        entries with ``is_prefix`` set.
        """
        if not 1 <= page_size <= MAX_PAGE:
            raise ValueError(f"page_size must be 1 to {MAX_PAGE}, not {page_size}")
        token: str | None = None
        while True:
            query: list[tuple[str, str | None]] = [("list-type", "2"), ("max-keys", str(page_size)),
                                                   ("prefix", self.settings.prefix + prefix)]
            if delimiter:
                query.append(("delimiter", delimiter))
            if token:
                query.append(("continuation-token", token))
            response = await self._call("GET", with_query(bucket_url(self.settings), query), "ListObjects", prefix)
            page = documents.parse_object_list(await self._document(response, "ListObjects", prefix), self.settings.prefix)
            for entry in page.entries:
                yield entry
            if page.next_token is None:
                return
            token = page.next_token

    def presign_get(self, key: str, expires_seconds: int) -> str:
        """A URL anyone can GET ``key`` with for ``expires_seconds`` (1 s to 7 days)."""
        return self._transport.signer.presign(object_url(self.settings, key), expires_seconds)

    # -- multipart ------------------------------------------------------------

    async def create_multipart(self, key: str, content_type: str | None = None,
                               metadata: Mapping[str, str] | None = None) -> str:
        """Start a multipart upload of ``key``; returns its upload id."""
        response = await self._call("POST", object_url(self.settings, key, [("uploads", None)]),
                                    "CreateMultipartUpload", key, headers=_object_headers(content_type, metadata))
        return documents.parse_upload_id(await self._document(response, "CreateMultipartUpload", key))

    async def upload_part(self, key: str, upload_id: str, number: int, path: str, offset: int,
                          length: int) -> str:
        """Send ``length`` bytes of ``path`` from ``offset`` as part ``number``; returns its ETag.

        Parts but the last must be at least 5 MiB.
        """
        _check_part_number(number)
        url = object_url(self.settings, key, _part_query(number, upload_id))
        response = await self._call("PUT", url, "UploadPart", key, body=FileBody(FileRegion(path, offset, length)))
        await self._discard(response)
        return _etag(response)

    async def upload_part_copy(self, key: str, upload_id: str, number: int, src_key: str,
                               byte_range: tuple[int, int]) -> str:
        """Part ``number`` copied server-side from ``src_key`` (first, last byte inclusive)."""
        _check_part_number(number)
        headers = {"x-amz-copy-source": copy_source(self.settings, src_key),
                   "x-amz-copy-source-range": _range_header(byte_range)}
        url = object_url(self.settings, key, _part_query(number, upload_id))
        response = await self._call("PUT", url, "UploadPartCopy", key, headers=headers, patient=True)
        return documents.parse_etag(await self._document(response, "UploadPartCopy", key))

    async def complete_multipart(self, key: str, upload_id: str, parts: Sequence[Part]) -> str:
        """Join ``parts`` (any order) into ``key``; returns the object's ETag."""
        body = BytesBody(documents.complete_document(parts))
        url = object_url(self.settings, key, [("uploadId", upload_id)])
        response = await self._call("POST", url, "CompleteMultipartUpload", key, body=body,
                                    headers={"Content-Type": "application/xml"}, patient=True)
        etag = documents.parse_etag(await self._document(response, "CompleteMultipartUpload", key))
        if not etag:
            # Ceph 16's radosgw answers with an empty <ETag>; the object has one.
            info = await self.head_object(key)
            etag = info.etag if info is not None else ""
        return etag

    async def abort_multipart(self, key: str, upload_id: str) -> bool:
        """Drop an upload and its parts; False if there was no such upload."""
        url = object_url(self.settings, key, [("uploadId", upload_id)])
        response = await self._transport.send("DELETE", url, f"AbortMultipartUpload {key}")
        if response.code in (200, 204):
            await self._discard(response)
            return True
        error = await self._transport.error(response, "AbortMultipartUpload", key)
        if error.code == "NoSuchUpload":
            return False
        raise error

    async def list_parts(self, key: str, upload_id: str) -> list[Part]:
        """The parts uploaded so far, by number.

        An upload that is gone raises S3Error with status 404 (code
        NoSuchUpload on AWS, NoSuchKey on Ceph 16).
        """
        parts: list[Part] = []
        marker: str | None = None
        while True:
            query: list[tuple[str, str | None]] = [("uploadId", upload_id)]
            if marker:
                query.append(("part-number-marker", marker))
            response = await self._call("GET", object_url(self.settings, key, query), "ListParts", key)
            page = documents.parse_part_list(await self._document(response, "ListParts", key))
            parts.extend(page.parts)
            if page.next_marker is None:
                return parts
            marker = page.next_marker

    async def list_multipart_uploads(self, prefix: str = "") -> AsyncIterator[UploadInfo]:
        """Unfinished uploads of keys under ``prefix`` (for reaping abandoned ones)."""
        markers: tuple[str, str] | None = None
        while True:
            query: Query = [("uploads", None), ("prefix", self.settings.prefix + prefix)]
            if markers:
                query = [*query, ("key-marker", markers[0]), ("upload-id-marker", markers[1])]
            url = with_query(bucket_url(self.settings), query)
            response = await self._call("GET", url, "ListMultipartUploads", prefix)
            page = documents.parse_upload_list(await self._document(response, "ListMultipartUploads", prefix),
                                               self.settings.prefix)
            for upload in page.uploads:
                yield upload
            if page.next_markers is None:
                return
            markers = page.next_markers


def _request_body(body: Body) -> RequestBody:
    if isinstance(body, bytes):
        return BytesBody(body)
    if isinstance(body, str):
        return FileBody(FileRegion(body))
    return FileBody(body)


def _whole(byte_range: ByteRange, length: Any) -> bool:
    """Does ``byte_range`` cover every byte of an object of ``length`` bytes?"""
    first, last = byte_range
    return first == 0 and (last is None or (isinstance(length, int) and last >= length - 1))


def _object_headers(content_type: str | None, metadata: Mapping[str, str] | None) -> dict[str, str]:
    headers = {f"x-amz-meta-{name.lower()}": value for name, value in (metadata or {}).items()}
    for name, value in headers.items():
        # S3 signs and stores metadata as US-ASCII header text.
        if not (name + value).isascii() or not (name + value).isprintable() or not name[11:].strip():
            raise ValueError(f"S3 metadata must be printable ASCII: {name!r}: {value!r}")
    if content_type:
        headers["Content-Type"] = content_type
    return headers


def _part_query(number: int, upload_id: str) -> Query:
    return [("partNumber", str(number)), ("uploadId", upload_id)]


def _check_part_number(number: int) -> None:
    if not 1 <= number <= MAX_PARTS:
        raise ValueError(f"part numbers run from 1 to {MAX_PARTS}, not {number}")


def _range_header(byte_range: ByteRange) -> str:
    first, last = byte_range
    if first < 0 or (last is not None and last < first):
        raise ValueError(f"not a byte range: {byte_range!r}")
    return f"bytes={first}-{'' if last is None else last}"


def _header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[-1] if values else None


def _etag(response: IResponse) -> str:
    return documents.unquote_etag(_header(response, "etag") or "")


def _object_info(response: IResponse, head: bool = False) -> ObjectInfo:
    # Twisted keeps a GET response's Content-Length out of its headers (it is
    # ``length``); a HEAD response keeps it, and its ``length`` is 0.
    if head or not isinstance(response.length, int):
        size = int(_header(response, "content-length") or 0)
    else:
        size = response.length
    content_range = _header(response, "content-range")
    if content_range and "/" in content_range:
        total = content_range.rpartition("/")[2]
        if total.isdigit():
            size = int(total)
    metadata = {name.decode("latin-1").lower()[len("x-amz-meta-"):]: values[-1].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
                if name.lower().startswith(b"x-amz-meta-")}
    return ObjectInfo(size, _etag(response), documents.http_time(_header(response, "last-modified")), metadata,
                      _header(response, "content-type"))

