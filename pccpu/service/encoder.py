"""Encoding modules: decode each pass (see ``passes.py``) into a work sequence and save every module's text cells
as its own sequence state.

Positions. Cells before the first saved cell of a pass are context: they are packed right before it, so the first
saved cell is decoded at its exact schema position with its context adjacent. After that, runs of consecutive
positions are decoded where they belong; a run after a gap (a shorter union member, a module left out of the
pass) is decoded at ``pos_max + 1`` (llama.cpp's rule) and then shifted to its schema position.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pccpu.engine.protocols import Context
from pccpu.errors import InternalError
from pccpu.service.passes import Cell, EncodePass, ModuleCells

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens total)


@dataclass
class EncodedModule:
    cells: ModuleCells
    context: tuple[Cell, ...]
    state: np.ndarray  # the runs' sequence states, concatenated
    run_bytes: tuple[int, ...]  # size of each run's state, one per range of ``cells``


@dataclass
class EncodeStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _runs(cells: list[Cell]) -> list[list[Cell]]:
    runs: list[list[Cell]] = []
    for cell in cells:
        if runs and runs[-1][-1][0] + 1 == cell[0]:
            runs[-1].append(cell)
        else:
            runs.append([cell])
    return runs


def encode_pass(
    context: Context,
    encode_pass: EncodePass,
    *,
    work_seq: int,
    save_seq: int,
    stats: EncodeStats | None = None,
    progress: ProgressCallback | None = None,
    done_before: int = 0,
    total: int = 0,
) -> list[EncodedModule]:
    """Decode the pass into ``work_seq`` from a cleared cache and return each saved module's state."""
    started = time.perf_counter()
    first_saved = encode_pass.first_saved
    before = [c for c in encode_pass.cells if c[0] < first_saved]
    after = [c for c in encode_pass.cells if c[0] >= first_saved]
    context.clear()  # nothing else lives in the KV between requests; same cells as a full prefill would use
    done = done_before
    try:
        if before:
            # the context, packed so that it ends right before the first saved cell
            context.decode([t for _, t in before], seq_id=work_seq, start=first_saved - len(before), logits="none")
            done += len(before)
            if progress:
                progress(done, total)
        for run in _runs(after):
            target = run[0][0]
            next_free = context.seq_pos_max(work_seq) + 1
            at = target if next_free == 0 else next_free
            if at > target:
                raise InternalError(f"encode pass cells overlap at position {target}")
            context.decode([t for _, t in run], seq_id=work_seq, start=at, logits="none")
            if at != target:
                context.seq_add(work_seq, at, at + len(run), target - at)
            done += len(run)
            if progress:
                progress(done, total)
        context.apply_pending_shift()
        out = []
        for module in encode_pass.saved:
            # one state per run: each is restored at its own turn, keeping the request's cells in position order
            runs = []
            for p0, p1 in module.ranges:
                context.seq_cp(work_seq, save_seq, p0, p1)
                runs.append(context.state_seq_get(save_seq))  # a fresh array owned by the caller
                context.seq_rm(save_seq)
            state = runs[0] if len(runs) == 1 else np.concatenate(runs)
            out.append(EncodedModule(module, encode_pass.context_of(module), state, tuple(r.nbytes for r in runs)))
    finally:
        context.seq_rm(work_seq)
        context.seq_rm(save_seq)
    if stats is not None:
        stats.tokens += len(encode_pass.cells)
        stats.seconds += time.perf_counter() - started
    return out
