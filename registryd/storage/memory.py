"""A registryd.storage.driver.Driver held in a dict: for unit tests that should take milliseconds.

It keeps the shared contract to the letter (listings in key order with
common prefixes, None for a missing key, TooLarge, if_absent, versions
that change on every write), and its times come from an injectable clock,
so a test makes a value "old" by moving the clock, not by sleeping.
"""
from __future__ import annotations

import builtins
import itertools
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import attrs
from twisted.internet.interfaces import IConsumer

from registryd.storage.paced import send_paced
from registryd.storage.driver import BodySpool, Check, Entry, Pool, Save, Sealed, check_key, too_large

#: What ``stream`` hands over at once: small, so a test sees a value come in pieces.
STREAM_CHUNK = 4096


@attrs.frozen
class _Value:
    data: bytes
    modified: float
    version: str


class MemoryDriver:
    """Keys and bytes in memory; ``clock`` stamps every write (``modified``)."""

    name = "memory"
    location = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._values: dict[str, _Value] = {}
        self._writes = itertools.count(1)

    def _entry(self, key: str, value: _Value) -> Entry:
        return Entry(key, len(value.data), value.modified, value.version)

    def _set(self, key: str, data: bytes) -> None:
        check_key(key)
        self._values[key] = _Value(bytes(data), self.clock(), str(next(self._writes)))

    async def list(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[Entry]:
        if delimiter not in (None, "/"):
            raise ValueError(f"the memory driver lists with the delimiter '/' only, not {delimiter!r}")
        last_prefix = None
        # A snapshot: writes during the listing do not disturb it.
        for key, value in sorted((k, v) for k, v in self._values.items() if k.startswith(prefix)):
            if delimiter is not None and "/" in key[len(prefix):]:
                rolled = key[:key.index("/", len(prefix)) + 1]
                if rolled != last_prefix:
                    last_prefix = rolled
                    yield Entry(rolled, is_prefix=True)
                continue
            yield self._entry(key, value)

    async def stat(self, key: str) -> Entry | None:
        value = self._values.get(key)
        return None if value is None else self._entry(key, value)

    async def read(self, key: str, limit: int) -> bytes | None:
        value = self._values.get(key)
        if value is None:
            return None
        if len(value.data) > limit:
            raise too_large(key, limit)
        return value.data

    async def stream(self, key: str, write: Callable[[bytes], None]) -> Entry | None:
        value = self._values.get(key)
        if value is None:
            return None
        for start in range(0, len(value.data), STREAM_CHUNK):
            write(value.data[start:start + STREAM_CHUNK])
        return self._entry(key, value)

    async def write(self, key: str, data: bytes, if_absent: bool = False, durable: bool = True) -> bool:
        if if_absent and key in self._values:
            return False
        self._set(key, data)
        return True

    async def touch(self, key: str, when: float) -> None:
        check_key(key)
        self._values[key] = _Value(b"", when, str(next(self._writes)))

    async def copy(self, src: str, dst: str) -> bool:
        value = self._values.get(src)
        if value is None:
            return False
        self._set(dst, value.data)
        return True

    async def move(self, src: str, dst: str, expect: Entry | None = None,
                   unless: Callable[[], bool] | None = None, durable: bool = True) -> bool:
        check_key(dst)
        value = self._values.get(src)
        if value is None or (expect is not None and expect.version and value.version != expect.version):
            return False
        if unless is not None and unless():
            return False
        self._values[dst] = self._values.pop(src)
        return True

    async def delete(self, key: str) -> bool:
        return self._values.pop(key, None) is not None

    async def delete_many(self, keys: Sequence[str], durable: bool = True) -> builtins.list[str]:
        for key in keys:
            self._values.pop(key, None)
        return []

    async def tidy(self, prefix: str) -> int:
        return 0  # no folders here

    def local_path(self, key: str) -> str | None:
        return None

    def presign(self, key: str, expires: int) -> str | None:
        return None

    def threaded(self) -> tuple[MemoryDriver, Pool] | None:
        return None

    # -- what blobs need (registryd.storage.blobs) ------------------------------

    async def send(self, key: str, consumer: IConsumer, start: int, end: int) -> bool:
        value = self._values.get(key)
        if value is None:
            return False

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(start, end, STREAM_CHUNK):
                yield value.data[offset:min(offset + STREAM_CHUNK, end)]

        await send_paced(consumer, chunks())
        return True

    async def put_file(self, key: str, path: str) -> None:
        """Read the file and write it (a value already there is kept), then remove the file."""
        with open(path, "rb") as f:
            data = f.read()
        await self.write(key, data, if_absent=True)
        os.unlink(path)

    # -- appendable values: upload sessions ----------------------------------------

    def appendable(self, spool_dir: str, pool: Pool) -> MemoryAppendable:
        """A value's bytes, each body held until it is appended (tests' bodies are small)."""
        return MemoryAppendable(self)


class MemorySpool:
    """A body held in memory until it is appended."""

    def __init__(self) -> None:
        self.chunks: builtins.list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def close(self) -> None:
        self.chunks = []

    drop = close


@attrs.frozen
class SealedBytes:
    data: bytes
    seen: bool = True
    path: str | None = None


class MemoryAppendable:
    """registryd.storage.driver.Appendable in memory: the value is ``<prefix>data``, rewritten by each append."""

    recorded = False

    def __init__(self, driver: MemoryDriver) -> None:
        self._driver = driver

    async def measure(self, prefix: str, record: dict[str, Any], size: int) -> int:
        entry = await self._driver.stat(prefix + "data")
        return 0 if entry is None else entry.size

    def size_now(self, prefix: str) -> int | None:
        return None   # one process: its sessions are in memory

    def spool(self, prefix: str, size: int) -> MemorySpool:
        return MemorySpool()

    def _value(self, prefix: str, spool: BodySpool) -> bytes:
        assert isinstance(spool, MemorySpool)
        value = self._driver._values.get(prefix + "data")
        return (value.data if value is not None else b"") + b"".join(spool.chunks)

    async def append(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                     save: Save, check: Check) -> None:
        self._driver._set(prefix + "data", self._value(prefix, spool))

    async def seal(self, prefix: str, record: dict[str, Any], spool: BodySpool, length: int,
                   check: Check) -> SealedBytes:
        return SealedBytes(self._value(prefix, spool))

    async def hash(self, sealed: Sealed, hasher: Any) -> Any:
        assert isinstance(sealed, SealedBytes)
        hasher.update(sealed.data)
        return hasher

    async def place(self, sealed: Sealed, key: str) -> None:
        assert isinstance(sealed, SealedBytes)
        await self._driver.write(key, sealed.data, if_absent=True)

    async def remove(self, prefix: str, record: dict[str, Any] | None, last: str) -> None:
        await self._driver.delete_many([key for key in self._driver._values if key.startswith(prefix)])

    async def reap_strays(self, prefix: str, cutoff: float, skip: set[str],
                          record_of: Callable[[str], Awaitable[dict[str, Any] | None]]) -> int:
        return 0   # a value is its keys
