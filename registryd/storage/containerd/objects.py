"""The containerd store as keys and bytes (``Store.objects``): empty, and refusing writes.

registryd's key-level maintenance (``registryd gc``, the online collection,
surveys and the mirror cache's eviction) works on a store's own layout.
containerd keeps its content its own way and collects its own garbage from
its images, leases and ``gc.ref`` labels: so over this driver those passes
find nothing to mark and nothing to remove, and can never delete what the
node's containerd holds. Writes are refused (read-only file system).
"""
from __future__ import annotations

import builtins
import errno
from typing import AsyncIterator, Callable, Sequence

from registryd.storage.driver import Driver, Entry, Pool


def _refused(key: str) -> OSError:
    return OSError(errno.EROFS, "containerd's store is changed only through its content and images services",
                   key)


class ContainerdObjects:
    """A Driver with no keys (see the module docstring)."""

    name = "containerd"

    def __init__(self, location: str) -> None:
        self._location = location

    @property
    def location(self) -> str:
        return self._location

    async def list(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[Entry]:
        nothing: tuple[Entry, ...] = ()
        for entry in nothing:
            yield entry

    async def stat(self, key: str) -> Entry | None:
        return None

    async def read(self, key: str, limit: int) -> bytes | None:
        return None

    async def stream(self, key: str, write: Callable[[bytes], None]) -> Entry | None:
        return None

    async def write(self, key: str, data: bytes, if_absent: bool = False, durable: bool = True) -> bool:
        raise _refused(key)

    async def touch(self, key: str, when: float) -> None:
        raise _refused(key)

    async def copy(self, src: str, dst: str) -> bool:
        return False

    async def move(self, src: str, dst: str, expect: Entry | None = None,
                   unless: Callable[[], bool] | None = None, durable: bool = True) -> bool:
        return False

    async def delete(self, key: str) -> bool:
        return False

    async def delete_many(self, keys: Sequence[str], durable: bool = True) -> builtins.list[str]:
        return []

    async def tidy(self, prefix: str) -> int:
        return 0

    def local_path(self, key: str) -> str | None:
        return None

    def presign(self, key: str, expires: int) -> str | None:
        return None

    def threaded(self) -> tuple[Driver, Pool] | None:
        return None


#: mypy proves here that it is a registryd.storage.driver.Driver.
_IS_A_DRIVER: type[Driver] = ContainerdObjects
