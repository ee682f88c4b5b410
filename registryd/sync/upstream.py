"""A sync run's requests to its upstream: patient with 429s, one HEAD per tag, lists page by page.

Through the mirror's UpstreamClient (the upstream's credentials, token
flow, CA and timeouts). A 429 waits its ``Retry-After`` (seconds or an HTTP
date; else a doubling backoff from BACKOFF) and tries again, up to ATTEMPTS
times; an unreachable upstream or a 5xx is tried three times. Each
manifest reference is asked for with a ``HEAD`` once a run (Docker Hub does
not count HEADs against its pull limits); tag lists and the catalog are
followed page by page (``Link: <...>; rel="next"``).
"""
from __future__ import annotations

import email.utils
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet.task import deferLater
from twisted.logger import Logger

from registryd.digest import Digest, digest_of, parse_digest
from registryd.errors import RegistryError
from registryd.json_documents import load_json
from registryd.mirror.cache import next_page
from registryd.mirror.client import UpstreamClient, UpstreamThrottled, UpstreamUnavailable, read_limited
from registryd.sync.errors import ImageFailed, JobFailed

log = Logger()
T = TypeVar("T")

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
_LIST_LIMIT = 16 * 1024 * 1024
_MAX_PAGES = 1000
PAGE_SIZE = 1000        # names asked for per page of a tag list or the catalog


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from ``now``; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


#: 429 and 5xx: tries in all, first backoff, longest wait.
ATTEMPTS = 8
BACKOFF = 1.0
MAX_WAIT = 300.0


class PatientUpstream:
    """The upstream of one run (``job``: its name, for the log)."""

    def __init__(self, client: UpstreamClient, reactor: Any, job: str, manifest_limit: int) -> None:
        self._client = client
        self._reactor = reactor
        self._job = job
        self.namespace = client.config.namespace
        self._manifest_limit = manifest_limit
        self._heads: dict[tuple[str, str], Digest | None] = {}     # what this run's HEADs found
        self.throttled = 0          # 429 answers waited out
        self.referrers_api = True   # until the upstream shows it has none (registryd.sync.referrers)

    async def _sleep(self, seconds: float) -> None:
        await deferLater(self._reactor, seconds, lambda: None)

    async def patiently(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, waiting out a 429 (its Retry-After, else a doubling backoff) and retrying
        an unreachable upstream or a 5xx a few times."""
        wait = BACKOFF
        for attempt in range(ATTEMPTS):
            try:
                return await call()
            except (UpstreamUnavailable, RegistryError) as e:
                cause = e if isinstance(e, UpstreamUnavailable) else e.__cause__
                if not isinstance(cause, UpstreamUnavailable) or attempt == ATTEMPTS - 1:
                    raise
                if isinstance(cause, UpstreamThrottled):
                    self.throttled += 1
                    asked = retry_after_seconds(cause.retry_after, self._reactor.seconds())
                    delay = min(MAX_WAIT, asked if asked is not None else wait)
                    log.info("sync {job}: {upstream} asks us to slow down ({what}); waiting {delay:.1f}s",
                             job=self._job, upstream=self.namespace, what=what, delay=delay)
                elif attempt >= 2:
                    raise
                else:
                    delay = wait
                await self._sleep(delay)
                wait = min(MAX_WAIT, wait * 2)
        raise AssertionError("unreachable")

    async def get(self, path: str, remote: str, headers: dict[str, str], limit: int) -> tuple[int, bytes, Any]:
        scope = "registry:catalog:*" if path.startswith("/v2/_catalog") else None

        async def once() -> tuple[int, bytes, Any]:
            response = await self._client.request("GET", path, remote, headers, scope)
            return response.code, await read_limited(response, limit), response
        return await self.patiently(f"GET {path}", once)

    async def paged(self, path: str, remote: str, key: str) -> list[str] | None:
        """Every name of a paginated list (``Link: <...>; rel="next"``); None if refused (401/403/404)."""
        names: list[str] = []
        next_path: str | None = path
        for _ in range(_MAX_PAGES):
            if next_path is None:
                return names
            code, body, response = await self.get(next_path, remote, {"Accept": "application/json"}, _LIST_LIMIT)
            if code in (401, 403, 404):
                return None
            if code != 200:
                raise JobFailed(f"{self.namespace} answered {code} for {next_path}")
            try:
                page = load_json(body).get(key) or []
            except (ValueError, AttributeError):
                raise JobFailed(f"{self.namespace} sent an unreadable list for {next_path}") from None
            names.extend(name for name in page if isinstance(name, str))
            next_path = next_page(response)
        raise JobFailed(f"{self.namespace}: more than {_MAX_PAGES} pages for {path}")

    async def head_manifest(self, remote: str, reference: str) -> Digest | None:
        """The digest the upstream has for ``reference`` now (a HEAD, once a run), or None when it has none."""
        key = (remote, reference)
        if key not in self._heads:
            self._heads[key] = await self._head_manifest(remote, reference)
        return self._heads[key]

    async def _head_manifest(self, remote: str, reference: str) -> Digest | None:
        async def once() -> tuple[int, str]:
            response = await self._client.request("HEAD", f"/v2/{remote}/manifests/{reference}", remote,
                                                  {"Accept": ACCEPT})
            await read_limited(response, 0)
            found = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0].decode("latin-1")
            return response.code, found
        code, found = await self.patiently(f"HEAD {remote}:{reference}", once)
        if code in (401, 403, 404):
            return None
        if code != 200:
            raise ImageFailed(f"HEAD of the manifest answered {code}")
        if not found:
            # No digest on the HEAD: the GET's content gives it.
            status, body, _ = await self.get(f"/v2/{remote}/manifests/{reference}", remote, {"Accept": ACCEPT},
                                             self._manifest_limit)
            if status != 200:
                return None
            return digest_of(body)
        try:
            return parse_digest(found)
        except RegistryError:
            raise ImageFailed(f"the upstream sent an unusable digest {found[:100]!r}") from None

    async def catalog(self) -> list[str] | None:
        """Every repository of the upstream's ``_catalog``; None if it has none or refuses it."""
        return await self.paged(f"/v2/_catalog?n={PAGE_SIZE}", "", "repositories")

    async def tags(self, remote: str) -> list[str] | None:
        """Every tag of ``remote``, sorted; None if the upstream has no such repository (or refuses it)."""
        listed = await self.paged(f"/v2/{remote}/tags/list?n={PAGE_SIZE}", remote, "tags")
        return None if listed is None else sorted(set(listed))
