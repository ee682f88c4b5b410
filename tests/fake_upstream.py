"""A fault-injecting fake upstream registry, in-process on the test reactor.

It serves ``/v2/``, manifests (by tag and digest, with Content-Type and
Docker-Content-Digest), blobs (with single-range ``Range`` support) and tag
lists from in-memory dicts a test fills, and it misbehaves on demand, per
request path::

    @pytest_twisted.ensureDeferred
    async def test_resume(fake_upstream):
        image = fake_upstream.add_image("lib/app", "v1", layer_sizes=[100_000])
        layer = fake_upstream.blob_path("lib/app", image["layers"][0]["digest"])
        fake_upstream.drop_after(layer, 1000, times=1)   # first GET dies after 1000 bytes
        ...                                              # registryd pulls through fake_upstream.url
        assert fake_upstream.count("GET", layer) == 2

Faults (each takes ``times=N`` to apply to the next N requests only, else
it lasts until ``recover(path)``):

* ``drop_after(path, n)``: full Content-Length, ``n`` body bytes, then the
  connection is closed (after the ``n`` bytes are flushed);
* ``wrong_bytes(path)``: right length and Docker-Content-Digest, but the
  last body byte is flipped, so only a digest check at the end notices;
* ``stall_after(path, n)``: ``n`` bytes, then silence with the connection
  open, until ``release_stalled(path)`` sends the rest or ``close()``;
  ``chunked=True`` sends no Content-Length (a chunked body, whose end only
  its last chunk marks), so even all the bytes can wait for their end;
* ``status(path, 429|503|..., retry_after=...)``: an OCI error document
  with that status (and ``Retry-After`` when given), for GET and HEAD;
* ``slow(path, bytes_per_tick, tick=0.01)``: the body dripped in pieces,
  so a downstream's first byte can arrive before the fake is done;
* ``redirect(path, location, code=307)``: a redirect to ``location`` (any
  text: another fake's URL, ``file:///etc/passwd``), for GET and HEAD;
* ``serve(path, body, content_type)``: that body with status 200 instead
  of what the path holds (a hostile tag list, manifest or token).

``challenge(header)`` makes every ``/v2/`` request without an
``Authorization`` header answer 401 with ``WWW-Authenticate: header``.
``GET /token`` answers ``{"token": "fake-token"}`` (a token service).
``start(interface="127.0.0.2")`` listens on another loopback address: a
second fake there is "another host" to the first; ``start(tls=options)``
speaks TLS with those CertificateOptions (``url`` is then https://), and
each SeenRequest says whether the client offered a certificate.

Body faults do not apply to HEAD (there is no body); status does.
Requests are counted per (method, path), the query string left out, before
any fault applies: ``count(method, path)``; ``requests`` keeps each one with
its headers; ``await fake.wait_for(method, path, n)`` waits for the n-th.

Everything here runs on the reactor: talk to it only asynchronously (treq,
registryd in-process), never with blocking HTTP from the test.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Iterable, Iterator

import attrs
import pytest
import pytest_twisted
from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.protocols.policies import WrappingFactory
from twisted.web.server import Site

from upstreams import build_image, sha256_digest

ERROR_CODES = {400: "UNKNOWN", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN",
               429: "TOOMANYREQUESTS", 500: "UNKNOWN", 502: "UNKNOWN", 503: "UNAVAILABLE"}

_BLOB = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+)$")
_MANIFEST = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<reference>[^/]+)$")
_TAGS = re.compile(r"^/v2/(?P<repo>.+)/tags/list$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@attrs.define
class Fault:
    """What to do to the next requests for one path."""

    kind: str                       # drop_after | wrong_bytes | stall_after | status | slow | redirect | serve
    n_bytes: int = 0
    status: int = 0
    retry_after: str | None = None
    bytes_per_tick: int = 0
    tick: float = 0.01
    times: int | None = None        # None: until recover()
    location: str = ""
    body: bytes = b""
    content_type: str = ""
    chunked: bool = False           # no Content-Length: the body's end is its last chunk


@attrs.frozen
class SeenRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]   # lower-cased names, last value wins
    client_certificate: bool = False   # over TLS: the client presented one


@attrs.define
class _Stalled:
    request: Any
    rest: bytes
    done: Deferred[None]


class _Tracking(WrappingFactory):
    """Remembers the open connections, so close() can cut them and wait."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._all_gone: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._all_gone = self._all_gone, []
            for d in waiting:
                d.callback(None)

    def cut_all(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_gone.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


@attrs.define(slots=False)
class FakeUpstream:
    """The fake registry; ``start()`` listens on 127.0.0.1:0 (see module docstring)."""

    reactor: Any
    blobs: dict[tuple[str, str], bytes] = attrs.field(factory=dict)        # (repo, digest)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = attrs.field(factory=dict)  # (repo, digest)
    tags: dict[tuple[str, str], str] = attrs.field(factory=dict)           # (repo, tag) -> digest
    faults: dict[str, Fault] = attrs.field(factory=dict)
    counts: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    requests: list[SeenRequest] = attrs.field(factory=list)
    port: int = 0
    interface: str = "127.0.0.1"
    scheme: str = "http"
    auth_challenge: str | None = None
    _listening: Any = None
    _factory: Any = None
    _stalled: dict[str, list[_Stalled]] = attrs.field(factory=dict)
    _waiters: list[tuple[str | None, str, int, Deferred[None]]] = attrs.field(factory=list)

    app = Klein()

    # -- lifecycle -------------------------------------------------------------

    def start(self, interface: str = "127.0.0.1", tls: Any = None) -> FakeUpstream:
        site = Site(self.app.resource())
        site.displayTracebacks = False
        self._factory = _Tracking(site)
        self.interface = interface
        if tls is not None:
            self.scheme = "https"
            self._listening = self.reactor.listenSSL(0, self._factory, tls, interface=interface)
        else:
            self._listening = self.reactor.listenTCP(0, self._factory, interface=interface)
        self.port = self._listening.getHost().port
        return self

    def close(self) -> Deferred[Any]:
        """Stop listening and cut every open connection (stalled ones too)."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        await self._listening.stopListening()
        await self._factory.cut_all()

    @property
    def host(self) -> str:
        return f"{self.interface}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    # -- content ---------------------------------------------------------------

    @staticmethod
    def blob_path(repo: str, digest: str) -> str:
        return f"/v2/{repo}/blobs/{digest}"

    @staticmethod
    def manifest_path(repo: str, reference: str) -> str:
        return f"/v2/{repo}/manifests/{reference}"

    def add_blob(self, repo: str, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[(repo, digest)] = data
        return digest

    def add_manifest(self, repo: str, body: bytes, media_type: str, tag: str | None = None) -> str:
        digest = sha256_digest(body)
        self.manifests[(repo, digest)] = (media_type, body)
        if tag is not None:
            self.tags[(repo, tag)] = digest
        return digest

    def add_image(self, repo: str, tag: str | None = "latest", layer_sizes: Iterable[int] = (1024,),
                  seed: int | str | None = None, docker: bool = False) -> dict[str, Any]:
        """Store a synthetic image (upstreams.build_image); returns its dict.

        The layers are held in memory here: keep them to a few MiB.
        """
        image = build_image(layer_sizes, seed, docker)
        for layer in image["layers"]:
            self.add_blob(repo, layer["blob"].data())
        self.add_blob(repo, image["config"]["blob"])
        self.add_manifest(repo, image["manifest"], image["media_type"], tag)
        image.update(repo=repo, tag=tag)
        return image

    # -- faults ----------------------------------------------------------------

    def drop_after(self, path: str, n_bytes: int, times: int | None = None) -> None:
        self.faults[path] = Fault("drop_after", n_bytes=n_bytes, times=times)

    def wrong_bytes(self, path: str, times: int | None = None) -> None:
        self.faults[path] = Fault("wrong_bytes", times=times)

    def stall_after(self, path: str, n_bytes: int, times: int | None = None, chunked: bool = False) -> None:
        self.faults[path] = Fault("stall_after", n_bytes=n_bytes, times=times, chunked=chunked)

    def status(self, path: str, code: int, retry_after: int | str | None = None,
               times: int | None = None) -> None:
        self.faults[path] = Fault("status", status=code,
                                  retry_after=None if retry_after is None else str(retry_after), times=times)

    def slow(self, path: str, bytes_per_tick: int, tick: float = 0.01, times: int | None = None) -> None:
        self.faults[path] = Fault("slow", bytes_per_tick=max(1, bytes_per_tick), tick=tick, times=times)

    def redirect(self, path: str, location: str, code: int = 307, times: int | None = None) -> None:
        self.faults[path] = Fault("redirect", status=code, location=location, times=times)

    def serve(self, path: str, body: bytes, content_type: str = "application/json",
              times: int | None = None) -> None:
        self.faults[path] = Fault("serve", body=body, content_type=content_type, times=times)

    def challenge(self, header: str | None) -> None:
        """Answer 401 with ``WWW-Authenticate: header`` to /v2/ requests without credentials (None: stop)."""
        self.auth_challenge = header

    def recover(self, path: str | None = None) -> None:
        """Clear the fault on ``path`` (every fault when None). Stalled
        responses stay stalled: ``release_stalled`` finishes them."""
        if path is None:
            self.faults.clear()
        else:
            self.faults.pop(path, None)

    def release_stalled(self, path: str | None = None) -> int:
        """Send the rest of every response stalled on ``path`` (or all); returns how many."""
        paths = list(self._stalled) if path is None else [path]
        released = 0
        for p in paths:
            for stalled in self._stalled.pop(p, []):
                if not stalled.done.called:
                    stalled.request.write(stalled.rest)
                    stalled.done.callback(None)
                    released += 1
        return released

    def stalled(self, path: str | None = None) -> int:
        """How many responses are stalled now (on ``path``, or anywhere)."""
        if path is None:
            return sum(len(v) for v in self._stalled.values())
        return len(self._stalled.get(path, []))

    def _take_fault(self, path: str) -> Fault | None:
        fault = self.faults.get(path)
        if fault is not None and fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[path]
        return fault

    # -- counting --------------------------------------------------------------

    def count(self, method: str | None, path: str) -> int:
        """Requests seen for exactly ``path`` (no query) with ``method`` (None: any)."""
        if method is None:
            return sum(n for (_, p), n in self.counts.items() if p == path)
        return self.counts[(method.upper(), path)]

    def wait_for(self, method: str | None, path: str, n: int = 1) -> Deferred[None]:
        """A Deferred that fires once ``count(method, path) >= n``."""
        if self.count(method, path) >= n:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((method, path, n, d))
        return d

    def _record(self, request: Any) -> tuple[str, str]:
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8", "replace")
        query = request.uri.decode("utf-8", "replace").partition("?")[2]
        headers = {k.decode("latin-1").lower(): v[-1].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.counts[(method, path)] += 1
        peer = getattr(request.channel.transport, "getPeerCertificate", None)
        self.requests.append(SeenRequest(method, path, query, headers, peer is not None and peer() is not None))
        for waiter in list(self._waiters):
            w_method, w_path, w_n, d = waiter
            if self.count(w_method, w_path) >= w_n:
                self._waiters.remove(waiter)
                d.callback(None)
        return method, path

    # -- the app ---------------------------------------------------------------

    def _json(self, request: Any, status: int, document: Any, extra: dict[str, str] | None = None) -> bytes:
        body = json.dumps(document).encode()
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        for name, value in (extra or {}).items():
            request.setHeader(name.encode(), value.encode())
        return b"" if request.method == b"HEAD" else body

    def _error(self, request: Any, status: int, code: str, message: str,
               extra: dict[str, str] | None = None) -> bytes:
        return self._json(request, status, {"errors": [{"code": code, "message": message, "detail": None}]},
                          extra)

    @app.route("/token", methods=["GET"])
    def token(self, request: Any) -> Any:
        self._record(request)
        return self._json(request, 200, {"token": "fake-token", "expires_in": 300})

    @app.route("/v2/", methods=["GET", "HEAD"])
    @app.route("/v2/<path:rest>", methods=["GET", "HEAD"])
    def v2(self, request: Any, rest: str = "") -> Any:
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        _, path = self._record(request)
        if self.auth_challenge is not None and not request.getHeader(b"Authorization"):
            return self._error(request, 401, "UNAUTHORIZED", "authentication required",
                               {"WWW-Authenticate": self.auth_challenge})
        fault = self._take_fault(path)
        if fault is not None and fault.kind == "redirect":
            request.setResponseCode(fault.status)
            request.setHeader(b"Location", fault.location.encode("latin-1"))
            request.setHeader(b"Content-Length", b"0")
            return b""
        if fault is not None and fault.kind == "serve":
            request.setHeader(b"Content-Type", fault.content_type.encode())
            return self._body(request, path, fault.body, None)
        if fault is not None and fault.kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            code = ERROR_CODES.get(fault.status, "UNKNOWN")
            return self._error(request, fault.status, code, f"injected {fault.status}", extra)
        if path == "/v2/":
            return self._json(request, 200, {})
        if m := _BLOB.match(path):
            data = self.blobs.get((m["repo"], m["digest"]))
            if data is None:
                return self._error(request, 404, "BLOB_UNKNOWN", "blob unknown to registry")
            request.setHeader(b"Docker-Content-Digest", m["digest"].encode())
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Accept-Ranges", b"bytes")
            body = data
            wanted = _RANGE.match(request.getHeader(b"Range").decode() if request.getHeader(b"Range") else "")
            if wanted:
                start = int(wanted[1])
                end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
                if start >= len(data) or end < start:
                    request.setHeader(b"Content-Range", f"bytes */{len(data)}".encode())
                    return self._error(request, 416, "UNKNOWN", "range not satisfiable")
                request.setResponseCode(206)
                request.setHeader(b"Content-Range", f"bytes {start}-{end}/{len(data)}".encode())
                body = data[start:end + 1]
            return self._body(request, path, body, fault)
        if m := _MANIFEST.match(path):
            repo, reference = m["repo"], m["reference"]
            digest = reference if ":" in reference else self.tags.get((repo, reference))
            found = self.manifests.get((repo, digest)) if digest else None
            if found is None:
                return self._error(request, 404, "MANIFEST_UNKNOWN", "manifest unknown")
            media_type, body = found
            request.setHeader(b"Content-Type", media_type.encode())
            request.setHeader(b"Docker-Content-Digest", digest.encode())  # type: ignore[union-attr]
            return self._body(request, path, body, fault)
        if m := _TAGS.match(path):
            names = sorted(tag for (repo, tag) in self.tags if repo == m["repo"])
            if not names:
                return self._error(request, 404, "NAME_UNKNOWN", "repository name not known to registry")
            return self._json(request, 200, {"name": m["repo"], "tags": names})
        return self._error(request, 404, "NAME_UNKNOWN", "not found")

    def _body(self, request: Any, path: str, body: bytes, fault: Fault | None) -> Any:
        if fault is None or not fault.chunked or request.method == b"HEAD":
            request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method == b"HEAD" or fault is None:
            return b"" if request.method == b"HEAD" else body
        if fault.kind == "wrong_bytes":
            return body[:-1] + bytes([body[-1] ^ 0xFF]) if body else body
        if fault.kind == "drop_after":
            request.write(body[:fault.n_bytes])
            # Request.loseConnection, which unregisters the channel as the
            # transport's producer (else a paused channel keeps the transport
            # open forever), and not abortConnection: the n bytes go out first.
            request.loseConnection()
            return Deferred()   # Klein cancels it when the connection is gone
        if fault.kind == "stall_after":
            request.write(body[:fault.n_bytes])
            stalled = _Stalled(request, body[fault.n_bytes:], Deferred(lambda d: self._unstall(path, d)))
            self._stalled.setdefault(path, []).append(stalled)
            return stalled.done
        if fault.kind == "slow":
            return self._drip(request, body, fault)
        raise AssertionError(f"unknown fault {fault.kind}")

    def _unstall(self, path: str, done: Deferred[None]) -> None:
        self._stalled[path] = [s for s in self._stalled.get(path, []) if s.done is not done]

    def _drip(self, request: Any, body: bytes, fault: Fault) -> Deferred[None]:
        pieces: Iterator[bytes] = (body[i:i + fault.bytes_per_tick]
                                   for i in range(0, len(body), fault.bytes_per_tick))
        pending: list[Any] = [None]   # the next tick's DelayedCall
        done: Deferred[None] = Deferred(
            lambda d: pending[0].cancel() if pending[0] is not None and pending[0].active() else None)

        def tick() -> None:
            piece = next(pieces, None)
            if piece is None:
                done.callback(None)
                return
            request.write(piece)
            pending[0] = self.reactor.callLater(fault.tick, tick)

        tick()
        return done


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A started FakeUpstream on the pytest-twisted reactor, closed at teardown."""
    from twisted.internet import reactor

    fake = FakeUpstream(reactor).start()
    yield fake
    pytest_twisted.blockon(fake.close())
