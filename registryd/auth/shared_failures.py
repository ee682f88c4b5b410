"""Failed-login counts shared by the worker processes of a node (registryd.auth.throttle).

A guesser whose connections the kernel spreads over the workers must meet
one count, not one per worker. The counts live in a small file under
``<data_dir>/run/`` that every worker maps into memory: a table of slots
(key hash, failures, time of the last failure in milliseconds), found by
open addressing over a short window. An update takes an ``flock`` on the
file for the few microseconds it lasts (failures are rare; the lookups of
every attempt take none). When a window is full of live counts the oldest
gives way, so a flood of addresses cannot grow the file, as ``max_entries``
bounds the in-memory table.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from contextlib import contextmanager
from typing import Iterator

SLOTS = 1 << 14
_FIELDS = 3     # key, failures, last failure (ms)
_WINDOW = 8
_SIZE = SLOTS * _FIELDS * 8


def _key(address: str, user: str | None) -> int:
    digest = hashlib.blake2b(f"{address}\0{'' if user is None else '@' + user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


class SharedFailures:
    """(failures, last failure) per (client key, user name or None), for every process mapping ``path``."""

    def __init__(self, path: str, expiry: float) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < _SIZE:
            os.ftruncate(self._fd, _SIZE)
        self._map = mmap.mmap(self._fd, _SIZE)
        self._table = memoryview(self._map).cast("q")
        self._expiry_ms = expiry * 1000

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _find(self, key: int, now_ms: float) -> int | None:
        start = key % SLOTS
        for i in range(_WINDOW):
            slot = (start + i) % SLOTS * _FIELDS
            if self._table[slot] == key and now_ms - self._table[slot + 2] < self._expiry_ms:
                return slot
        return None

    def get(self, address: str, user: str | None, now: float) -> tuple[int, float] | None:
        slot = self._find(_key(address, user), now * 1000)
        if slot is None:
            return None
        return int(self._table[slot + 1]), self._table[slot + 2] / 1000

    def bump(self, address: str, user: str | None, now: float) -> int:
        """One more failure now; returns the count."""
        key, now_ms = _key(address, user), int(now * 1000)
        with self._locked():
            slot = self._find(key, now_ms)
            if slot is None:
                slot = self._free_slot(key, now_ms)
                self._table[slot], self._table[slot + 1] = key, 0
            self._table[slot + 1] += 1
            self._table[slot + 2] = now_ms
            return int(self._table[slot + 1])

    def _free_slot(self, key: int, now_ms: int) -> int:
        start = key % SLOTS
        oldest = None
        for i in range(_WINDOW):
            slot = (start + i) % SLOTS * _FIELDS
            if self._table[slot] == 0 or now_ms - self._table[slot + 2] >= self._expiry_ms:
                return slot
            if oldest is None or self._table[slot + 2] < self._table[oldest + 2]:
                oldest = slot
        assert oldest is not None
        return oldest

    def forget(self, address: str, user: str | None) -> None:
        key = _key(address, user)
        with self._locked():
            start = key % SLOTS
            for i in range(_WINDOW):
                slot = (start + i) % SLOTS * _FIELDS
                if self._table[slot] == key:
                    self._table[slot] = self._table[slot + 1] = self._table[slot + 2] = 0

    def __len__(self) -> int:
        return sum(1 for slot in range(0, SLOTS * _FIELDS, _FIELDS) if self._table[slot] != 0)
