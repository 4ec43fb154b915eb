"""Resident modules: module runs kept as sequences of the context's own KV cache between requests.

The paper's "modules in GPU memory" case. A run that is resident is put into a request with ``seq_cp``, which with a
unified KV cache only tags the run's cells with the request's sequence id: nothing is copied, not even within the
device. A run that is not resident is restored from host memory (the RAM tier) as before and, when it is used at its
stored position, restored into a resident sequence instead of a scratch one, so the next request finds it there.

Where the memory is: the KV cache lives on the GPU when the model's layers are offloaded with ``offload_kqv`` (the
default), in host memory otherwise; resident runs work (and save the restore copy) on the CPU too.

Budget: resident runs hold at most ``budget_cells`` cells (bytes / KV bytes per token); the context is created with
that many cells on top of the request's ``n_ctx``, so a request always finds room. Least recently used runs are
dropped first (``seq_rm``: cells the current request shares stay until it ends).

Trade-off: requests no longer start from a cleared cache, so new cells land wherever the resident ones left room.
Without flash attention llama.cpp's results depend slightly on cell placement, so answers are close to, but not
bit-identical with, a full prefill (the host-memory path keeps them identical for prefix layouts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pccpu.engine.protocols import Context
from pccpu.errors import InternalError
from pccpu.store import EntryKey, Lru

logger = logging.getLogger(__name__)

RunKey = tuple[EntryKey, int]  # (stored module, index of the run within it)


@dataclass
class ResidentStats:
    hits: int = 0  # runs taken from the KV cache
    admitted: int = 0  # runs restored into a resident sequence
    evicted: int = 0
    refused: int = 0  # runs larger than the budget, or no free sequence id


class ResidentModules:
    """Which module runs are resident, in which sequence, least recently used first (sizes in KV cells)."""

    def __init__(self, context: Context, seq_ids: list[int], budget_cells: int) -> None:
        self.context = context
        self._runs: Lru[RunKey, int] = Lru(budget_cells)  # key -> seq id
        self._free = list(reversed(seq_ids))
        self.stats = ResidentStats()

    @property
    def enabled(self) -> bool:
        return self._runs.budget > 0

    @property
    def budget_cells(self) -> int:
        return self._runs.budget

    @property
    def used_cells(self) -> int:
        return self._runs.used

    @property
    def seq_ids(self) -> list[int]:
        """Sequences that hold resident runs (to keep when the rest of the cache is cleared)."""
        return self._runs.values()

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, key: RunKey) -> bool:
        return key in self._runs

    def get(self, key: RunKey) -> int | None:
        """The sequence holding the run, marked as just used; None when it is not resident."""
        seq = self._runs.get(key)
        if seq is not None:
            self.stats.hits += 1
        return seq

    def reserve(self, key: RunKey, n_cells: int, *, protect: frozenset[RunKey] = frozenset()) -> int | None:
        """A sequence id to restore the run into, after dropping least recently used runs (never those in
        ``protect``) until it fits; None when it cannot fit. Call ``admit`` once the restore succeeded."""
        if not self.enabled:
            return None
        evicted = self._runs.make_room(n_cells, protect)
        if evicted is not None and not self._free:  # room enough, but every sequence id is taken
            oldest = next((k for k in self._runs if k not in protect), None)
            if oldest is not None:
                evicted.append((oldest, self._runs.pop(oldest)))  # type: ignore[arg-type]
        for old, seq in evicted or []:
            self._release(old, seq)
        if evicted is None or not self._free:
            self.stats.refused += 1
            return None
        return self._free[-1]

    def admit(self, key: RunKey, seq_id: int, n_cells: int) -> None:
        """Record that ``seq_id`` (from ``reserve``) now holds the run."""
        if key in self._runs or seq_id not in self._free:
            raise InternalError(f"run {key[0].file_stem}#{key[1]} admitted twice, or into a taken sequence {seq_id}")
        if self._runs.put(key, seq_id, n_cells) is None:
            raise InternalError(f"run {key[0].file_stem}#{key[1]} admitted without room reserved")
        self._free.remove(seq_id)
        self.stats.admitted += 1

    def clear(self) -> None:
        """Drop every resident run."""
        for key, seq in self._runs.clear():
            self._release(key, seq)

    def _release(self, key: RunKey, seq_id: int) -> None:
        self.context.seq_rm(seq_id)
        self._free.append(seq_id)
        self.stats.evicted += 1
        logger.debug("resident run %s#%d dropped from sequence %d", key[0].file_stem, key[1], seq_id)
