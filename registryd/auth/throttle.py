"""Slow down clients that keep presenting wrong credentials.

Failures are counted twice: per client address and user name tried, and
per client address across all user names. The first ``free_failures`` for
one user name cost nothing (a typo, a stale docker config), the first
``address_free_failures`` across names neither (ten times as many by
default: several users behind one NAT); after that each attempt must wait
``base_delay`` seconds, doubling per failure up to ``max_delay``. A success
forgets the failures for that user name only, never the address's: a
guesser cannot clear its count by logging in as itself now and then.
Counts are forgotten ``expiry`` seconds after their last failure, and at
most ``max_entries`` are remembered (the oldest go first), so a flood of
addresses cannot grow memory without bound.

At most ``max_concurrent`` password checks from one address run at once
(``begin_check``/``end_check``); the web layer answers more with 429, so
parallel guesses from one address cannot take every check thread. Such a
refusal counts against the address like a failure (``record_refusal``).

IPv6 clients are counted per /64 network, because one host usually has a
whole /64 to pick addresses from; IPv4-mapped IPv6 addresses count as IPv4.

The worker processes of a node ([server] workers) ``share`` their counts
(registryd.auth.shared_failures), so a guesser meets one count whichever
worker its connections reach; the concurrent checks stay per process.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from registryd.auth.shared_failures import SharedFailures

log = Logger()


def client_key(address: str) -> str:
    """The bucket failures of ``address`` are counted in."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@attrs.define
class _Entry:
    failures: int
    last_failure: float


#: The key of an address's own count (a user name is never None there).
_ANY_USER = None


class Throttle:
    """Exponential backoff after repeated authentication failures.

    ``delay_for(address, user)`` says how long the next attempt must wait;
    the caller waits (on the injected clock) before checking the
    credentials, then reports the outcome with ``record_failure`` or
    ``record_success``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        free_failures: int = 3,
        address_free_failures: int | None = None,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        expiry: float = 900.0,
        max_entries: int = 100_000,
        max_concurrent: int = 2,
    ) -> None:
        if address_free_failures is None:
            address_free_failures = 10 * free_failures
        if (free_failures < 0 or address_free_failures < 0 or base_delay <= 0 or max_delay < base_delay
                or expiry <= 0 or max_entries < 1 or max_concurrent < 1):
            raise ValueError("invalid throttle settings")
        self._clock = clock
        self._free_failures = free_failures
        self._address_free_failures = address_free_failures
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._expiry = expiry
        self._max_entries = max_entries
        self.max_concurrent = max_concurrent
        # Ordered by last failure, oldest first, so expiry pops from the front.
        self._entries: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self._running: dict[str, int] = {}
        self._shared: SharedFailures | None = None

    @property
    def expiry(self) -> float:
        return self._expiry

    def share(self, table: SharedFailures) -> None:
        """Count in ``table``, which the other worker processes of the node count in too."""
        self._shared = table

    def _entry(self, key: tuple[str, str | None], now: float) -> _Entry | None:
        if self._shared is not None:
            found = self._shared.get(key[0], key[1], now)
            return _Entry(*found) if found is not None else None
        return self._entries.get(key)

    def _count(self, key: tuple[str, str | None], now: float) -> int:
        """One more failure for ``key`` now; its count."""
        if self._shared is not None:
            return self._shared.bump(key[0], key[1], now)
        entry = self._entries.pop(key, None) or _Entry(0, now)
        entry.failures += 1
        entry.last_failure = now
        self._entries[key] = entry
        return entry.failures

    def backoff(self, failures: int, free: int | None = None) -> float:
        """The wait imposed after ``failures`` consecutive failures."""
        excess = failures - (self._free_failures if free is None else free)
        if excess <= 0:
            return 0.0
        # Cap the exponent: a long run of failures must not build a huge int.
        return float(min(self._max_delay, self._base_delay * 2 ** min(excess - 1, 64)))

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.last_failure < self._expiry and len(self._entries) <= self._max_entries:
                break
            del self._entries[key]

    def _keys(self, address: str, user: str | None) -> list[tuple[tuple[str, str | None], int]]:
        """(entry key, free failures) of the counts an attempt is judged by."""
        key = client_key(address)
        keys: list[tuple[tuple[str, str | None], int]] = [((key, _ANY_USER), self._address_free_failures)]
        if user is not None:
            keys.append(((key, user), self._free_failures))
        return keys

    def failures(self, address: str, user: str | None = None) -> int:
        """Failures currently counted for ``address`` (with ``user``: for that name)."""
        now = self._clock.seconds()
        self._expire(now)
        entry = self._entry((client_key(address), user), now)
        return entry.failures if entry else 0

    def delay_for(self, address: str, user: str | None = None) -> float:
        """Seconds the next attempt from ``address`` (as ``user``) must wait (0: none)."""
        now = self._clock.seconds()
        self._expire(now)
        delay = 0.0
        for key, free in self._keys(address, user):
            entry = self._entry(key, now)
            if entry is not None:
                delay = max(delay, entry.last_failure + self.backoff(entry.failures, free) - now)
        return delay

    def record_failure(self, address: str, user: str | None, reason: str = "wrong credentials") -> float:
        """Count a failed attempt, log it, and return the delay now imposed.

        The log event carries the address and the user name, never the
        password.
        """
        now = self._clock.seconds()
        self._expire(now)
        delay = 0.0
        counted = 0
        for key, free in self._keys(address, "" if user is None else user):
            counted = self._count(key, now)
            delay = max(delay, self.backoff(counted, free))
        self._expire(now)
        log.warn(
            "authentication failed for user {user!r} from {address}: {reason}; "
            "{failures} failures in a row, next attempt delayed {delay}s",
            user=user, address=address, reason=reason, failures=counted, delay=delay,
        )
        return delay

    def record_refusal(self, address: str) -> None:
        """Count an attempt refused unchecked (too many at once) against the
        address, without a log line each: a flood must not flood the log."""
        now = self._clock.seconds()
        self._count((client_key(address), _ANY_USER), now)
        self._expire(now)

    def record_success(self, address: str, user: str) -> None:
        """Forget the failures of ``user`` from ``address`` (not the address's own count)."""
        if self._shared is not None:
            self._shared.forget(client_key(address), user)
        self._entries.pop((client_key(address), user), None)

    def begin_check(self, address: str) -> bool:
        """Claim one of the address's concurrent checks; False when all are taken."""
        key = client_key(address)
        running = self._running.get(key, 0)
        if running >= self.max_concurrent:
            return False
        self._running[key] = running + 1
        return True

    def end_check(self, address: str) -> None:
        key = client_key(address)
        running = self._running.pop(key, 1) - 1
        if running > 0:
            self._running[key] = running

    def __len__(self) -> int:
        return len(self._shared) if self._shared is not None else len(self._entries)
