"""A cache bounded by the summed size of its entries, least recently used dropped first.

A background job's entries (a task's evaluation, ``core.evaluation``) are kept only in room nobody
else needs: otherwise one server's evaluation of a 16-shot task, sixteen prefixes of about 11 MB
each on the benchmark model, would push other servers' tasks out, and each of their next requests
would pay its task's examples again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

Key = TypeVar("Key")
Value = TypeVar("Value")


class LruCache(Generic[Key, Value]):
    """Least-recently-used entries dropped first, bounded by their summed size; counted for status."""

    def __init__(self, capacity: int, size_of: Callable[[Value], int]) -> None:
        self.capacity = capacity
        self._size_of = size_of
        self._entries: OrderedDict[Key, Value] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Key, refresh: bool = True) -> Value | None:
        """``refresh`` False: a hit leaves the entry where it is (a background job's read, which must not
        keep its entries over members')."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        if refresh:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Key, value: Value, evicting: bool = True) -> None:
        """``evicting`` False (a background job's entry): it takes only free room, never another entry's,
        and is the first dropped when room is needed."""
        size = self._size_of(value)
        if size > self.capacity:
            return
        self.discard(key)
        if not evicting:
            if self.bytes + size <= self.capacity:
                self._entries[key] = value
                self._entries.move_to_end(key, last=False)
                self.bytes += size
            return
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.capacity:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= self._size_of(dropped)

    def discard(self, key: Key) -> None:
        if key in self._entries:
            self.bytes -= self._size_of(self._entries.pop(key))

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}
