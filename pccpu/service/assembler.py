"""Building a request sequence from a prompt plan: bring back each cached piece, decode uncached tokens at their
turn, and return the logits after the last prompt token.

Sequences. The request is built in ``request_seq``. A module's state (one per run of its text) is restored into a
scratch sequence (a restore replaces the scratch's content), moved there if it must move (``seq_add`` moves a cell
for every sequence holding it, so only a private scratch may be shifted), and its pieces are copied into the request
as their turn comes (zero-copy with a unified KV cache), then dropped from the scratch. A scratch is released once
its run's last piece is copied. llama.cpp extends a sequence only at ``pos_max + 1``: the plan puts uncached tokens
exactly there (see ``pccpu.pml``), and pieces are handled strictly in plan order. Resident runs (``resident.py``)
live in their own sequences and are only copied from.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pccpu.engine.protocols import Context, LogitsMode
from pccpu.errors import ConfigError, InternalError, WindowLostError
from pccpu.pml import CachedPiece, UncachedPiece
from pccpu.service.request import ModuleSource, Request, RunKey
from pccpu.service.resident import ResidentModules


@dataclass
class AssemblyTimings:
    restore_ms: float = 0.0  # state copies into the KV cache, and their shifts
    decode_ms: float = 0.0


def assemble(
    context: Context,
    request: Request,
    sources: dict[str, ModuleSource],
    *,
    request_seq: int,
    scratch_seqs: list[int],
    timings: AssemblyTimings,
    residents: ResidentModules | None = None,
    keep_request_below: int | None = None,
    protect: frozenset[tuple[Any, int]] = frozenset(),
    live: Sequence[int] = (),
) -> tuple[np.ndarray, int]:
    """Fill ``request_seq`` with the request's prompt; return the logits after its last token and the position where
    generation continues.

    Each run of a module is restored when its first piece comes, so cells are taken in plan order: for a prompt
    laid out like the schema that is position order, the same cells a full prefill fills (without flash
    attention, llama.cpp's results depend on where cells lie, not only on their positions).

    With ``residents``, a run used at its stored position is taken from (or restored into) a resident sequence
    and stays there after the request (see ``resident.py``); the cache is then cleared around resident runs.

    With ``keep_request_below``, ``request_seq`` already holds the prompt's earlier cells (the session's previous
    request, see ``reuse.py``): its cells from that position on are dropped and ``request`` is only what follows;
    ``protect`` then names the runs of the whole prompt (see ``run_keys``), so that no resident run it uses is
    evicted.

    ``live``: per piece of the plan, how many first tokens of a cached piece to decode in place instead of copying
    them (boundary repair, see ``repair.py``).
    """
    plan = request.plan
    keep = list(residents.seq_ids) if residents is not None else []
    if keep_request_below is None:
        # start from the first cell, as a full prefill of the same prompt does (see LlamaContext.clear)
        context.clear(keep=keep)
    else:
        # llama.cpp searches for free cells from the first one freed: the rest lands right after the kept cells
        context.clear(keep=[*keep, request_seq])
        context.seq_rm(request_seq, keep_request_below, -1)
        if not context.window_intact(request_seq, keep_request_below):
            raise WindowLostError(f"the session's cells before position {keep_request_below} lost sliding-window "
                                  "cells (llama.cpp reused them): assemble from the store")
    remaining = Counter(run for run in request.runs if run is not None)
    # runs that move in this prompt are restored into a private scratch: seq_add moves a cell for all its holders
    moving = {run for piece, run in zip(plan.pieces, request.runs, strict=True)
              if run is not None and isinstance(piece, CachedPiece) and (piece.shift or sources[piece.module].shift)}
    plan_keys = run_keys(request, sources) | protect
    resident_runs: set[RunKey] = set()
    scratch_of: dict[RunKey, int] = {}
    free = list(scratch_seqs)
    logits: np.ndarray | None = None
    last_index = len(plan.pieces) - 1
    try:
        for index, (piece, run) in enumerate(zip(plan.pieces, request.runs, strict=True)):
            if isinstance(piece, UncachedPiece):
                if not piece.tokens:
                    continue
                started = time.perf_counter()
                want: LogitsMode = "last" if index == last_index else "none"
                logits = context.decode(piece.tokens, seq_id=request_seq, start=piece.start, logits=want)
                timings.decode_ms += (time.perf_counter() - started) * 1000
                continue
            if run is None:
                raise InternalError(f"cached piece {index} of the plan has no module run")
            n_live = live[index] if live else 0
            if n_live:
                # boundary repair: the piece's first tokens decoded after everything before them (repair.py)
                want = "last" if index == last_index and n_live == piece.length else "none"
                logits = _decode_at(context, plan.piece_tokens(piece)[:n_live], request_seq, piece.start, want,
                                    timings)
            seq = scratch_of.get(run)
            if seq is None and (n_live < piece.length or remaining[run] > 1):
                seq, resident = _bring_run(context, request, sources[piece.module], run, moving, residents,
                                           plan_keys, free, timings, len(scratch_seqs))
                scratch_of[run] = seq  # released by the finally below if anything fails from here
                if resident:
                    resident_runs.add(run)
            if seq is not None:
                if piece.shift:
                    context.seq_add(seq, piece.schema_start, piece.schema_start + piece.length, piece.shift)
                if n_live < piece.length:
                    context.seq_cp(seq, request_seq, piece.start + n_live, piece.end)
                if run not in resident_runs:
                    context.seq_rm(seq, piece.start, piece.end)
            remaining[run] -= 1
            if remaining[run] == 0 and run in scratch_of:
                done = scratch_of.pop(run)
                if run not in resident_runs:
                    context.seq_rm(done)
                    free.append(done)
        if logits is None:
            return _redecode_last(context, request, request_seq, timings)
    finally:
        for run, seq in scratch_of.items():
            if run not in resident_runs:
                context.seq_rm(seq)
    return logits, plan.next_position


def _decode_at(context: Context, tokens: Sequence[int], seq: int, start: int, want: LogitsMode,
               timings: AssemblyTimings) -> np.ndarray | None:
    """Decode ``tokens`` into ``seq`` at positions ``start, start + 1, ...``: llama.cpp extends a sequence at
    ``pos_max + 1``, so after a gap (a shorter union member) they are decoded there and moved to ``start`` (their
    logits are then not returned: they were computed before the move)."""
    next_free = context.seq_pos_max(seq) + 1
    at = start if next_free == 0 else next_free
    if at > start:
        raise InternalError(f"a repaired piece at position {start} overlaps cells up to {at - 1} (a planner bug)")
    started = time.perf_counter()
    logits = context.decode(list(tokens), seq_id=seq, start=at, logits=want if at == start else "none")
    if at != start:
        context.seq_add(seq, at, at + len(tokens), start - at)
    timings.decode_ms += (time.perf_counter() - started) * 1000
    return logits


def _bring_run(context: Context, request: Request, source: ModuleSource, run: RunKey, moving: set[RunKey],
               residents: ResidentModules | None, plan_keys: frozenset[tuple[Any, int]], free: list[int],
               timings: AssemblyTimings, n_scratch: int) -> tuple[int, bool]:
    """The sequence that holds ``run`` for this request, and whether it is resident: a resident one, or a scratch
    (or new resident) one it is restored into now."""
    key = (source.entry.key, run[1])
    n_cells = request.run_cells(run)
    reserved: int | None = None
    if residents is not None and residents.enabled and run not in moving:
        seq = residents.get(key)
        if seq is not None:
            return seq, True
        reserved = residents.reserve(key, n_cells, protect=plan_keys)
    if reserved is not None:
        seq = reserved
    elif free:
        seq = free.pop()
    else:
        raise ConfigError(f"more than {n_scratch} module runs are open at once in this prompt; create the "
                          "PromptCache with a larger n_seq_max")
    started = time.perf_counter()
    context.state_seq_set(seq, source.entry.runs()[run[1]])
    if reserved is not None and residents is not None:
        residents.admit(key, reserved, n_cells)
    if source.shift:
        context.seq_add(seq, -1, -1, source.shift)
    timings.restore_ms += (time.perf_counter() - started) * 1000
    return seq, reserved is not None


def run_keys(request: Request, sources: dict[str, ModuleSource]) -> frozenset[tuple[Any, int]]:
    """(stored state key, run index) of every module run the request uses."""
    return frozenset((sources[run[0]].entry.key, run[1]) for run in request.runs if run is not None)


def _redecode_last(context: Context, request: Request, request_seq: int,
                   timings: AssemblyTimings) -> tuple[np.ndarray, int]:
    """A prompt that ends with a cached piece: states hold no logits, so decode its last token again."""
    plan = request.plan
    last = plan.pieces[-1]
    token = plan.piece_tokens(last)[-1]
    position = last.end - 1
    context.seq_rm(request_seq, position, -1)
    # after removing the last cell, the sequence may end before position - 1 (a gap): extend at pos_max + 1
    at = context.seq_pos_max(request_seq) + 1
    started = time.perf_counter()
    logits = context.decode([token], seq_id=request_seq, start=at)
    timings.decode_ms += (time.perf_counter() - started) * 1000
    if logits is None:
        raise InternalError("a decode asked for the last logits returned none")
    return logits, at + 1
