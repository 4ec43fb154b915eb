"""Sessions: several conversations on one context, each keeping its cells for its next request.

A session's cells are what its last request left in the request sequence: the prompt's cells and the generated
tokens', traced by a :class:`~pccpu.service.reuse.CellTrace`. Its next request keeps the longest common prefix of
the two traces and assembles only the rest (see ``reuse.py``).

One session is *active*: its cells are in the request sequence. Switching to another session *parks* the active one
(``llama_state_seq_get`` of the request sequence into host memory) and brings the arriving one back
(``llama_state_seq_set``), so going back and forth between conversations never prefills them again. Parked states
live in RAM under their own byte budget, least recently used dropped first (counted apart from module states); a
session whose state was dropped answers its next request from the module store, as a new session would.

Encoding (which clears the KV cache) parks the active session first, so adding a schema loses no conversation.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pccpu.engine.protocols import Context
from pccpu.errors import EngineError, SessionError, WindowLostError
from pccpu.service.reuse import CellTrace, common_prefix
from pccpu.store import Lru

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class SessionState:
    """The service's record of one session."""

    id: int
    name: str
    kept: CellTrace | None = None  # what its cells hold: in the request sequence when active, parked otherwise
    prompt_cells: int = 0  # of those, the last request's prompt (the rest is its answer)
    automatic: bool = False  # opened by ``continuation`` (a conversation found by content)
    # the logits after ``kept``'s last cell, when type-ahead decoded it (typeahead.py): valid only while ``kept`` is
    # that very trace, so a request whose prompt is exactly those cells needs no decode before its first token
    ready: tuple[CellTrace, np.ndarray] | None = None
    closed: bool = False
    requests: int = 0


@dataclass(frozen=True)
class SessionStats:
    sessions: int  # open sessions
    parked: int  # sessions whose cells wait in RAM
    parked_bytes: int
    budget_bytes: int
    dropped: int  # parked states dropped for the budget (those sessions start over from the module store)
    switches: int = 0
    switch_ms: float = field(default=0.0)  # total time spent parking and bringing back


class SessionTable:
    """Every open session, which one is active, and the parked states of the others."""

    def __init__(self, context: Context, request_seq: int, budget_bytes: int,
                 keep_seqs: Callable[[], list[int]]) -> None:
        self._context = context
        self._seq = request_seq
        self._keep_seqs = keep_seqs  # sequences a restore must not clear (resident runs), asked each time
        self._parked: Lru[int, np.ndarray] = Lru(budget_bytes)
        self._states: dict[int, SessionState] = {}
        self._automatic: OrderedDict[int, SessionState] = OrderedDict()  # least recently used first
        self._next_id = 0
        self._switches = 0
        self._switch_ms = 0.0
        self.active: SessionState | None = None

    def open(self, name: str | None = None) -> SessionState:
        state = SessionState(self._next_id, name or f"session-{self._next_id}")
        self._next_id += 1
        self._states[state.id] = state
        return state

    def continuation(self, trace: CellTrace, *, limit: int) -> SessionState:
        """The automatic session whose last prompt this request continues (the same cells up to that prompt's end:
        the next turn of its conversation, or the same prompt again), else a new automatic session; beyond
        ``limit`` automatic sessions the least recently used is closed. For clients that name no conversation."""
        best: SessionState | None = None
        for state in self._automatic.values():
            if state.kept is None or not state.prompt_cells:
                continue
            if common_prefix(state.kept, trace) >= min(state.prompt_cells, len(trace) - 1) and \
                    (best is None or state.prompt_cells > best.prompt_cells):
                best = state
        if best is None:
            best = self.open(f"auto-{self._next_id}")
            best.automatic = True
            self._automatic[best.id] = best
            while len(self._automatic) > limit:
                oldest = next(iter(self._automatic.values()))
                self.close(oldest)
        self._automatic.move_to_end(best.id)
        return best

    def check(self, state: SessionState) -> None:
        if state.closed or self._states.get(state.id) is not state:
            raise SessionError(f"session {state.name!r} was closed; open a new one with PromptCache.session()")

    def activate(self, state: SessionState) -> float:
        """Make ``state`` the session in the request sequence; the milliseconds it took (0 when it already was)."""
        self.check(state)
        if self.active is state:
            return 0.0
        started = time.perf_counter()
        self.park_active()
        blob = self._parked.pop(state.id)
        if blob is not None and state.kept is not None:
            try:
                self._context.clear(keep=self._keep_seqs())  # its cells go back where they were: from the first cell
                self._context.state_seq_set(self._seq, blob)
            except EngineError as exc:  # no room beside resident runs, or a rejected state: start over
                logger.info("session %r could not be brought back (%s); it starts from the module store",
                            state.name, exc)
                self._context.seq_rm(self._seq)
                state.kept = None
        else:
            state.kept = None
        self.active = state
        elapsed = (time.perf_counter() - started) * 1000
        self._switches += 1
        self._switch_ms += elapsed
        return elapsed

    def park_active(self) -> None:
        """Save the active session's cells into RAM and empty the request sequence."""
        state, self.active = self.active, None
        self.park(state, self._seq)

    def park(self, state: SessionState | None, seq: int) -> None:
        """Save ``state``'s cells, held in ``seq``, into RAM and empty ``seq`` (a batched answer that ended in a
        lane of its own parks its session from there)."""
        if state is not None and not state.closed and state.kept is not None and len(state.kept):
            self._context.apply_pending_shift()  # a state is saved with every shift applied
            try:
                blob = self._context.state_seq_get(seq)  # a fresh array
            except WindowLostError as exc:  # a sliding-window model reused some of its cells
                logger.info("session %r cannot be parked whole (%s): it starts over from the module store",
                            state.name, exc)
                state.kept = None
                self._context.seq_rm(seq)
                return
            evicted = self._parked.put(state.id, blob, blob.nbytes)
            if evicted is None:
                logger.info("session %r holds %d bytes of cells, more than the session budget of %d bytes: it "
                            "starts over from the module store", state.name, blob.nbytes, self._parked.budget)
                state.kept = None
            for dropped_id, _ in evicted or []:
                self._states[dropped_id].kept = None
                logger.info("session %r dropped from RAM (session budget)", self._states[dropped_id].name)
        self._context.seq_rm(seq)

    def detach_active(self) -> SessionState | None:
        """The active session's cells were moved out of the request sequence (to a batch lane): none is active, and
        nothing is parked. Returns the session that was active."""
        state, self.active = self.active, None
        return state

    def forget_active(self) -> None:
        """The request sequence was emptied (a full prefill, an error): the active session holds nothing."""
        if self.active is not None:
            self.active.kept = None

    def close(self, state: SessionState) -> None:
        if state.closed:
            return
        if self.active is state:
            self._context.seq_rm(self._seq)
            self.active = None
        self._parked.pop(state.id)
        state.closed = True
        state.kept = None
        self._states.pop(state.id, None)
        self._automatic.pop(state.id, None)

    def stats(self) -> SessionStats:
        return SessionStats(sessions=len(self._states), parked=len(self._parked), parked_bytes=self._parked.used,
                            budget_bytes=self._parked.budget, dropped=self._parked.evictions,
                            switches=self._switches, switch_ms=self._switch_ms)
