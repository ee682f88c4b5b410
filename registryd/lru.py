"""A least-recently-used map bounded by the total size of its values."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """Keeps values while their sizes add up to at most ``capacity``, forgetting the
    least recently used first; a value larger than ``capacity`` is not kept at all."""

    def __init__(self, capacity: int, size_of: Callable[[V], int] = lambda value: 1) -> None:
        self.capacity = capacity
        self._size_of = size_of
        self._values: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.used = 0

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: K) -> bool:
        return key in self._values

    def get(self, key: K) -> V | None:
        found = self._values.get(key)
        if found is None:
            return None
        self._values.move_to_end(key)
        return found[0]

    def put(self, key: K, value: V) -> None:
        size = self._size_of(value)
        self.discard(key)
        if size > self.capacity:
            return
        self._values[key] = (value, size)
        self.used += size
        while self.used > self.capacity:
            _, (_, dropped) = self._values.popitem(last=False)
            self.used -= dropped

    def discard(self, key: K) -> None:
        found = self._values.pop(key, None)
        if found is not None:
            self.used -= found[1]
