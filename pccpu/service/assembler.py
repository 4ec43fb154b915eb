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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pccpu.engine import LlamaContext
from pccpu.errors import EngineError, StateError
from pccpu.pml import CachedPiece, PromptPlan, UncachedPiece
from pccpu.service.resident import ResidentModules
from pccpu.store import StoredModule


@dataclass
class AssemblyTimings:
    restore_ms: float = 0.0
    copy_ms: float = 0.0
    decode_ms: float = 0.0
    restored_bytes: int = 0
    decoded_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleSource:
    """Where a cached module's cells come from: its stored state, the shift to apply to all of it (non-zero when
    it was found at another start than the schema's), and its text runs in schema positions (one state each)."""

    entry: StoredModule
    shift: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        runs = len(self.entry.meta.get("run_bytes") or [0])
        if runs != len(self.ranges):
            raise StateError(f"stored module {self.entry.key.file_stem} holds {runs} text run(s) where the schema "
                             f"has {len(self.ranges)}; clear the cache (pccpu cache clear)")

    def run_of(self, piece: CachedPiece) -> int:
        for index, (p0, p1) in enumerate(self.ranges):
            if p0 <= piece.schema_start and piece.schema_start + piece.length <= p1:
                return index
        raise EngineError(f"piece [{piece.schema_start}, {piece.schema_start + piece.length}) of module "
                          f"{piece.module!r} lies in none of its text runs {self.ranges}")


def assemble(
    context: LlamaContext,
    plan: PromptPlan,
    sources: dict[str, ModuleSource],
    *,
    request_seq: int,
    scratch_seqs: list[int],
    timings: AssemblyTimings,
    residents: ResidentModules | None = None,
    keep_request_below: int | None = None,
    protect: frozenset[tuple[Any, int]] = frozenset(),
) -> tuple[np.ndarray, int]:
    """Fill ``request_seq`` with the plan's prompt; return the logits after its last token and the position where
    generation continues.

    Each run of a module is restored when its first piece comes, so cells are taken in plan order: for a prompt
    laid out like the schema that is position order, the same cells a full prefill fills (without flash
    attention, llama.cpp's results depend on where cells lie, not only on their positions).

    With ``residents``, a run used at its stored position is taken from (or restored into) a resident sequence
    and stays there after the request (see ``resident.py``); the cache is then cleared around resident runs.

    With ``keep_request_below``, ``request_seq`` already holds the plan's earlier cells (the previous request's,
    see ``reuse.py``): its cells from that position on are dropped and ``plan`` is only what follows; ``protect``
    then names the runs of the whole prompt (see ``plan_run_keys``), so that no resident run it uses is evicted.
    """
    keep = list(residents.seq_ids) if residents is not None else []
    if keep_request_below is None:
        # start from the first cell, as a full prefill of the same prompt does (see LlamaContext.clear)
        context.clear(keep=keep)
    else:
        # llama.cpp searches for free cells from the first one freed: the rest lands right after the kept cells
        context.clear(keep=[*keep, request_seq])
        context.seq_rm(request_seq, keep_request_below, -1)
    run_of = {id(p): (p.module, sources[p.module].run_of(p)) for p in plan.pieces if isinstance(p, CachedPiece)}
    remaining = Counter(run_of.values())
    # runs that move in this prompt are restored into a private scratch: seq_add moves a cell for all its holders
    moving = {run_of[id(p)] for p in plan.pieces if isinstance(p, CachedPiece) and (p.shift or sources[p.module].shift)}
    plan_keys = plan_run_keys(plan, sources) | protect
    resident_runs: set[tuple[str, int]] = set()
    scratch_of: dict[tuple[str, int], int] = {}
    free = list(scratch_seqs)
    logits: np.ndarray | None = None
    last_index = len(plan.pieces) - 1
    try:
        for index, piece in enumerate(plan.pieces):
            if isinstance(piece, UncachedPiece):
                if not piece.tokens:
                    continue
                started = time.perf_counter()
                want = "last" if index == last_index else "none"
                logits = context.decode(piece.tokens, seq_id=request_seq, start=piece.start, logits=want)
                timings.decode_ms += (time.perf_counter() - started) * 1000
                timings.decoded_tokens += len(piece.tokens)
                continue
            run = run_of[id(piece)]
            seq = scratch_of.get(run)
            if seq is None:
                source = sources[piece.module]
                key = (source.entry.key, run[1])
                use_resident = residents is not None and residents.enabled and run not in moving
                seq = residents.get(key) if use_resident else None  # type: ignore[union-attr]
                if seq is not None:
                    resident_runs.add(run)
                    scratch_of[run] = seq
                else:
                    p0, p1 = source.ranges[run[1]]
                    reserved = (residents.reserve(key, p1 - p0, protect=plan_keys)  # type: ignore[union-attr]
                                if use_resident else None)
                    if reserved is not None:
                        seq = reserved
                    elif free:
                        seq = free.pop()
                    else:
                        raise EngineError(
                            f"more than {len(scratch_seqs)} module runs are open at once in this prompt; create "
                            "the PromptCache with a larger n_seq_max"
                        )
                    scratch_of[run] = seq  # released by the finally below if anything fails from here
                    state = source.entry.runs()[run[1]]
                    started = time.perf_counter()
                    context.state_seq_set(seq, state)
                    if reserved is not None:
                        residents.admit(key, reserved, p1 - p0)  # type: ignore[union-attr]
                        resident_runs.add(run)
                    if source.shift:
                        context.seq_add(seq, -1, -1, source.shift)
                    timings.restore_ms += (time.perf_counter() - started) * 1000
                    timings.restored_bytes += state.nbytes
            started = time.perf_counter()
            if piece.shift:
                context.seq_add(seq, piece.schema_start, piece.schema_start + piece.length, piece.shift)
            context.seq_cp(seq, request_seq, piece.start, piece.end)
            if run not in resident_runs:
                context.seq_rm(seq, piece.start, piece.end)
            remaining[run] -= 1
            if remaining[run] == 0:
                done = scratch_of.pop(run)
                if run not in resident_runs:
                    context.seq_rm(done)
                    free.append(done)
            timings.copy_ms += (time.perf_counter() - started) * 1000
        if logits is None:
            return _redecode_last(context, plan, request_seq, timings)
    finally:
        for run, seq in scratch_of.items():
            if run not in resident_runs:
                context.seq_rm(seq)
    return logits, plan.next_position


def plan_run_keys(plan: PromptPlan, sources: dict[str, ModuleSource]) -> frozenset[tuple[Any, int]]:
    """(stored state key, run index) of every module run the plan uses."""
    return frozenset((sources[p.module].entry.key, sources[p.module].run_of(p))
                     for p in plan.pieces if isinstance(p, CachedPiece))


def _redecode_last(
    context: LlamaContext, plan: PromptPlan, request_seq: int, timings: AssemblyTimings
) -> tuple[np.ndarray, int]:
    """A prompt that ends with a cached piece: states hold no logits, so decode its last token again."""
    last = plan.pieces[-1]
    assert isinstance(last, CachedPiece)
    token = plan.piece_tokens(last)[-1]
    position = last.end - 1
    context.seq_rm(request_seq, position, -1)
    # after removing the last cell, the sequence may end before position - 1 (a gap): extend at pos_max + 1
    at = context.seq_pos_max(request_seq) + 1
    started = time.perf_counter()
    logits = context.decode([token], seq_id=request_seq, start=at)
    timings.decode_ms += (time.perf_counter() - started) * 1000
    timings.decoded_tokens += 1
    assert logits is not None
    return logits, at + 1
