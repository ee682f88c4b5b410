"""The pull-through cache: manifests and blobs from upstreams, kept on disk.

Mirrored repositories live under ``mirror/<namespace>/<repository>/`` with
the same layout as local ones; a tag file's mtime is when the upstream last
confirmed it (the TTL clock). Blobs go to the shared content store, so a
base layer is stored once however it arrived; but a blob is linked into (and
so served from) a mirrored repository only once its bytes were fetched from
that upstream repository and verified. A manifest naming a digest, or an
upstream answering ``HEAD`` 200, proves nothing: the store may hold those
bytes for someone else (a private local push).
"""
from __future__ import annotations

import re
import time
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from registryd.config import Config, UpstreamConfig
from registryd.deferreds import Coalescer, Shared
from registryd.digest import Digest, digest_of, is_digest, parse_digest
from registryd.errors import RegistryError, blob_unknown, manifest_unknown
from registryd.json_documents import load_json
from registryd.manifests import MANIFEST_TYPES, parse_manifest
from registryd.metrics import Metrics
from registryd.mirror.client import MANIFEST_ACCEPT, UpstreamClient, UpstreamUnavailable, read_limited
from registryd.mirror.fill import BlobFill
from registryd.mirror.shared_fill import FillClaim, RemoteFill, fill_prefix
from registryd.mirror.shared_manifest import fetch_prefix, once_per_node
from registryd.mirror.routing import Route, Router
from registryd.names import check_tag, is_tag
from registryd.storage import Store
from registryd.storage.interface import RepositoryBackend

log = Logger()


_MAX_TAG_PAGES = 100
#: Tries to join or take one fill whose claim another worker process let go of before it began.
_FILL_ATTEMPTS = 5
_TAG_LIST_LIMIT = 16 * 1024 * 1024
#: File times come from the kernel's coarse clock: a tag written just after a request began may
#: look a few milliseconds older than that.
_MTIME_SLACK = 0.05
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def next_page(response: Any) -> str | None:
    """The path of the next page from a ``Link`` header, kept on the same upstream."""
    for value in response.headers.getRawHeaders(b"link", []):
        match = _LINK_NEXT.search(value.decode("latin-1"))
        if match:
            target = match[1]
            return target if target.startswith("/v2/") else None
    return None


def unavailable(upstream: UpstreamConfig, why: str) -> RegistryError:
    return RegistryError(503, "UNAVAILABLE", f"upstream {upstream.namespace} is unavailable and nothing is "
                                             f"cached: {why}", {"upstream": upstream.namespace})


def offline_miss(upstream: UpstreamConfig, what: str) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN" if what == "manifest" else "BLOB_UNKNOWN",
                         f"{what} is not cached and upstream {upstream.namespace} is offline")


@attrs.define
class UpstreamHealth:
    """When an upstream last answered usefully and last failed (for the status page)."""

    last_success: float | None = None
    last_error: float | None = None
    last_error_message: str = ""
    errors: int = 0


@attrs.frozen
class CachedManifest:
    digest: Digest
    media_type: str
    data: bytes
    stale: bool = False     # a tag past its TTL, served because the upstream is unreachable


#: One upstream transfer: (upstream namespace, repository upstream, digest).
FillKey = tuple[str, str, Digest]


@attrs.frozen
class BlobHead:
    size: int | None
    digest: str


def _media_type(header: bytes | None, data: bytes) -> str | None:
    if header:
        value = header.decode("latin-1").split(";", 1)[0].strip().lower()
        if value in MANIFEST_TYPES:
            return value
    try:
        declared = load_json(data).get("mediaType")
    except (ValueError, AttributeError):
        return None
    return declared if isinstance(declared, str) and declared in MANIFEST_TYPES else None


def _accepts(accept: str | None, media_type: str) -> bool:
    if not accept:
        return True
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return media_type in types or "*/*" in types


class Mirror:
    """One upstream: its client and its part of the store."""

    def __init__(self, config: UpstreamConfig, client: UpstreamClient, repositories: RepositoryBackend) -> None:
        self.config = config
        self.client = client
        self.repositories = repositories


