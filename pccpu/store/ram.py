"""The RAM tier: module states in host memory under a byte budget, least recently used evicted first, pinned
entries never evicted."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pccpu.errors import StateError
from pccpu.store.keys import EntryKey

logger = logging.getLogger(__name__)


@dataclass
class StoredModule:
    """One module's saved sequence state and what it describes."""

    key: EntryKey
    state: np.ndarray  # uint8, as llama_state_seq_get_data wrote it
    meta: dict[str, Any] = field(default_factory=dict)  # schema, module, cells, tokens, ...

    @property
    def nbytes(self) -> int:
        return int(self.state.nbytes)

    def runs(self) -> list[np.ndarray]:
        """The state split into one sequence state per contiguous run of the module's text (views, no copy).

        A module interrupted by a nested module is saved run by run, so each run can be restored at its own turn
        and the request's KV cells end up in position order, as a full prefill lays them out.
        """
        sizes = self.meta.get("run_bytes")
        if sizes is None:
            return [self.state]
        if not isinstance(sizes, list) or not all(isinstance(n, int) and n > 0 for n in sizes) or \
                sum(sizes) != self.nbytes:
            raise StateError(f"stored module {self.key.file_stem}: run sizes {sizes!r} do not add up to its "
                             f"{self.nbytes} state bytes; clear the cache (pccpu cache clear)")
        bounds = [int(b) for b in np.cumsum([0, *sizes])]
        return [self.state[a:b] for a, b in itertools.pairwise(bounds)]


class RamTier:
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[EntryKey, StoredModule] = OrderedDict()
        self._by_content: dict[str, set[int]] = {}
        self._pinned: set[EntryKey] = set()
        self._bytes = 0
        self._lock = threading.RLock()
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: EntryKey) -> bool:
        return key in self._entries

    def get(self, key: EntryKey) -> StoredModule | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def starts_of(self, content: str) -> set[int]:
        with self._lock:
            return set(self._by_content.get(content, ()))

    def put(self, entry: StoredModule) -> bool:
        """Keep the entry if it fits the budget (evicting older unpinned ones); False when it cannot fit."""
        with self._lock:
            if entry.key in self._entries:
                self._remove(entry.key)
            if entry.nbytes > self.budget_bytes:
                logger.info("module state of %d bytes exceeds the RAM budget of %d bytes", entry.nbytes,
                            self.budget_bytes)
                return False
            self._make_room(entry.nbytes)
            if self._bytes + entry.nbytes > self.budget_bytes:
                return False
            self._entries[entry.key] = entry
            self._by_content.setdefault(entry.key.content, set()).add(entry.key.start)
            self._bytes += entry.nbytes
            return True

    def pin(self, key: EntryKey) -> None:
        with self._lock:
            self._pinned.add(key)

    def unpin(self, key: EntryKey) -> None:
        with self._lock:
            self._pinned.discard(key)

    def is_pinned(self, key: EntryKey) -> bool:
        return key in self._pinned

    def entries(self) -> list[StoredModule]:
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_content.clear()
            self._bytes = 0

    def _make_room(self, needed: int) -> None:
        for key in list(self._entries):
            if self._bytes + needed <= self.budget_bytes:
                return
            if key not in self._pinned:
                self._remove(key)
                self.evictions += 1

    def _remove(self, key: EntryKey) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        starts = self._by_content.get(key.content)
        if starts is not None:
            starts.discard(key.start)
            if not starts:
                del self._by_content[key.content]
