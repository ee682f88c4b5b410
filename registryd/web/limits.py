"""Bounds on what clients may hold of the node: connections, body memory, upload sessions.

Each limit is counted here, in memory, on the reactor; the channel
(registryd.web.site), the request (registryd.web.request) and the API
(registryd.web.app) ask before they take, and give back when done. When a
limit is hit it is logged, at most once a minute per kind of limit (a flood
must not become a flood of log lines).
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Callable, Hashable

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger
from twisted.web.http import RESPONSES

from registryd.auth.throttle import client_key
from registryd.errors import RegistryError
from registryd.storage.driver import Pool
from registryd.threads import InlinePool

log = Logger()

_REASONS = {408: b"Request Timeout", 414: b"URI Too Long", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable", 507: b"Insufficient Storage"}


class RateLimitedLog:
    """One warning per ``kind`` per ``interval`` seconds; the next one says how many were left out."""

    def __init__(self, clock: Callable[[], float], interval: float = 60.0) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = defaultdict(int)

    def warn(self, kind: str, message: str, **fields: Any) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        suffix = f" ({more} more since the last report)" if more else ""
        log.warn(message + suffix, limit_kind=kind, **fields)


def error_response(error: RegistryError) -> bytes:
    """A whole HTTP/1.1 response carrying ``error``'s OCI document, closing the connection.

    For answers given outside a request's normal course (before its body was
    read, or before it was parsed at all).
    """
    body = json.dumps(error.document(), separators=(",", ":")).encode()
    reason = RESPONSES.get(error.status) or _REASONS.get(error.status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (error.status, reason), b"Content-Type: application/json",
             b"Content-Length: %d" % len(body), b"Connection: close",
             b"Docker-Distribution-API-Version: registry/2.0"]
    for key, value in error.headers.items():
        lines.append(f"{key}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def unavailable_busy(why: str) -> RegistryError:
    return RegistryError(503, "UNAVAILABLE", why, headers={"Retry-After": "1"})


class BodyBudget:
    """Bytes that request bodies kept in memory (manifests) may hold together.

    A body reserves its declared length before it is read (a chunked one, as
    it grows) and gives it back when its request is done. Past the budget a
    body is refused with 503 and Retry-After: bodies are never half-admitted,
    so the bodies that were admitted always complete.
    """

    def __init__(self, limit: int, warn: RateLimitedLog) -> None:
        self.limit = limit
        self.held = 0
        self._warn = warn

    def reserve(self, amount: int) -> None:
        if self.held + amount > self.limit:
            self._warn.warn("max_pending_body_bytes",
                            "request bodies in memory reached [server] max_pending_body_bytes "
                            "({limit} bytes): refusing more with 503", limit=self.limit)
            raise unavailable_busy("the registry is receiving too many request bodies at once; retry shortly")
        self.held += amount

    def release(self, amount: int) -> None:
        self.held = max(0, self.held - amount)


class ConnectionLimits:
    """Open connections, in all and per client address (an IPv6 /64 counts as one)."""

    def __init__(self, total: int, per_client: int, warn: RateLimitedLog) -> None:
        self.total_limit = total
        self.per_client_limit = per_client
        self.total = 0
        self.by_client: dict[str, int] = defaultdict(int)
        self._warn = warn

    def open(self, peer: str) -> bool:
        """Count a new connection; False (and nothing counted) past ``max_connections``."""
        if self.total >= self.total_limit:
            self._warn.warn("max_connections", "{total} connections open, the [server] max_connections "
                            "limit: refusing new ones (latest from {client})", total=self.total, client=peer)
            return False
        self.total += 1
        return True

    def close(self) -> None:
        self.total = max(0, self.total - 1)

    def identify(self, peer: str) -> str | None:
        """Count the connection for its client; None (nothing counted) past the per-client cap."""
        key = client_key(peer)
        if self.by_client[key] >= self.per_client_limit:
            self._warn.warn("max_connections_per_client",
                            "{client} has {count} connections open, the [server] max_connections_per_client "
                            "limit: refusing more", client=key, count=self.by_client[key])
            if not self.by_client[key]:
                del self.by_client[key]
            return None
        self.by_client[key] += 1
        return key

    def forget(self, key: str) -> None:
        self.by_client[key] -= 1
        if self.by_client[key] <= 0:
            del self.by_client[key]


def too_many_sessions(why: str) -> RegistryError:
    return RegistryError(429, "TOOMANYREQUESTS", why, headers={"Retry-After": "60"})


class SessionQuota:
    """Open upload sessions per owner (a user, or an anonymous client address) and in all.

    Counted on this node, in memory, for the sessions it started; a session
    counts until the store no longer knows it (``alive``: committed,
    cancelled, reaped), checked only when a limit is reached, in ``pool``
    (it may look at a file). Sessions left from before a restart are not
    counted; they expire after [uploads] expiry. Claims are judged one at a
    time, so two at once never both take the last place.
    """

    def __init__(self, total: int, per_owner: int, alive: Callable[[str, str], bool],
                 warn: RateLimitedLog, pool: Pool | None = None) -> None:
        self.total_limit = total
        self.per_owner_limit = per_owner
        self._alive = alive
        self._warn = warn
        self._pool: Pool = pool or InlinePool()
        self._judging = DeferredLock()
        self._owners: dict[str, set[Hashable]] = defaultdict(set)
        self._owner_of: dict[Hashable, str] = {}

    async def _open(self, owner: str) -> tuple[int, int]:
        """Sessions counted against ``owner``'s limit and against the total, claims included."""
        return len(self._owners.get(owner, ())), len(self._owner_of)

    async def _prune(self, owner: str | None = None) -> None:
        """Forget the counted sessions (of ``owner``) the store no longer knows."""
        sessions = [s for s in (self._owners.get(owner, ()) if owner is not None else self._owner_of)
                    if isinstance(s, tuple)]
        alive = self._alive
        ended = await self._pool.run(lambda: [s for s in sessions if not alive(*s)])
        for session in ended:
            self._drop(session)

    def _drop(self, session: Hashable) -> None:
        owner = self._owner_of.pop(session, None)
        if owner is not None:
            self._owners[owner].discard(session)
            if not self._owners[owner]:
                del self._owners[owner]

    async def claim(self, owner: str) -> object:
        """A place for one more session of ``owner`` (429 if none); ``bind`` or ``drop`` it."""
        await self._judging.acquire()
        try:
            return await self._claim(owner)
        finally:
            self._judging.release()

    async def _claim(self, owner: str) -> object:
        owned, total = await self._open(owner)
        if owned >= self.per_owner_limit:
            await self._prune(owner)
            owned, total = await self._open(owner)
            if owned >= self.per_owner_limit:
                self._warn.warn("max_sessions_per_client", "{owner} has {count} upload sessions open, the "
                                "[uploads] max_sessions_per_client limit: refusing more", owner=owner,
                                count=self.per_owner_limit)
                raise too_many_sessions(f"too many upload sessions open ({self.per_owner_limit}): finish or "
                                        f"cancel some, or wait for them to expire")
        if total >= self.total_limit:
            await self._prune()
            if (await self._open(owner))[1] >= self.total_limit:
                self._warn.warn("max_sessions", "{count} upload sessions open, the [uploads] max_sessions "
                                "limit: refusing more", count=self.total_limit)
                raise too_many_sessions("the registry has too many upload sessions open; retry later")
        ticket = object()
        self._owner_of[ticket] = owner
        self._owners[owner].add(ticket)
        return ticket

    async def bind(self, ticket: object, repo: str, upload_id: str) -> None:
        """The claim is now the store's session ``upload_id`` of ``repo``."""
        owner = self._owner_of.get(ticket)
        self._drop(ticket)
        if owner is not None:
            session = (repo, upload_id)
            self._owner_of[session] = owner
            self._owners[owner].add(session)

    def drop(self, ticket: object) -> None:
        self._drop(ticket)

    async def open_sessions(self) -> int:
        return (await self._open(""))[1]   # the total (no owner is named "")


def store_full(free: int | None = None, needed: int | None = None) -> RegistryError:
    """507: the disk of the data directory cannot take this write (or is down to its reserve)."""
    detail = {"free": free, "needed": needed} if free is not None else None
    room = f" ({free} bytes free, {needed} needed with the reserve)" if free is not None else ""
    return RegistryError(507, "UNKNOWN", f"the registry's storage is full{room}; try again once space "
                                         f"is freed", detail)