class MirrorCache:
    """Answers reads of mirrored repositories from cache or upstream."""

    def __init__(self, store: Store, config: Config, reactor: Any, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self.clock = clock   # the wall clock that a cached tag's age is measured on (tests move it ahead)
        self.metrics = metrics or Metrics()
        self._config = config
        self._reactor = reactor
        self.router = Router(config.upstreams, config.local_prefixes)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 16
        self.mirrors: dict[str, Mirror] = {}
        for upstream in config.upstreams:
            repositories = store.mirror_repositories(upstream.namespace)
            self.mirrors[upstream.namespace] = Mirror(
                upstream, UpstreamClient(upstream, reactor, self._pool), repositories)
        self.manifest_fetches: Coalescer[CachedManifest] = Coalescer()
        self._manifest_limit = max(config.max_manifest_size, 4 * 1024 * 1024)
        # One per upstream repository and digest: a client joins only the transfer
        # its own route asked for, never another repository's (or user's).
        self.fills: dict[FillKey, BlobFill] = {}
        # Set for a worker process of a node: fills are claimed and followed across processes.
        self.shared_fills = False
        self.fills_started = 0
        self.fill_waiters = 0
        if self.metrics.shared_dir is None:
            self.metrics.fills_in_flight.set_function(lambda: len(self.fills))
        self.health: dict[str, UpstreamHealth] = {u.namespace: UpstreamHealth() for u in config.upstreams}
        # Called with (namespace, message) on every upstream failure.
        self.error_listeners: list[Callable[[str, str], None]] = []

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()

    async def fill_ended(self, digest: Digest) -> None:
        """Wait for the running upstream transfers of ``digest`` (if any, from any
        repository) to be stored or fail."""
        for fill in [fill for key, fill in self.fills.items() if key[2] == digest]:
            await _ended(fill)

    async def settle_fills(self, timeout: float) -> None:
        """Wait until every upstream transfer running now has ended (stored, or failed), for at
        most ``timeout`` seconds: a stop must not cut a fill whose clients already have it all.

        A client reads a blob to its Content-Length and leaves while its fill
        is still putting the blob into the store (an S3 PUT takes a while).
        """
        running = [Deferred.fromCoroutine(_ended(fill)) for fill in list(self.fills.values())]
        if not running:
            return
        log.info("waiting up to {timeout}s for {count} upstream transfers to be stored", timeout=timeout,
                 count=len(running))
        everything = gatherResults(running, consumeErrors=True)
        everything.addTimeout(timeout, self._reactor)
        try:
            await everything
        except Exception:
            log.warn("stopping with upstream transfers still running; they are fetched again when asked for")

    def mirror(self, route: Route) -> Mirror:
        return self.mirrors[route.upstream.namespace]

    def _upstream_ok(self, namespace: str) -> None:
        health = self.health.get(namespace)
        if health is not None:
            health.last_success = time.time()

    def _upstream_failed(self, namespace: str, message: str) -> None:
        """Every upstream failure: counted, kept for the status page, told to listeners."""
        self.metrics.upstream_errors.labels(namespace).inc()
        health = self.health.get(namespace)
        if health is not None:
            health.last_error = time.time()
            health.last_error_message = message
            health.errors += 1
        for listener in self.error_listeners:
            try:
                listener(namespace, message)
            except Exception:
                log.failure("an upstream error listener failed")

    def _offline(self, upstream: UpstreamConfig) -> bool:
        return self._config.offline or upstream.offline

    # --- manifests ---------------------------------------------------------

    async def _cached(self, mirror: Mirror, remote: str, digest: Digest) -> CachedManifest | None:
        media_type = await mirror.repositories.manifest_media_type(remote, digest)
        data = await self._store.blobs.read(digest, self._manifest_limit) if media_type is not None else None
        return None if data is None or media_type is None else CachedManifest(digest, media_type, data)

    async def _cached_tag(self, mirror: Mirror, remote: str, tag: str) -> tuple[CachedManifest, float] | None:
        try:
            digest = await mirror.repositories.resolve_tag(remote, tag)
        except RegistryError:
            return None  # an unreadable tag file is a cache miss
        if digest is None:
            return None
        cached = await self._cached(mirror, remote, digest)
        if cached is None:
            return None
        confirmed = await mirror.repositories.tag_mtime(remote, tag)
        if confirmed is None:
            return None
        return cached, self.clock() - confirmed

    async def manifest(self, route: Route, reference: str, accept: str | None) -> CachedManifest:
        """The manifest ``reference`` of a mirrored repository."""
        mirror = self.mirror(route)
        upstream = route.upstream
        if is_digest(reference):
            digest = parse_digest(reference)
            cached = await self._cached(mirror, route.remote, digest)
            if cached is not None:
                return cached
            if self._offline(upstream):
                raise offline_miss(upstream, "manifest")
            key: tuple[str, ...] = (upstream.namespace, route.remote, str(digest))

            async def stored(since: float) -> CachedManifest | None:
                return await self._cached(mirror, route.remote, digest)

            try:
                found = await self.manifest_fetches.run(key, lambda: self._once_per_node(
                    key, upstream, lambda: self._fetch_manifest(mirror, route.remote, reference, accept, None),
                    stored))
            except UpstreamUnavailable as e:
                self._upstream_failed(upstream.namespace, str(e))
                raise unavailable(upstream, str(e)) from None
            except RegistryError:
                self._upstream_ok(upstream.namespace)
                raise
            self._upstream_ok(upstream.namespace)
            return found
        check_tag(reference)
        hit = await self._cached_tag(mirror, route.remote, reference)
        if hit is not None and not _accepts(accept, hit[0].media_type):
            hit = None
        if hit is not None and (hit[1] < upstream.manifest_ttl or self._offline(upstream)):
            return hit[0]
        if hit is None and self._offline(upstream):
            raise offline_miss(upstream, "manifest")
        key = (upstream.namespace, route.remote, reference, accept or "")

        async def confirmed(since: float) -> CachedManifest | None:
            again = await self._cached_tag(mirror, route.remote, reference)
            if again is None or not _accepts(accept, again[0].media_type):
                return None
            # Confirmed by the upstream after this request asked (less the file clock's coarseness).
            fresh = again[1] < upstream.manifest_ttl or self.clock() - again[1] >= since - _MTIME_SLACK
            return again[0] if fresh else None

        try:
            # One fetch of the tag for the node whatever the clients accept: a worker that waited
            # serves what the other stored when its client accepts that type (as a cache hit is).
            found = await self.manifest_fetches.run(key, lambda: self._once_per_node(
                key[:3], upstream, lambda: self._fetch_manifest(mirror, route.remote, reference, accept,
                                                                hit[0] if hit else None), confirmed))
            self._upstream_ok(upstream.namespace)
            return found
        except RegistryError:
            self._upstream_ok(upstream.namespace)
            raise
        except UpstreamUnavailable as e:
            self._upstream_failed(upstream.namespace, str(e))
            if hit is None:
                raise unavailable(upstream, str(e)) from None
            log.warn("serving {repository}:{tag} from cache: {error}", repository=route.remote,
                     tag=reference, error=str(e))
            return attrs.evolve(hit[0], stale=True)

    async def _once_per_node(self, key: tuple[str, ...], upstream: UpstreamConfig,
                             fetch: Callable[[], Awaitable[CachedManifest]],
                             stored: Callable[[float], Awaitable[CachedManifest | None]]) -> CachedManifest:
        """``fetch()``, once for the whole node (registryd.mirror.shared_manifest): a request
        that waited for another's fetch (in any worker, for a client that accepts other types)
        serves what ``stored`` finds that one stored."""
        prefix = fetch_prefix(self._store.tmp_dir, key)
        return await once_per_node(prefix, self._reactor, self.clock, fetch, stored,
                                   max(10.0, float(upstream.idle_timeout)))

    async def fetch_manifest(self, mirror: Mirror, remote: str, digest: Digest, accept: str | None = None
                             ) -> CachedManifest:
        """GET the manifest ``digest`` from the upstream and store it as a pull by digest would (a sync)."""
        return await self._fetch_manifest(mirror, remote, str(digest), accept, None)

    async def _fetch_manifest(self, mirror: Mirror, remote: str, reference: str, accept: str | None,
                              cached: CachedManifest | None) -> CachedManifest:
        path = f"/v2/{remote}/manifests/{reference}"
        headers = {"Accept": accept or MANIFEST_ACCEPT}
        if cached is not None:
            # Revalidate with HEAD: it does not count against pull limits.
            response = await mirror.client.request("HEAD", path, remote, headers)
            await read_limited(response, 0)
            current = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0].decode("latin-1")
            if response.code == 200 and current == str(cached.digest):
                await mirror.repositories.touch_tag(remote, reference, cached.digest)
                return cached
            if response.code == 404:
                await mirror.repositories.delete_tag(remote, reference)
                raise manifest_unknown(reference)
        response = await mirror.client.request("GET", path, remote, headers)
        data = await read_limited(response, self._config.max_manifest_size)
        if response.code in (401, 403, 404):
            if cached is not None and response.code == 404:
                await mirror.repositories.delete_tag(remote, reference)
            raise manifest_unknown(reference)
        if response.code != 200:
            raise UpstreamUnavailable(f"{mirror.config.namespace} answered {response.code} for {path}")
        media_type = _media_type((response.headers.getRawHeaders(b"content-type") or [None])[0], data)
        if media_type is None:
            raise UpstreamUnavailable(f"{mirror.config.namespace} sent a manifest of an unknown type for {path}")
        if is_digest(reference):
            digest = parse_digest(reference)
            tags = []
        else:
            digest = digest_of(data)
            tags = [reference]
        if digest_of(data, digest.algorithm) != digest:
            raise UpstreamUnavailable(f"{mirror.config.namespace} sent a manifest that does not match {digest}")
        try:
            load_json(data)
        except ValueError as e:
            raise UpstreamUnavailable(f"{mirror.config.namespace} sent a manifest that is not usable JSON: "
                                      f"{e}") from None
        await self._store_manifest(mirror, remote, digest, media_type, data, tags)
        return CachedManifest(digest, media_type, data)

    async def _store_manifest(self, mirror: Mirror, remote: str, digest: Digest, media_type: str, data: bytes,
                        tags: list[str]) -> None:
        referrer = None
        blobs: tuple[Digest, ...] = ()
        try:
            parsed = parse_manifest(data, media_type)
        except RegistryError:
            parsed = None  # stored as the upstream sent it, but nothing linked
        if parsed is not None:
            blobs = parsed.blobs
            referrer = parsed.referrer_entry(digest, len(data), media_type)
        self._store.guard.claim(blobs)
        await self._store.blobs.put(digest, data)
        # The blobs it names are not linked: naming a digest is no proof that
        # this repository has those bytes. Each is linked once fetched from here.
        await mirror.repositories.add_manifest(remote, digest, media_type, tags, referrer)

    # --- tags and referrers ---------------------------------------------------

    async def tags(self, route: Route) -> list[str] | None:
        """The upstream's tags (following its pagination), or the cached ones when it is away."""
        mirror = self.mirror(route)
        cached = await mirror.repositories.tags(route.remote)
        if self._offline(route.upstream):
            return cached
        tags: list[str] = []
        path: str | None = f"/v2/{route.remote}/tags/list"
        try:
            for _ in range(_MAX_TAG_PAGES):
                if path is None:
                    break
                response = await mirror.client.request("GET", path, route.remote, {"Accept": "application/json"})
                data = await read_limited(response, _TAG_LIST_LIMIT)
                if response.code in (401, 403, 404):
                    return cached
                if response.code != 200:
                    raise UpstreamUnavailable(f"{route.upstream.namespace} answered {response.code}")
                page = load_json(data).get("tags") or []
                if not isinstance(page, list):
                    raise ValueError("the tag list is not a list")
                tags.extend(tag for tag in page if isinstance(tag, str) and is_tag(tag))
                path = next_page(response)
        except (UpstreamUnavailable, ValueError, AttributeError) as e:
            self._upstream_failed(route.upstream.namespace, str(e))
            if cached is None:
                raise unavailable(route.upstream, str(e)) from None
            log.warn("serving cached tags of {repository}: {error}", repository=route.remote, error=str(e))
            return cached
        self._upstream_ok(route.upstream.namespace)
        return sorted(set(tags))

    async def referrers(self, route: Route, subject: Digest) -> list[dict[str, Any]]:
        """The upstream's referrers of ``subject``; cached ones if it has no such API or is away."""
        mirror = self.mirror(route)
        if not self._offline(route.upstream):
            try:
                response = await mirror.client.request(
                    "GET", f"/v2/{route.remote}/referrers/{subject}", route.remote,
                    {"Accept": "application/vnd.oci.image.index.v1+json"})
                data = await read_limited(response, self._config.max_manifest_size)
                self._upstream_ok(route.upstream.namespace)
                if response.code == 200:
                    manifests = load_json(data).get("manifests")
                    if isinstance(manifests, list):
                        return [m for m in manifests if isinstance(m, dict)]
            except (UpstreamUnavailable, ValueError, AttributeError) as e:
                self._upstream_failed(route.upstream.namespace, str(e))
                log.warn("serving cached referrers of {repository}: {error}", repository=route.remote,
                         error=str(e))
        return await mirror.repositories.referrers(route.remote, subject)

    # --- blobs -------------------------------------------------------------

    async def cached_blob(self, route: Route, digest: Digest) -> bool:
        return (await self.mirror(route).repositories.has_blob(route.remote, digest)
                and await self._store.blobs.size(digest) is not None)

    async def head_blob(self, route: Route, digest: Digest) -> BlobHead:
        """Size of an uncached blob, asked of the upstream without downloading it.

        Nothing is linked: a HEAD answered 200 proves nothing about the bytes.
        """
        upstream = route.upstream
        if self._offline(upstream):
            raise offline_miss(upstream, "blob")
        mirror = self.mirror(route)
        try:
            response = await mirror.client.request("HEAD", f"/v2/{route.remote}/blobs/{digest}", route.remote)
            await read_limited(response, 0)
        except UpstreamUnavailable as e:
            self._upstream_failed(upstream.namespace, str(e))
            raise unavailable(upstream, str(e)) from None
        self._upstream_ok(upstream.namespace)
        if response.code != 200:
            raise blob_unknown(str(digest))
        # For HEAD, Twisted leaves Content-Length among the headers (the body is empty).
        lengths = response.headers.getRawHeaders(b"content-length") or []
        size = int(lengths[0]) if lengths and lengths[0].isdigit() and len(lengths[0]) <= 18 else None
        return BlobHead(size, str(digest))

    async def fill(self, route: Route, digest: Digest) -> BlobFill:
        """The running (or a new) upstream transfer of ``digest`` from ``route``'s
        repository, once it has begun.

        However many clients ask, one transfer per upstream repository and
        digest runs; the same digest from two repositories is two transfers
        (each proves only that its own repository has the bytes).
        """
        upstream = route.upstream
        if self._offline(upstream):
            raise offline_miss(upstream, "blob")
        key: FillKey = (upstream.namespace, route.remote, digest)
        for _ in range(_FILL_ATTEMPTS):
            fill = self.fills.get(key)
            if fill is None:
                fill = self._new_fill(route, key)
            else:
                self.fill_waiters += 1
                self.metrics.coalesced.inc()
            await fill.started.wait()
            if isinstance(fill, RemoteFill) and fill.retry:
                self._forget_fill(key, fill)   # its claim came free before it began: take it
                continue
            if fill.start_error is not None:
                raise fill.start_error
            return fill
        raise unavailable(upstream, "the transfer did not begin in another worker process")

    def _new_fill(self, route: Route, key: FillKey) -> BlobFill:
        """A transfer of ``key`` in this process, or, when another worker process of the node
        runs it (``shared_fills``), one followed through its files (registryd.mirror.shared_fill)."""
        upstream, digest = route.upstream, key[2]
        claim = None
        if self.shared_fills:
            prefix = fill_prefix(self._store.tmp_dir, *key)
            claim = FillClaim.take(prefix, self._reactor)
            if claim is None:
                remote = RemoteFill(digest, prefix, self._reactor, upstream.idle_timeout)
                self.fills[key] = remote
                self._count_fills()
                self.fill_waiters += 1
                self.metrics.coalesced.inc()
                remote.on_finished(lambda: self._forget_fill(key, remote))
                return remote
        mirror = self.mirror(route)
        fill = BlobFill(digest, self._store.tmp_dir, self._reactor, upstream.idle_timeout,
                        lambda path, d: self._commit_fill(mirror, route.remote, path, d), claim=claim,
                        pool=self._store.pool)
        self.fills[key] = fill
        self._count_fills()
        fill.started = Shared(self._start_fill(mirror, route, key, fill, claim))
        return fill

    async def _start_fill(self, mirror: Mirror, route: Route, key: FillKey, fill: BlobFill,
                          claim: FillClaim | None) -> None:
        """Ask upstream for the blob; never fails (the error is kept on the fill)."""
        remote = route.remote
        try:
            if claim is not None:
                if await self.cached_blob(route, fill.digest):
                    # Stored by another worker process between this client's look and the claim.
                    self._forget_fill(key, fill)
                    fill.stored_elsewhere()
                    return
                claim.prepare()
            self.fills_started += 1
            self.metrics.upstream_fetches.labels(mirror.config.namespace).inc()
            response = await mirror.client.request("GET", f"/v2/{remote}/blobs/{fill.digest}", remote)
            if response.code in (401, 403, 404):
                await read_limited(response, 64 * 1024)
                raise blob_unknown(str(fill.digest))
            if response.code != 200:
                await read_limited(response, 64 * 1024)
                raise UpstreamUnavailable(f"{mirror.config.namespace} answered {response.code}")
            fill.on_finished(lambda: self._fill_finished(mirror, key, fill))
            fill.begin(response)
            self._upstream_ok(mirror.config.namespace)
        except (RegistryError, UpstreamUnavailable) as e:
            self._forget_fill(key, fill)
            if claim is not None:
                claim.release()
            if isinstance(e, UpstreamUnavailable):
                self._upstream_failed(mirror.config.namespace, str(e))
            if isinstance(e, RegistryError):
                fill.start_error = e
            else:
                fill.start_error = unavailable(mirror.config, str(e))
                fill.start_error.__cause__ = e   # a sync backs off on a 429 (UpstreamThrottled)
        except Exception as e:
            log.failure("starting the upstream transfer of {digest} failed", digest=str(fill.digest))
            self._forget_fill(key, fill)
            if claim is not None:
                claim.release()
            fill.start_error = unavailable(mirror.config, str(e))

    def _forget_fill(self, key: FillKey, fill: BlobFill) -> None:
        if self.fills.get(key) is fill:
            del self.fills[key]
            self._count_fills()

    def _count_fills(self) -> None:
        """The running fills gauge, where it is not read at each scrape (a worker of a node)."""
        if self.metrics.shared_dir is not None:
            self.metrics.fills_in_flight.set(len(self.fills))

    def _fill_finished(self, mirror: Mirror, key: FillKey, fill: BlobFill) -> None:
        self._forget_fill(key, fill)
        if fill.error is not None:
            self._upstream_failed(mirror.config.namespace, f"transfer of {fill.digest} failed: {fill.error}")

    async def _commit_fill(self, mirror: Mirror, remote: str, path: str, digest: Digest) -> None:
        await self._store.blobs.commit_file(path, digest)
        await mirror.repositories.link_blob(remote, digest)


async def _ended(fill: BlobFill) -> None:
    """Fires once ``fill`` is stored or failed (at once if its start failed)."""
    await fill.started.wait()
    if fill.start_error is None:
        await fill.ended()

