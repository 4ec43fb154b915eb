"""Reusing the previous request's cells: the longest common prefix of two requests, at cell level.

After an answer the request sequence still holds the prompt's cells and the generated tokens. The next prompt often
starts the same way: the same modules at the same positions, then the same role tags (a prefix cache's whole job),
or the whole previous conversation plus a new turn. Its first cells then hold the same KV and need not be restored
or decoded again: only the rest of the plan is assembled.

A :class:`CellTrace` says what each cell of a request holds, in plan order (positions increase along a plan):

* a stored module's cell: the state's identity, the cell's stored position and the shift the state was restored
  with (a cell's KV depends on all three: K is rotated by position);
* a token decoded in place: the token id (its KV depends on every earlier cell too, which a prefix match covers).

Two requests hold the same KV in their first ``k`` cells when their traces agree on those ``k`` entries: same
origin, same position. The answer after the prompt must come from a decode, so at least one cell is always left to
assemble.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pccpu.pml import CachedPiece, PromptPlan

TOKEN = -1  # ``state`` value of a cell decoded in place; module cells carry a state id >= 0


@dataclass(frozen=True)
class CellTrace:
    """Per cell of a request in plan order: position, state id (or TOKEN), stored position or token id, shift."""

    positions: np.ndarray
    states: np.ndarray
    values: np.ndarray
    shifts: np.ndarray
    # index of the first cell whose KV came from a composed state (a chat chunk restored after another prefix than
    # it was computed after, see chat.py), or -1: a session reusing cells before it reuses exact ones
    first_composed: int = -1

    def __len__(self) -> int:
        return len(self.positions)

    def decoded_cells(self, n: int) -> int:
        """How many of the first ``n`` cells were decoded in place (the rest came from stored states)."""
        return int(np.count_nonzero(self.states[:n] == TOKEN))

    def restored_cells(self, n: int) -> int:
        """How many cells after the first ``n`` come from stored states (the rest are decoded)."""
        return int(np.count_nonzero(self.states[n:] != TOKEN))

    def extended(self, tokens: list[int], start: int) -> CellTrace:
        """This trace with ``tokens`` decoded at ``start, start + 1, ...`` after it (the generated answer)."""
        n = len(tokens)
        return CellTrace(np.concatenate([self.positions, np.arange(start, start + n, dtype=np.int64)]),
                         np.concatenate([self.states, np.full(n, TOKEN, dtype=np.int64)]),
                         np.concatenate([self.values, np.asarray(tokens, dtype=np.int64)]),
                         np.concatenate([self.shifts, np.zeros(n, dtype=np.int64)]), self.first_composed)

    def head(self, n: int) -> CellTrace:
        """The first ``n`` cells."""
        first = self.first_composed if self.composed_within(n) else -1
        return CellTrace(self.positions[:n], self.states[:n], self.values[:n], self.shifts[:n], first)

    def composed_within(self, n: int) -> bool:
        """Whether any of the first ``n`` cells came from a composed state."""
        return 0 <= self.first_composed < n


class StateIds:
    """Small integers for stored states (by their key), so traces compare as arrays."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def of(self, key: str) -> int:
        return self._ids.setdefault(key, len(self._ids))


def trace_plan(plan: PromptPlan, state_keys: dict[str, tuple[str, int]], ids: StateIds,
               live: Sequence[int] = ()) -> CellTrace:
    """The cells ``plan`` puts in the request. ``state_keys`` maps a module path to (its stored state's key, the
    shift its whole state is restored with); ``live``: per piece, how many first cells of a cached piece are decoded
    in place instead (boundary repair, see ``repair.py``)."""
    positions, states, values, shifts = [], [], [], []
    for index, piece in enumerate(plan.pieces):
        span = np.arange(piece.start, piece.end, dtype=np.int64)
        positions.append(span)
        n_live = live[index] if live else 0
        if n_live and isinstance(piece, CachedPiece):
            # repaired cells are tokens decoded after the cells before them, like any decoded token
            states.append(np.full(n_live, TOKEN, dtype=np.int64))
            values.append(np.asarray(plan.piece_tokens(piece)[:n_live], dtype=np.int64))
            shifts.append(np.zeros(n_live, dtype=np.int64))
            piece = CachedPiece(piece.module, piece.schema_start + n_live, piece.start + n_live,
                                piece.length - n_live)
        if isinstance(piece, CachedPiece):
            key, state_shift = state_keys[piece.module]
            # stored position of each cell: its schema position less the state's shift (found at another start)
            stored = np.arange(piece.schema_start, piece.schema_start + piece.length, dtype=np.int64) - state_shift
            states.append(np.full(piece.length, ids.of(key), dtype=np.int64))
            values.append(stored)
            shifts.append(np.full(piece.length, state_shift * (1 << 32) + piece.shift, dtype=np.int64))
        else:
            states.append(np.full(piece.length, TOKEN, dtype=np.int64))
            values.append(np.asarray(piece.tokens, dtype=np.int64))
            shifts.append(np.zeros(piece.length, dtype=np.int64))
    if not positions:
        empty = np.zeros(0, dtype=np.int64)
        return CellTrace(empty, empty, empty, empty)
    return CellTrace(np.concatenate(positions), np.concatenate(states), np.concatenate(values),
                     np.concatenate(shifts))


def common_prefix(kept: CellTrace, new: CellTrace) -> int:
    """How many first cells of ``new`` the kept request already holds, leaving at least one to decode."""
    return matching_cells(kept, new, limit=len(new) - 1)


def matching_cells(kept: CellTrace, new: CellTrace, *, limit: int | None = None) -> int:
    """How many first cells the two traces hold alike (at most ``limit``)."""
    n = min(len(kept), len(new) if limit is None else limit)
    if n <= 0:
        return 0
    same = ((kept.positions[:n] == new.positions[:n]) & (kept.states[:n] == new.states[:n])
            & (kept.values[:n] == new.values[:n]) & (kept.shifts[:n] == new.shifts[:n]))
    differs = np.flatnonzero(~same)
    return int(differs[0]) if len(differs) else n


def plan_after(plan: PromptPlan, cells: int) -> PromptPlan:
    """``plan`` without its first ``cells`` cells: what is left to assemble after reusing them."""
    pieces = []
    skipped = 0
    for piece in plan.pieces:
        if skipped + piece.length <= cells:
            skipped += piece.length
            continue
        cut = max(0, cells - skipped)  # cells of this piece already held
        skipped += piece.length
        if cut == 0:
            pieces.append(piece)
        elif isinstance(piece, CachedPiece):
            pieces.append(CachedPiece(piece.module, piece.schema_start + cut, piece.start + cut, piece.length - cut))
        else:
            pieces.append(dataclasses.replace(piece, tokens=piece.tokens[cut:], start=piece.start + cut))
    return dataclasses.replace(plan, pieces=tuple(pieces))
