"""A small async OCI distribution client for HTTP-level registry tests.

Every request goes through :meth:`Client.request`, which checks the rules
that hold for *every* response of the registry, so that no test can forget
them:

* ``Docker-Distribution-API-Version: registry/2.0`` on successes and errors;
* a 4xx answer (other than to HEAD) carries the OCI error document
  ``{"errors": [{"code", "message", "detail"}]}`` as ``application/json``,
  with codes from the spec's table (distribution-spec v1.1, "Error Codes");
* a JSON body is sent with a Content-Length that matches it, never with
  chunked transfer-encoding; a successful HEAD carries Content-Length and no
  body.

The client writes raw HTTP/1.1 over a Twisted TCP connection (one request
per connection, no redirects, no gzip, nothing normalised), so the registry
sees exactly the request a test wrote, and the test sees exactly the
response the registry sent, framing headers included (Twisted's own client
hides Content-Length and Transfer-Encoding, which these tests check).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterable, Mapping
from urllib.parse import urljoin, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_NONDISTRIBUTABLE_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

EMPTY_JSON = b"{}"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

# distribution-spec v1.1, "Error Codes": "The code field MUST be one of the
# following", plus the legacy Docker codes the spec says clients may meet.
SPEC_ERROR_CODES = frozenset({
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
    "TOOMANYREQUESTS",
})
# PAGINATION_NUMBER_INVALID: distribution's answer to an unusable ``n``.
LEGACY_ERROR_CODES = frozenset({"TAG_INVALID", "MANIFEST_UNVERIFIED", "PAGINATION_NUMBER_INVALID"})

_LINK_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """The OCI digest string of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def descriptor(media_type: str, data: bytes, algorithm: str = "sha256", **extra: Any) -> dict[str, Any]:
    """An OCI descriptor for ``data``."""
    return {"mediaType": media_type, "digest": digest_of(data, algorithm), "size": len(data), **extra}


def encode(document: Mapping[str, Any]) -> bytes:
    """Serialise a manifest the way no canonicaliser would, to prove the
    registry stores the client's exact bytes (3-space indent, trailing newline)."""
    return json.dumps(document, indent=3).encode() + b"\n"


def with_query(url: str, **params: str | Iterable[str]) -> str:
    """Append query parameters to a (possibly already parameterised) URL."""
    from urllib.parse import urlencode

    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        if isinstance(value, str):
            pairs.append((key, value))
        else:
            pairs.extend((key, v) for v in value)
    separator = "&" if "?" in url else "?"
    return url + separator + urlencode(pairs, safe=":/")


@attrs.frozen
class Reply:
    """One HTTP response, fully read."""

    method: str
    url: str
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return None if values is None else ", ".join(values)

    @property
    def location(self) -> str:
        """The Location header, which the test needs to go on."""
        location = self.header("Location")
        assert location, f"no Location header\n{self}"
        return location

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def codes(self) -> list[str]:
        """The error codes of an OCI error document."""
        return [error["code"] for error in self.json()["errors"]]

    @property
    def next_link(self) -> str | None:
        """The target of a ``Link: <...>; rel="next"`` header, if any."""
        link = self.header("Link")
        if link is None:
            return None
        match = _LINK_NEXT.search(link)
        return match.group(1) if match else None

    def __str__(self) -> str:
        headers = "\n".join(f"  {k}: {', '.join(v)}" for k, v in sorted(self.headers.items()))
        body = self.body[:600]
        return f"{self.method} {self.url} -> {self.status}\n{headers}\n  body: {body!r}"


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _is_json(content_type: str | None) -> bool:
    media_type = _media_type(content_type)
    return media_type == "application/json" or media_type.endswith("+json")


def check_universal(reply: Reply) -> None:
    """The rules every registry response must follow (see module docstring)."""
    assert reply.header("Docker-Distribution-API-Version") == "registry/2.0", (
        f"missing Docker-Distribution-API-Version: registry/2.0\n{reply}"
    )
    chunked = "chunked" in (reply.header("Transfer-Encoding") or "").lower()
    if reply.method == "HEAD":
        assert reply.body == b"", f"HEAD answered with a body\n{reply}"
        if reply.status == 200:
            assert reply.header("Content-Length") is not None, f"HEAD 200 without Content-Length\n{reply}"
        return
    if 400 <= reply.status < 500:
        assert _media_type(reply.header("Content-Type")) == "application/json", (
            f"error without application/json Content-Type\n{reply}"
        )
        check_error_document(reply)
    if _is_json(reply.header("Content-Type")) and reply.status != 204:
        assert not chunked, f"JSON response sent with chunked transfer-encoding\n{reply}"
        assert reply.header("Content-Length") == str(len(reply.body)), (
            f"JSON response without a matching Content-Length\n{reply}"
        )


