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
from collections import OrderedDict
from dataclasses import dataclass

from pccpu.engine import LlamaContext
from pccpu.store import EntryKey

logger = logging.getLogger(__name__)

RunKey = tuple[EntryKey, int]  # (stored module, index of the run within it)


@dataclass
class ResidentStats:
    hits: int = 0  # runs taken from the KV cache
    admitted: int = 0  # runs restored into a resident sequence
    evicted: int = 0
    refused: int = 0  # runs larger than the budget, or no free sequence id


class ResidentModules:
    """Which module runs are resident, in which sequence, least recently used first."""

    def __init__(self, context: LlamaContext, seq_ids: list[int], budget_cells: int) -> None:
        if budget_cells < 0:
            raise ValueError("budget_cells must be >= 0")
        self.context = context
        self.budget_cells = budget_cells
        self._free = list(reversed(seq_ids))
        self._runs: OrderedDict[RunKey, tuple[int, int]] = OrderedDict()  # key -> (seq id, cells)
        self._cells = 0
        self.stats = ResidentStats()

    @property
    def enabled(self) -> bool:
        return self.budget_cells > 0

    @property
    def used_cells(self) -> int:
        return self._cells

    @property
    def seq_ids(self) -> list[int]:
        """Sequences that hold resident runs (to keep when the rest of the cache is cleared)."""
        return [seq for seq, _ in self._runs.values()]

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, key: RunKey) -> bool:
        return key in self._runs

    def get(self, key: RunKey) -> int | None:
        """The sequence holding the run, marked as just used; None when it is not resident."""
        found = self._runs.get(key)
        if found is None:
            return None
        self._runs.move_to_end(key)
        self.stats.hits += 1
        return found[0]

    def reserve(self, key: RunKey, n_cells: int, *, protect: frozenset[RunKey] = frozenset()) -> int | None:
        """A sequence id to restore the run into, after dropping least recently used runs (never those in
        ``protect``) until it fits; None when it cannot fit. Call ``admit`` once the restore succeeded."""
        evictable = [k for k in self._runs if k not in protect]
        kept_cells = sum(self._runs[k][1] for k in self._runs if k in protect)
        if not self.enabled or kept_cells + n_cells > self.budget_cells or \
                (not self._free and not evictable):
            self.stats.refused += 1  # cannot fit even after dropping every other run: drop nothing
            return None
        for old in evictable:  # least recently used first
            if self._cells + n_cells <= self.budget_cells and self._free:
                break
            self._drop(old)
            self.stats.evicted += 1
        if self._cells + n_cells > self.budget_cells or not self._free:
            self.stats.refused += 1
            return None
        return self._free[-1]

    def admit(self, key: RunKey, seq_id: int, n_cells: int) -> None:
        """Record that ``seq_id`` (from ``reserve``) now holds the run."""
        if key in self._runs:
            raise ValueError(f"run {key[0].file_stem}#{key[1]} is resident already")
        self._free.remove(seq_id)
        self._runs[key] = (seq_id, n_cells)
        self._cells += n_cells
        self.stats.admitted += 1

    def clear(self) -> None:
        """Drop every resident run."""
        for key in list(self._runs):
            self._drop(key)
            self.stats.evicted += 1

    def _drop(self, key: RunKey) -> None:
        seq_id, n_cells = self._runs.pop(key)
        self.context.seq_rm(seq_id)
        self._cells -= n_cells
        self._free.append(seq_id)
        logger.debug("resident run %s#%d dropped from sequence %d", key[0].file_stem, key[1], seq_id)
