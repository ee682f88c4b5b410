"""What every handler of the API answers with: query and header values read
safely, JSON and empty responses, pagination, blob headers, and the two
ways a response can end badly (a 503 for a store that cannot serve, or a
cut connection once a body has begun)."""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes, urlencode

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from registryd.errors import RegistryError, pagination_invalid, unsupported
from registryd.storage.outage import RETRY_AFTER
from registryd.web.request import RegistryRequest

log = Logger()

_PAGE_SIZE = re.compile(r"[0-9]{1,9}")
_NOT_READY = "storage is not ready; the server log says why"
_NO_ANSWER = re.compile(r"(?:did not answer|no answer) within (\d[\d.]*s)")


def public_readiness_reason(problem: str) -> str:
    """Why /readyz fails, told to anyone: the kind of trouble, never its details."""
    if not problem.startswith("object store"):
        return _NOT_READY
    if "does not exist" in problem:
        return "object store: the bucket does not exist; the server log says more"
    if "credentials" in problem:
        return "object store: it refuses this node's credentials; the server log says more"
    late = _NO_ANSWER.search(problem)
    if late is not None:
        return f"object store: no answer within {late[1]}"
    return "object store: unreachable or failing; the server log says more"


def query_arg(request: RegistryRequest, key: str) -> str | None:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(key.encode())
    return values[0].decode("utf-8", "replace") if values else None


def query_args(request: RegistryRequest, key: str) -> list[str]:
    args: dict[bytes, list[bytes]] = request.args or {}
    return [v.decode("utf-8", "replace") for v in args.get(key.encode(), [])]


def header_text(request: RegistryRequest, name: str) -> str | None:
    """A request header as text. Latin-1 never fails: a client's stray byte is
    then just an unknown value, not a UnicodeDecodeError."""
    value = request.getHeader(name.encode())
    return None if value is None else value.decode("latin-1")


def respond(request: RegistryRequest, status: int, headers: dict[str, str] | None = None,
             body: bytes = b"", content_type: str | None = None) -> bytes:
    request.setResponseCode(status)
    for key, value in (headers or {}).items():
        request.setHeader(key, value)
    if content_type is not None:
        request.setHeader("Content-Type", content_type)
    request.setHeader("Content-Length", str(len(body)))
    return body


def respond_json(request: RegistryRequest, status: int, document: Any, headers: dict[str, str] | None = None,
          content_type: str = "application/json") -> bytes:
    body = json.dumps(document, separators=(",", ":")).encode()
    return respond(request, status, headers, body, content_type)


def page_size(request: RegistryRequest) -> int | None:
    text = query_arg(request, "n")
    if text is None or text == "":
        return None
    if not _PAGE_SIZE.fullmatch(text):
        raise pagination_invalid(text[:20])
    return int(text)


def paginate(request: RegistryRequest, items: list[str], base: str) -> tuple[list[str], dict[str, str]]:
    """Apply ``last`` and ``n``; add the spec's ``Link`` header when more remain."""
    last = query_arg(request, "last")
    if last:
        items = [item for item in items if item > last]
    n = page_size(request)
    if n is None or len(items) <= n:
        return items, {}
    page = items[:n]
    headers = {}
    if page:
        query = urlencode({"n": n, "last": page[-1]})
        headers["Link"] = f'<{base}?{query}>; rel="next"'
    return page, headers


def blob_headers(digest: str, length: int | None) -> dict[str, str]:
    headers = {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
        "Content-Type": "application/octet-stream",
    }
    if length is not None:
        headers["Content-Length"] = str(length)
    return headers


class Utf8Paths(Resource):
    """Answers a path that is not UTF-8 once decoded with the OCI error document.

    Klein would answer it with a plain-text 400 and log the decoding error
    as a failure.
    """

    isLeaf = True

    def __init__(self, api: Resource, refuse: Any) -> None:
        super().__init__()
        self._api = api
        self._refuse = refuse

    def render(self, request: Any) -> Any:
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse(request, Failure(unsupported("the request path is not UTF-8", 400)))
        return self._api.render(request)


#: Headers a blob GET sets before its body: not for an error document in its place.
BODY_HEADERS = ("Content-Range", "Docker-Content-Digest", "ETag", "Cache-Control", "Accept-Ranges")


def forget_blob_headers(request: Any) -> None:
    """Drop a blob's headers, set before its body could start: another answer takes its place."""
    for name in BODY_HEADERS:
        request.responseHeaders.removeHeader(name)


def store_unavailable() -> RegistryError:
    """503 for a request the store cannot serve now (down, frozen, bucket gone)."""
    return RegistryError(503, "UNAVAILABLE", "the storage backend is unavailable; try again later",
                         headers={"Retry-After": str(RETRY_AFTER)})


def cut_response(request: Any, why: str) -> Deferred[None] | None:
    """A failure after the body began: abort the connection, write nothing more.

    An error document after the status line, Content-Length and some bytes
    would become part of the blob; a cut connection is a short body every
    client notices (and resumes with Range). Klein finishes nothing: the
    returned Deferred fires once the request has seen its connection go.
    """
    channel = request.channel
    if channel is None:
        return None
    log.warn("{method} {uri}: response cut after {sent} body bytes: {why}", method=request.method.decode("latin-1"),
             uri=request.uri.decode("latin-1"), sent=request.sentLength, why=why)
    lost: Deferred[None] = request.notifyFinish()
    channel.transport.abortConnection()
    return lost.addErrback(lambda _: None)