def check_error_document(reply: Reply) -> None:
    """distribution-spec v1.1, "Error Codes": the JSON error body format."""
    try:
        document = reply.json()
    except ValueError:
        raise AssertionError(f"error body is not JSON\n{reply}") from None
    assert isinstance(document, dict) and isinstance(document.get("errors"), list), (
        f"error body is not {{\"errors\": [...]}}\n{reply}"
    )
    assert document["errors"], f"error document with an empty errors list\n{reply}"
    for error in document["errors"]:
        assert isinstance(error, dict), f"error entry is not an object\n{reply}"
        code = error.get("code")
        assert isinstance(code, str) and re.fullmatch(r"[A-Z_]+", code), f"bad error code {code!r}\n{reply}"
        assert code in SPEC_ERROR_CODES | LEGACY_ERROR_CODES, f"code {code!r} is not in the spec's table\n{reply}"
        if "message" in error:
            assert isinstance(error["message"], str), f"message is not a string\n{reply}"


class Client:
    """Talks to one registry; paths are relative to its base URL."""

    def __init__(self, base_url: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.base_url = base_url.rstrip("/")
        self._reactor = reactor
        self._timeout = 30.0

    def absolute(self, path_or_url: str) -> str:
        """Resolve a path, or a Location that may be relative or absolute.

        An absolute path is used verbatim: dot segments and empty segments
        must reach the registry as written (urljoin would resolve them).
        """
        if path_or_url.startswith("/") and not path_or_url.startswith("//"):
            return self.base_url + path_or_url
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path_or_url):
            return path_or_url
        return urljoin(self.base_url + "/", path_or_url)

    def path_of(self, location: str) -> str:
        """The path (and query) of a Location, whatever its form."""
        parts = urlsplit(self.absolute(location))
        return parts.path + (f"?{parts.query}" if parts.query else "")

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> Reply:
        """Send one request exactly as written; read the response to the end.

        ``body`` None sends no body and no Content-Length (except for PUT and
        POST, which get ``Content-Length: 0`` as RFC 9110 asks).
        """
        url = self.absolute(path)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body is not None or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body or b'')}")
        raw = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")
        assert parts.hostname and parts.port, url
        endpoint = TCP4ClientEndpoint(self._reactor, parts.hostname, parts.port, timeout=10)
        protocol = await connectProtocol(endpoint, _Exchange(raw))
        timer = self._reactor.callLater(self._timeout, protocol.transport.abortConnection)  # type: ignore[union-attr]
        try:
            data = await protocol.finished
        finally:
            if timer.active():
                timer.cancel()
        reply = _parse_response(method, url, data)
        if check:
            check_universal(reply)
        return reply

    async def send_truncated(
        self, method: str, path: str, prefix: bytes, declared_length: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Announce ``declared_length`` body bytes, send only ``prefix``, then
        drop the connection: a client that lost its network mid-upload."""
        from twisted.internet.task import deferLater

        url = self.absolute(path)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {declared_length}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        raw = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + prefix
        assert parts.hostname and parts.port, url
        endpoint = TCP4ClientEndpoint(self._reactor, parts.hostname, parts.port, timeout=10)
        protocol = await connectProtocol(endpoint, _Exchange(raw))
        # Let the server take the prefix in, then vanish; then give it a moment
        # to notice, so that the next request sees the state after the loss.
        await deferLater(self._reactor, 0.1, lambda: None)
        protocol.transport.abortConnection()  # type: ignore[union-attr]
        await protocol.finished
        await deferLater(self._reactor, 0.1, lambda: None)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def head(self, path: str, **kw: Any) -> Reply:
        return await self.request("HEAD", path, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)

    async def post(self, path: str, body: bytes | None = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body=body, **kw)

    async def put(self, path: str, body: bytes | None = None, **kw: Any) -> Reply:
        return await self.request("PUT", path, body=body, **kw)

    async def patch(self, path: str, body: bytes | None = None, **kw: Any) -> Reply:
        return await self.request("PATCH", path, body=body, **kw)

    # -- building blocks for setting a registry up ---------------------------

    async def start_upload(self, repo: str) -> str:
        """POST an upload session; return its Location."""
        reply = await self.post(f"/v2/{repo}/blobs/uploads/", b"")
        assert reply.status == 202, str(reply)
        location = reply.header("Location")
        assert location, str(reply)
        return location

    async def push_blob(self, repo: str, data: bytes, algorithm: str = "sha256") -> str:
        """Push a blob with POST then PUT (the one way every registry supports)."""
        location = await self.start_upload(repo)
        digest = digest_of(data, algorithm)
        reply = await self.put(
            with_query(location, digest=digest), data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert reply.status == 201, str(reply)
        return digest

    async def push_manifest(self, repo: str, reference: str, body: bytes, media_type: str | None) -> Reply:
        headers = {} if media_type is None else {"Content-Type": media_type}
        return await self.put(f"/v2/{repo}/manifests/{reference}", body, headers=headers)

    async def push_image(
        self,
        repo: str,
        reference: str | None = None,
        *,
        seed: str = "",
        config_media_type: str = OCI_CONFIG,
        artifact_type: str | None = None,
        subject: Mapping[str, Any] | None = None,
        annotations: Mapping[str, str] | None = None,
        algorithm: str = "sha256",
    ) -> "Image":
        """Push a config and a layer, then an OCI image manifest referencing them.

        ``reference`` defaults to the manifest's digest (an untagged push).
        """
        config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
        layer = f"layer of {repo} {seed}".encode() * 3
        await self.push_blob(repo, config, algorithm)
        await self.push_blob(repo, layer, algorithm)
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(config_media_type, config, algorithm),
            "layers": [descriptor(OCI_LAYER, layer, algorithm)],
        }
        if artifact_type is not None:
            document["artifactType"] = artifact_type
        if subject is not None:
            document["subject"] = dict(subject)
        if annotations is not None:
            document["annotations"] = dict(annotations)
        body = encode(document)
        digest = digest_of(body, algorithm)
        reply = await self.push_manifest(repo, reference or digest, body, OCI_MANIFEST)
        assert reply.status == 201, str(reply)
        return Image(body=body, digest=digest, media_type=OCI_MANIFEST, reply=reply, blobs=[config, layer])

    async def push_index(
        self,
        repo: str,
        children: list["Image"],
        reference: str | None = None,
        *,
        media_type: str = OCI_INDEX,
        artifact_type: str | None = None,
        subject: Mapping[str, Any] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> "Image":
        """Push an image index (or Docker manifest list) over pushed children."""
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                dict(child.descriptor(), platform={"architecture": f"arch{i}", "os": "linux"})
                for i, child in enumerate(children)
            ],
        }
        if artifact_type is not None:
            document["artifactType"] = artifact_type
        if subject is not None:
            document["subject"] = dict(subject)
        if annotations is not None:
            document["annotations"] = dict(annotations)
        body = encode(document)
        digest = digest_of(body)
        reply = await self.push_manifest(repo, reference or digest, body, media_type)
        assert reply.status == 201, str(reply)
        return Image(body=body, digest=digest, media_type=media_type, reply=reply, blobs=[])


class _Exchange(Protocol):
    """Writes one request, collects everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._chunks: list[bytes] = []
        self.finished: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.finished.callback(b"".join(self._chunks))


def _dechunk(data: bytes) -> bytes:
    """Decode a chunked body (RFC 9112 §7.1); fail on a truncated one."""
    body = b""
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "truncated chunked body"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body += data[:size]
        assert data[size:size + 2] == b"\r\n", "malformed chunk"
        data = data[size + 2:]


def _parse_response(method: str, url: str, data: bytes) -> Reply:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"{method} {url}: incomplete response {data[:300]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", f"{method} {url}: bad status line {status_line!r}"
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    code = int(status)
    te = ", ".join(headers.get("transfer-encoding", [])).lower()
    if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
        # No body may follow; anything after the head is a protocol error.
        assert rest == b"", f"{method} {url} -> {code}: bytes after a bodiless response: {rest[:200]!r}"
        body = b""
    elif "chunked" in te:
        body = _dechunk(rest)
    elif "content-length" in headers:
        length = int(headers["content-length"][-1])
        assert len(rest) == length, (
            f"{method} {url} -> {code}: Content-Length {length} but {len(rest)} bytes sent"
        )
        body = rest
    else:
        body = rest
    return Reply(method=method, url=url, status=code, headers=headers, body=body)


@attrs.frozen
class Image:
    """A manifest that was pushed: its exact bytes, digest and media type."""

    body: bytes
    digest: str
    media_type: str
    reply: Reply
    blobs: list[bytes]

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.body)}


def snapshot(data_dir: str, ignore_uploads: bool = False) -> dict[str, str]:
    """Everything under ``data_dir``: relative path -> content hash ("dir" for dirs).

    ``tmp`` directories (files being written before their rename) are
    ignored; with ``ignore_uploads`` the upload-session area too, for requests
    that may legitimately end or reset a session.
    """
    result: dict[str, str] = {}
    for root, dirs, files in os.walk(data_dir):
        relative_root = os.path.relpath(root, data_dir)
        skip = {"tmp", "temp", ".tmp"}
        if relative_root == "." and ignore_uploads:
            skip.add("uploads")
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for d in dirs:
            result[os.path.normpath(os.path.join(relative_root, d))] = "dir"
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as handle:
                result[os.path.normpath(os.path.join(relative_root, f))] = hashlib.sha256(handle.read()).hexdigest()
    return result
