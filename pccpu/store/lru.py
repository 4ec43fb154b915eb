"""Least-recently-used bookkeeping under a size budget, shared by every cache in pccpu: module states in RAM
(bytes), parked session states (bytes) and resident module runs (KV cells).

It only keeps order and sizes; what an eviction means (freeing memory, removing KV cells) is the caller's, told
through the list of evicted items that ``make_room`` and ``put`` return.

    >>> lru = Lru[str, str](budget=10)
    >>> lru.put("a", "A", 6), lru.put("b", "B", 6)
    ([], [('a', 'A')])
    >>> lru.get("a") is None, lru.used
    (True, 6)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator
from typing import Generic, TypeVar

from pccpu.errors import ConfigError

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """Items with sizes, least recently used first; pinned keys are never evicted."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ConfigError(f"a cache budget must be >= 0, got {budget}")
        self.budget = budget
        self.used = 0
        self.evictions = 0
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._pinned: set[K] = set()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(list(self._items))

    def get(self, key: K) -> V | None:
        """The item, marked as just used; None when absent."""
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        return found[0]

    def peek(self, key: K) -> V | None:
        found = self._items.get(key)
        return None if found is None else found[0]

    def size_of(self, key: K) -> int:
        return self._items[key][1]

    def values(self) -> list[V]:
        return [value for value, _ in self._items.values()]

    def fits(self, size: int, protect: Collection[K] = ()) -> bool:
        """Whether ``size`` more would fit after evicting everything evictable (nothing is evicted)."""
        kept = sum(s for k, (_, s) in self._items.items() if k in self._pinned or k in protect)
        return kept + size <= self.budget

    def make_room(self, size: int, protect: Collection[K] = ()) -> list[tuple[K, V]] | None:
        """Evict least recently used items (never pinned or protected ones) until ``size`` more fits; the evicted
        items, or None (and nothing evicted) when it cannot fit."""
        if not self.fits(size, protect):
            return None
        evicted: list[tuple[K, V]] = []
        for key in list(self._items):
            if self.used + size <= self.budget:
                break
            if key not in self._pinned and key not in protect:
                evicted.append((key, self.pop(key)))  # type: ignore[arg-type]
                self.evictions += 1
        return evicted

    def put(self, key: K, value: V, size: int, protect: Collection[K] = ()) -> list[tuple[K, V]] | None:
        """Add (or replace) an item as the most recently used; the items evicted for it, or None when it cannot fit
        (then nothing changes, and a replaced item is gone)."""
        self.pop(key)
        evicted = self.make_room(size, protect)
        if evicted is None:
            return None
        self._items[key] = (value, size)
        self.used += size
        return evicted

    def pop(self, key: K) -> V | None:
        found = self._items.pop(key, None)
        if found is None:
            return None
        self.used -= found[1]
        return found[0]

    def pin(self, key: K) -> None:
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        self._pinned.discard(key)

    def is_pinned(self, key: K) -> bool:
        return key in self._pinned

    def clear(self) -> list[tuple[K, V]]:
        """Remove every item (pins stay for keys added again); the removed items."""
        removed = [(k, v) for k, (v, _) in self._items.items()]
        self._items.clear()
        self.used = 0
        return removed
