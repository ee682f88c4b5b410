"""Slow down clients that keep presenting wrong credentials.

Each client address gets a count of consecutive failures. The first
``free_failures`` cost nothing (a typo, a stale docker config); after that
each attempt must wait ``base_delay`` seconds, doubling per failure up to
``max_delay``. A success resets the address; an address that has not failed
for ``expiry`` seconds is forgotten, and at most ``max_entries`` addresses
are remembered (the oldest go first), so a flood of addresses cannot grow
memory without bound.

IPv6 clients are counted per /64 network, because one host usually has a
whole /64 to pick addresses from; IPv4-mapped IPv6 addresses count as IPv4.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

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


class Throttle:
    """Per-address exponential backoff after repeated authentication failures.

    ``delay_for(address)`` says how long the next attempt from that address
    must wait; the caller waits (on the injected clock) before checking the
    credentials, then reports the outcome with ``record_failure`` or
    ``record_success``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        free_failures: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        expiry: float = 900.0,
        max_entries: int = 100_000,
    ) -> None:
        if free_failures < 0 or base_delay <= 0 or max_delay < base_delay or expiry <= 0 or max_entries < 1:
            raise ValueError("invalid throttle settings")
        self._clock = clock
        self._free_failures = free_failures
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._expiry = expiry
        self._max_entries = max_entries
        # Ordered by last failure, oldest first, so expiry pops from the front.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def backoff(self, failures: int) -> float:
        """The wait imposed after ``failures`` consecutive failures."""
        excess = failures - self._free_failures
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

    def failures(self, address: str) -> int:
        """Consecutive failures currently counted for ``address``."""
        self._expire(self._clock.seconds())
        entry = self._entries.get(client_key(address))
        return entry.failures if entry else 0

    def delay_for(self, address: str) -> float:
        """Seconds the next attempt from ``address`` must wait (0: none)."""
        now = self._clock.seconds()
        self._expire(now)
        entry = self._entries.get(client_key(address))
        if entry is None:
            return 0.0
        return max(0.0, entry.last_failure + self.backoff(entry.failures) - now)

    def record_failure(self, address: str, user: str | None, reason: str = "wrong credentials") -> float:
        """Count a failed attempt, log it, and return the delay now imposed.

        The log event carries the address and the user name, never the
        password.
        """
        now = self._clock.seconds()
        self._expire(now)
        key = client_key(address)
        entry = self._entries.pop(key, None) or _Entry(0, now)
        entry.failures += 1
        entry.last_failure = now
        self._entries[key] = entry
        self._expire(now)
        delay = self.backoff(entry.failures)
        log.warn(
            "authentication failed for user {user!r} from {address}: {reason}; "
            "{failures} failures in a row, next attempt delayed {delay}s",
            user=user, address=address, reason=reason, failures=entry.failures, delay=delay,
        )
        return delay

    def record_success(self, address: str) -> None:
        """Forget the failures of ``address``."""
        self._entries.pop(client_key(address), None)

    def __len__(self) -> int:
        return len(self._entries)
