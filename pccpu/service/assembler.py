"""Building a request sequence from a prompt plan: bring back each cached piece, decode uncached tokens at their
turn, and return the logits after the last prompt token.

Sequences. The request is built in ``request_seq``. A module's state is restored into a scratch sequence
(a restore replaces the scratch's content), moved there if it must move (``seq_add`` moves a cell for every
sequence holding it, so only a private scratch may be shifted), and its pieces are copied into the request as
their turn comes (zero-copy with a unified KV cache), then dropped from the scratch. A scratch is released once
its module's last piece is copied. llama.cpp extends a sequence only at ``pos_max + 1``: the plan puts uncached
tokens exactly there (see ``pccpu.pml``), and pieces are handled strictly in plan order.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pccpu.engine import LlamaContext
from pccpu.errors import EngineError
from pccpu.pml import CachedPiece, PromptPlan, UncachedPiece
from pccpu.store import StoredModule


@dataclass
class AssemblyTimings:
    restore_ms: float = 0.0
    copy_ms: float = 0.0
    decode_ms: float = 0.0
    restored_bytes: int = 0
    decoded_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def assemble(
    context: LlamaContext,
    plan: PromptPlan,
    states: dict[str, tuple[StoredModule, int]],
    *,
    request_seq: int,
    scratch_seqs: list[int],
    timings: AssemblyTimings,
) -> tuple[np.ndarray, int]:
    """Fill ``request_seq`` with the plan's prompt; return the logits after its last token and the position where
    generation continues.

    ``states`` maps each cached module path to its stored state and the shift to apply to it as a whole (non-zero
    when the state was found at another start position than the schema's).
    """
    context.clear()  # start from the first cell, as a full prefill of the same prompt does (see LlamaContext.clear)
    remaining = Counter(p.module for p in plan.pieces if isinstance(p, CachedPiece))
    scratch_of: dict[str, int] = {}
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
            seq = scratch_of.get(piece.module)
            if seq is None:
                if not free:
                    raise EngineError(
                        f"more than {len(scratch_seqs)} modules are open at once in this prompt; create the "
                        "PromptCache with a larger n_seq_max"
                    )
                seq = free.pop()
                entry, whole_shift = states[piece.module]
                started = time.perf_counter()
                context.state_seq_set(seq, entry.state)
                if whole_shift:
                    context.seq_add(seq, -1, -1, whole_shift)
                timings.restore_ms += (time.perf_counter() - started) * 1000
                timings.restored_bytes += entry.nbytes
                scratch_of[piece.module] = seq
            started = time.perf_counter()
            if piece.shift:
                context.seq_add(seq, piece.schema_start, piece.schema_start + piece.length, piece.shift)
            context.seq_cp(seq, request_seq, piece.start, piece.end)
            context.seq_rm(seq, piece.start, piece.end)
            remaining[piece.module] -= 1
            if remaining[piece.module] == 0:
                context.seq_rm(seq)
                free.append(scratch_of.pop(piece.module))
            timings.copy_ms += (time.perf_counter() - started) * 1000
        if logits is None:
            return _redecode_last(context, plan, request_seq, timings)
    finally:
        for seq in scratch_of.values():
            context.seq_rm(seq)
    return logits, plan.next_position


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
