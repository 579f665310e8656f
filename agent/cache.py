"""A small bounded cache for per-patient data (records, their evidence lines, images).

A long-running service must neither grow without bound nor answer from a record fetched hours ago:
entries are dropped least-recently-used beyond ``max_items``, and ``fresh()`` treats entries older
than ``ttl_s`` as absent (plain lookups do not, so one run keeps what it started with).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

V = TypeVar("V")


class RecentCache(MutableMapping[str, V], Generic[V]):
    """A bounded mapping of the most recently used entries (``max_items``, least recently used
    dropped first), each entry fresh for ``ttl_s`` seconds (``fresh``; ``None``: forever). Not
    thread-safe: used from one event loop."""

    def __init__(self, max_items: int = 256, ttl_s: float = 300.0) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, key: str) -> V | None:
        """The entry if it was stored less than ``ttl_s`` ago, else None."""
        with self._lock:
            item = self._items.get(key)
            if item is None or time.monotonic() - item[0] > self.ttl_s:
                return None
            self._items.move_to_end(key)
            return item[1]

    def __getitem__(self, key: str) -> V:
        with self._lock:
            self._items.move_to_end(key)
            return self._items[key][1]

    def __setitem__(self, key: str, value: V) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __delitem__(self, key: str) -> None:
        with self._lock:
            del self._items[key]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)
