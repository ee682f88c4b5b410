"""The XML documents S3 sends and takes, as small typed values.

Element names are matched without their namespace: AWS puts results in
``http://s3.amazonaws.com/doc/2006-03-01/``, error documents in none, and
compatible stores vary. A document that is not XML raises S3Unavailable:
the endpoint (or something in front of it) is not speaking S3.
"""
from __future__ import annotations

import datetime
import email.utils
from typing import Iterable
from xml.etree import ElementTree

import attrs

from registryd.storage.s3.errors import S3Unavailable

_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@attrs.frozen
class ObjectInfo:
    """What a HEAD or GET tells about an object."""

    size: int
    etag: str
    last_modified: float | None
    metadata: dict[str, str] = attrs.field(factory=dict)
    content_type: str | None = None


@attrs.frozen
class ObjectEntry:
    """One key in a listing; ``is_prefix`` for a common prefix (with a delimiter)."""

    key: str
    size: int = 0
    last_modified: float | None = None
    etag: str = ""
    is_prefix: bool = False


@attrs.frozen
class Part:
    """A part of a multipart upload: its number (1-10000) and ETag."""

    number: int
    etag: str
    size: int = 0


@attrs.frozen
class UploadInfo:
    """An unfinished multipart upload."""

    key: str
    upload_id: str
    initiated: float | None = None


@attrs.frozen
class ObjectListPage:
    entries: list[ObjectEntry]
    next_token: str | None


@attrs.frozen
class PartListPage:
    parts: list[Part]
    next_marker: str | None


@attrs.frozen
class UploadListPage:
    uploads: list[UploadInfo]
    next_markers: tuple[str, str] | None


@attrs.frozen
class DeleteFailure:
    key: str
    code: str
    message: str


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse(body: bytes) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise S3Unavailable(f"S3 endpoint sent a document that is not XML ({e}): {body[:120]!r}") from None


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ElementTree.Element, name: str, default: str = "") -> str:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return default


def _int(element: ElementTree.Element, name: str) -> int:
    try:
        return int(_text(element, name, "0"))
    except ValueError:
        return 0


def _truncated(element: ElementTree.Element) -> bool:
    return _text(element, "IsTruncated").strip().lower() == "true"


def unquote_etag(etag: str) -> str:
    return etag.strip().strip('"')


def iso_time(text: str) -> float | None:
    """``2026-11-23T14:48:25.585Z`` -> POSIX seconds."""
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def http_time(text: str | None) -> float | None:
    """An HTTP date (``Last-Modified``) -> POSIX seconds."""
    if not text:
        return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


def parse_error(body: bytes) -> tuple[str, str] | None:
    """``(code, message)`` of an ``<Error>`` document, or None if it is not one."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    if _local(root.tag) != "Error":
        return None
    return _text(root, "Code"), _text(root, "Message")


def parse_upload_id(body: bytes) -> str:
    upload_id = _text(parse(body), "UploadId")
    if not upload_id:
        raise S3Unavailable("S3 endpoint sent no UploadId for a new multipart upload")
    return upload_id


def parse_etag(body: bytes) -> str:
    """The ETag of a CopyObjectResult, CopyPartResult or CompleteMultipartUploadResult."""
    return unquote_etag(_text(parse(body), "ETag"))


def parse_object_list(body: bytes, strip: str) -> ObjectListPage:
    """A ListObjectsV2 page; ``strip`` (our prefix) is removed from every key."""
    root = parse(body)
    entries = []
    for item in _children(root, "Contents"):
        entries.append(ObjectEntry(_text(item, "Key")[len(strip):], _int(item, "Size"),
                                   iso_time(_text(item, "LastModified")), unquote_etag(_text(item, "ETag"))))
    for item in _children(root, "CommonPrefixes"):
        entries.append(ObjectEntry(_text(item, "Prefix")[len(strip):], is_prefix=True))
    token = _text(root, "NextContinuationToken") or None
    return ObjectListPage(entries, token if _truncated(root) else None)


def parse_part_list(body: bytes) -> PartListPage:
    root = parse(body)
    parts = [Part(_int(item, "PartNumber"), unquote_etag(_text(item, "ETag")), _int(item, "Size"))
             for item in _children(root, "Part")]
    marker = _text(root, "NextPartNumberMarker") or None
    return PartListPage(parts, marker if _truncated(root) else None)


def parse_upload_list(body: bytes, strip: str) -> UploadListPage:
    root = parse(body)
    uploads = [UploadInfo(_text(item, "Key")[len(strip):], _text(item, "UploadId"),
                          iso_time(_text(item, "Initiated")))
               for item in _children(root, "Upload")]
    markers = (_text(root, "NextKeyMarker"), _text(root, "NextUploadIdMarker"))
    return UploadListPage(uploads, markers if _truncated(root) and markers[0] else None)


def parse_delete_result(body: bytes, strip: str) -> list[DeleteFailure]:
    return [DeleteFailure(_text(item, "Key")[len(strip):], _text(item, "Code"), _text(item, "Message"))
            for item in _children(parse(body), "Error")]


def _document(root: str, children: Iterable[ElementTree.Element]) -> bytes:
    element = ElementTree.Element(root, xmlns=_NS)
    element.extend(children)
    return ElementTree.tostring(element, encoding="utf-8", xml_declaration=True)


def _element(name: str, text: str | None = None, children: Iterable[ElementTree.Element] = ()) -> ElementTree.Element:
    element = ElementTree.Element(name)
    element.text = text
    element.extend(children)
    return element


def delete_document(keys: Iterable[str]) -> bytes:
    """A quiet DeleteObjects request: only failures come back."""
    objects = [_element("Object", children=[_element("Key", key)]) for key in keys]
    return _document("Delete", [_element("Quiet", "true"), *objects])


def complete_document(parts: Iterable[Part]) -> bytes:
    items = [_element("Part", children=[_element("PartNumber", str(part.number)),
                                        _element("ETag", f'"{part.etag}"')])
             for part in sorted(parts, key=lambda p: p.number)]
    return _document("CompleteMultipartUpload", items)


def bucket_document(region: str) -> bytes | None:
    """CreateBucket's body: none for us-east-1, which refuses to be named."""
    if region == "us-east-1":
        return None
    return _document("CreateBucketConfiguration", [_element("LocationConstraint", region)])
