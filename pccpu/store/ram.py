"""The RAM tier: module states in host memory under a byte budget, least recently used evicted first, pinned
entries never evicted."""

from __future__ import annotations

import logging
import threading

from pccpu.store.entry import StoredModule
from pccpu.store.keys import EntryKey
from pccpu.store.lru import Lru

logger = logging.getLogger(__name__)


class RamTier:
    def __init__(self, budget_bytes: int) -> None:
        self._lru: Lru[EntryKey, StoredModule] = Lru(budget_bytes)
        self._by_content: dict[str, set[int]] = {}
        self._lock = threading.RLock()

    @property
    def budget_bytes(self) -> int:
        return self._lru.budget

    @property
    def used_bytes(self) -> int:
        return self._lru.used

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: EntryKey) -> bool:
        return key in self._lru

    def get(self, key: EntryKey) -> StoredModule | None:
        with self._lock:
            return self._lru.get(key)

    def starts_of(self, content: str) -> set[int]:
        with self._lock:
            return set(self._by_content.get(content, ()))

    def put(self, entry: StoredModule) -> bool:
        """Keep the entry if it fits the budget (evicting older unpinned ones); False when it cannot fit."""
        with self._lock:
            self._forget(entry.key)
            evicted = self._lru.put(entry.key, entry, entry.nbytes)
            if evicted is None:
                self._forget(entry.key)
                logger.info("a module state of %d bytes does not fit the RAM budget of %d bytes (%d pinned)",
                            entry.nbytes, self.budget_bytes, self.used_bytes)
                return False
            for key, _ in evicted:
                self._forget(key)
            self._by_content.setdefault(entry.key.content, set()).add(entry.key.start)
            return True

    def pin(self, key: EntryKey) -> None:
        with self._lock:
            self._lru.pin(key)

    def unpin(self, key: EntryKey) -> None:
        with self._lock:
            self._lru.unpin(key)

    def is_pinned(self, key: EntryKey) -> bool:
        return self._lru.is_pinned(key)

    def entries(self) -> list[StoredModule]:
        with self._lock:
            return self._lru.values()

    def discard(self, key: EntryKey) -> None:
        with self._lock:
            self._lru.pop(key)
            self._forget(key)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._by_content.clear()

    def _forget(self, key: EntryKey) -> None:
        starts = self._by_content.get(key.content)
        if starts is not None and key not in self._lru:
            starts.discard(key.start)
            if not starts:
                del self._by_content[key.content]
