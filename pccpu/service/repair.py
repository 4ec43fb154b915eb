"""Boundary repair: which cached cells were computed after other cells than the prompt puts before them, and how
many of their first tokens to decode live instead.

A module's stored state is the KV its tokens got after the cells it was *encoded after* (its context: the schema
text before it in ``sequential`` mode, only its ancestors in ``isolated`` mode). When a prompt puts the module after
exactly those cells (same tokens at the same relative positions), its state is what a full prefill would compute:
it is used as stored, and a prefix layout stays bit-identical to full prefill. Otherwise the module is *composed*:
its cells never attended to what now precedes them. The worst of it is at its start: encoded as if it opened the
context, the module's first tokens draw the attention of everything after them (attention sinks), and the question
reads the wrong document (3/12 correct against 9/12 on Qwen2.5-Coder-0.5B, see the accuracy benchmark).

The repair (EPIC, "LegoLink"): for a composed run, decode its first ``k`` tokens live at their positions, attending
to everything placed before them, and restore only the rest of its stored state. It fits llama.cpp's rule that a
sequence grows at ``pos_max + 1``: those tokens come right after the cells before them, in plan order.

Comparing contexts. Each stored run records (at schema build time) how many cells it attended to before its first
cell and a digest of them as (position relative to the run's start, token) pairs. A request compares that with the
cells its plan puts before the piece, the same way: equal count, equal digest. Relative positions make a state
found at another start (shifted as a whole) exact when what precedes it moved with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pccpu.pml import CachedPiece, PromptPlan
from pccpu.service.passes import Cell, EncodePass, ModuleCells

# the default k, chosen by the accuracy benchmark (bench/accuracy.py, README): on Qwen2.5-Coder-0.5B at 2K tokens,
# k = 4..32 moved accuracy by +0.5 point (within the interval) for +60..210% TTFT; off until a model gains from it
DEFAULT_REPAIR_TOKENS = 0


@dataclass(frozen=True)
class RunContext:
    """The cells a stored run attended to before its first cell: how many, and their digest."""

    n_before: int
    digest: bytes


def cells_digest(positions: np.ndarray, tokens: np.ndarray, start: int) -> bytes:
    """Digest of cells: their positions less ``start``, then their tokens, as int64."""
    digest = hashlib.sha256((np.asarray(positions, dtype=np.int64) - start).tobytes())
    digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.digest()


def run_contexts(encode_pass: EncodePass, module: ModuleCells) -> tuple[RunContext, ...]:
    """What each of the module's runs attended to when ``encode_pass`` encoded it: the module's context cells and
    its own cells (and parameter fillers) before the run."""
    cells: list[Cell] = sorted([*encode_pass.context_of(module), *module.cells])
    positions = np.asarray([p for p, _ in cells], dtype=np.int64)
    tokens = np.asarray([t for _, t in cells], dtype=np.int64)
    out = []
    for p0, _ in module.ranges:
        n = int(np.searchsorted(positions, p0))
        out.append(RunContext(n, cells_digest(positions[:n], tokens[:n], p0)))
    return tuple(out)


def composed_offsets(plan: PromptPlan, contexts: Sequence[RunContext | None],
                     run_starts: Sequence[int | None]) -> tuple[int | None, ...]:
    """Per piece of ``plan``: None when it is decoded, or a cached piece used after exactly what it was encoded
    after; else how far into its run the piece begins (0 for a whole run), for :func:`live_tokens`.

    ``contexts[i]`` / ``run_starts[i]``: the stored run of piece ``i`` (its context and schema start), None for
    uncached pieces.
    """
    out: list[int | None] = []
    cells: tuple[np.ndarray, np.ndarray] | None = None
    offset = 0  # cells before the piece, in plan (= position) order
    for index, piece in enumerate(plan.pieces):
        context, run_start = contexts[index], run_starts[index]
        verdict: int | None = None
        if isinstance(piece, CachedPiece) and context is not None and run_start is not None:
            into_run = piece.schema_start - run_start
            exact = into_run == 0 and context.n_before == offset
            if exact and offset:
                if cells is None:
                    cells = _plan_cells(plan)
                exact = cells_digest(cells[0][:offset], cells[1][:offset], piece.start) == context.digest
            verdict = None if exact else into_run
        out.append(verdict)
        offset += piece.length
    return tuple(out)


def live_tokens(plan: PromptPlan, offsets: Sequence[int | None], repair_tokens: int) -> tuple[int, ...]:
    """Per piece: how many of its first tokens to decode live (the first ``repair_tokens`` of each composed run,
    less what an earlier piece of the same run covered)."""
    if repair_tokens <= 0:
        return (0,) * len(plan.pieces)
    return tuple(0 if into is None else max(0, min(repair_tokens - into, piece.length))
                 for piece, into in zip(plan.pieces, offsets, strict=True))


def _plan_cells(plan: PromptPlan) -> tuple[np.ndarray, np.ndarray]:
    """Positions and tokens of every cell of the plan, in plan order."""
    positions = np.concatenate([np.arange(p.start, p.end, dtype=np.int64) for p in plan.pieces])
    tokens = np.concatenate([np.asarray(plan.piece_tokens(p), dtype=np.int64) for p in plan.pieces])
    return positions, tokens
