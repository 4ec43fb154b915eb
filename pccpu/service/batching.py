"""Batched generation (continuous batching): several chat answers generated together, one ``llama_decode`` per step
for all of them, new requests admitted between steps.

    with pc.batch(parallel=4) as batch:
        first = batch.admit(pc.chat(messages_a))     # prefilled now; None: not now, admit it again later
        second = batch.admit(pc.chat(messages_b))
        while batch.active:
            for ticket, text in batch.step():        # one token more for every answer in flight
                ...
            # an answer that ended has ticket.result (or ticket.error)

On a CPU a step of several sequences costs little more than a step of one (``python -m pccpu.bench.batching``:
1.7x the tokens per second for two sequences, 2.5x for four, on Qwen2.5-Coder-0.5B), so answers in flight together
finish sooner, and a request that arrives while another is generating starts after that one's next token instead of
after its last. Prefill gains nothing from batching: a request is prefilled alone, the others waiting meanwhile.

Sequences. A request is prefilled in the request sequence as always (its session switched in, the module store and
chat path unchanged). While it is the only answer in flight it generates there, exactly as without a batch. When
another request is admitted, the answer in the request sequence moves to a *lane* of its own (``seq_cp`` then
``seq_rm``: its cells are relabelled, not copied), and every clear keeps the lanes. An answer that ends in a lane
parks its session's cells in RAM from there (what a switch of sessions would do); one that ends in the request
sequence leaves its session active. Lanes are the scratch sequences, which only PML requests use (those run alone).

Sliding-window models (Gemma 3) batch the same way: a token of one lane may take a window cell that another lane's
next token can no longer see (llama.cpp's ``find_slot``), and the context follows every sequence's window floor, so
a session whose old cells were taken starts its next turn from the module store, as it would alone.

Admission. A request waits (``admit`` returns None) while its session has an answer in flight, while every lane is
taken, or while the KV cells that the answers in flight may still need (prompt plus max_tokens each) leave too few
for its own; a prefill that finds no room anyway (cells scattered between lanes) waits too, for the batch to empty.

Exactness. llama.cpp's results depend slightly on batch size and on where cells lie, so an answer generated beside
others, or prefilled while others hold cells, is not bit-identical to the same answer alone (greedy text agrees
almost always; first-token logits differ in the last bits). An answer alone in the batch is computed exactly as
without one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pccpu.errors import ConfigError, EngineError, NoKvSlotError, OptionError, StateError
from pccpu.generation.stream import Generation, GenerationOutcome
from pccpu.service.answering import REQUEST_SEQ, Prefill, PromptFacts, RequestPath
from pccpu.service.options import GenerationOptions
from pccpu.service.result import Result
from pccpu.service.sessions import SessionState, SessionTable

if TYPE_CHECKING:
    from pccpu.service.answer import Answer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatJob:
    """What a ``chat()`` or ``complete()`` answer runs, for a batch to run instead of the answer itself."""

    opts: GenerationOptions
    plan: Callable[[], PlannedChat]  # builds the chunks (tokenizes): may raise the request's errors


@dataclass
class PlannedChat:
    """A chat request ready to be prefilled: its prompt's length, and how to find its session and prefill it."""

    prompt_tokens: int
    facts: PromptFacts
    session: Callable[[], SessionState]  # the session it runs in (found by content for automatic ones)
    prefill: Callable[[SessionState, dict[str, float]], Callable[[], Prefill]]
    started: float
    clock: dict[str, float]


@dataclass(eq=False)
class Ticket:
    """One answer in a batch. Its text arrives through ``Batch.step``; once it ends, ``result`` (or ``error``)."""

    state: SessionState
    facts: PromptFacts
    prefill: Prefill
    run: Generation
    started: float
    clock: dict[str, float]
    seq: int  # the sequence its cells are in: the request sequence, or a lane
    reserved: int  # cells it may hold at most: prompt plus max_tokens
    first_logits: np.ndarray | None
    token: int | None = None  # chosen, decoded by the next step
    ttft_ms: float | None = None
    result: Result | None = None
    error: BaseException | None = None
    texts: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class Batch:
    """Answers generated together on one PromptCache (see the module's doc). Created by ``PromptCache.batch()``,
    which holds the cache until ``close()``; used from one thread."""

    def __init__(self, path: RequestPath, sessions: SessionTable, lanes: list[int], parallel: int,
                 busy_lanes: set[int], release: Callable[[], None]) -> None:
        self._path = path
        self._context = path.runtime.context
        self._sessions = sessions
        self._free_lanes = list(reversed(lanes))
        self._busy_lanes = busy_lanes  # shared with the cache: every clear keeps these
        self.parallel = parallel
        self._release: Callable[[], None] | None = release
        self.tickets: list[Ticket] = []
        self.owner = threading.get_ident()  # the thread that opened it: the only one that may use it
        self.steps = 0  # decode steps run
        self.batched_tokens = 0  # tokens decoded in steps of more than one answer

    @property
    def active(self) -> bool:
        return bool(self.tickets)

    @property
    def capacity(self) -> int:
        """KV cells the answers in flight may use together: the context's, less what resident module runs may hold
        (``resident.py``: the context was made that much larger for them)."""
        return self._context.n_ctx - self._path.residents.budget_cells

    def admit(self, answer: Answer) -> Ticket | None:
        """Prefill ``answer``'s request and choose its first token; None when it must wait (see the module's doc).
        The answer itself is used up: its text comes through ``step``. Errors of the request are raised."""
        self._check_open()
        job = answer._take_batch_job()
        if job is None:
            raise OptionError("only chat() and complete() answers with cache=True can be batched; run this one alone")
        planned = job.plan()
        reserved = min(planned.prompt_tokens + job.opts.generation().max_tokens, self._path.n_ctx)
        if self.tickets and (len(self.tickets) >= self.parallel
                             or sum(t.reserved for t in self.tickets) + reserved > self.capacity):
            answer._give_back_batch_job(job)
            return None
        state = planned.session()
        if any(t.state is state for t in self.tickets):
            answer._give_back_batch_job(job)
            return None
        self._vacate_request_seq()
        try:
            filled = self._path.prepare(state, planned.prefill(state, planned.clock), planned.clock)
        except (NoKvSlotError, StateError) as exc:
            if not self.tickets:
                raise
            logger.info("no room for a request beside %d answers in flight (%s): it waits", len(self.tickets), exc)
            answer._give_back_batch_job(job)
            return None
        opts = job.opts
        run = Generation(self._path.runtime.model, opts.generation(), next_position=filled.next_position,
                         limit=min(self._path.n_ctx, self._context.n_ctx), outcome=GenerationOutcome(),
                         history=self._path.history(planned.facts, opts))
        ticket = Ticket(state, planned.facts, filled, run, planned.started, planned.clock, REQUEST_SEQ, reserved,
                        filled.logits.copy() if opts.keep_logits else None)
        self.tickets.append(ticket)
        self._choose(ticket, filled.logits)
        return ticket

    def step(self) -> list[tuple[Ticket, str]]:
        """Decode the chosen token of every answer in flight (one ``llama_decode``), choose each one's next; the
        text that became certain, per answer. Answers that ended leave the batch with their result."""
        self._check_open()
        live = [t for t in self.tickets if t.token is not None]
        out: list[tuple[Ticket, str]] = []
        if not live:
            return out
        began = time.perf_counter()
        try:
            if len(live) == 1:  # alone: the very decode an answer outside a batch runs
                t = live[0]
                logits = self._context.decode([t.token], seq_id=t.seq, start=t.run.position)  # type: ignore[list-item]
                if logits is None:
                    raise EngineError("llama.cpp returned no logits for a generated token")
                rows = logits[None, :]
            else:
                rows = self._context.decode_step([(t.token, t.seq, t.run.position) for t in live])  # type: ignore[misc]
                self.batched_tokens += len(live)
            self.steps += 1
            ms = (time.perf_counter() - began) * 1000
            for t, row in zip(live, rows, strict=True):
                t.run.decoded(ms)
                text = self._choose(t, row)
                if text:
                    out.append((t, text))
        except Exception as exc:  # every answer of the step ends with the error (its cells removed)
            for t in live:
                if t in self.tickets:
                    self._fail(t, exc)
            raise
        return out

    def forget(self, state: SessionState) -> None:
        """The session is being closed: its answer in flight, if any, stops now."""
        for ticket in list(self.tickets):
            if ticket.state is state:
                self.cancel(ticket)

    def cancel(self, ticket: Ticket) -> None:
        """Stop an answer (its client went away): it ends now, its cells kept for its session."""
        if ticket in self.tickets:
            ticket.run.cancel()
            self._end(ticket)

    def close(self) -> None:
        """Stop every answer still in flight and give the cache back."""
        for ticket in list(self.tickets):
            self.cancel(ticket)
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._release is None:
            raise ConfigError("this batch was closed; open another with PromptCache.batch()")

    def _choose(self, ticket: Ticket, logits: np.ndarray) -> str:
        ticket.token = ticket.run.choose(logits)
        text = ticket.run.take_text()
        if text:
            ticket.texts.append(text)
            if ticket.ttft_ms is None:
                ticket.ttft_ms = (time.perf_counter() - ticket.started) * 1000
        if ticket.token is None:
            self._end(ticket)
        return text

    def _vacate_request_seq(self) -> None:
        """Move the answer generating in the request sequence to a lane, so that the next request can be prefilled
        there (the cells are relabelled; the session is neither active nor parked while it generates)."""
        for t in self.tickets:
            if t.seq == REQUEST_SEQ:
                if not self._free_lanes:
                    raise ConfigError("no free lane for a batched answer (parallel is larger than the lanes)")
                lane = self._free_lanes.pop()
                self._context.seq_cp(REQUEST_SEQ, lane)
                self._context.seq_rm(REQUEST_SEQ)
                self._busy_lanes.add(lane)
                t.seq = lane
                if self._sessions.active is t.state:
                    self._sessions.detach_active()

    def _end(self, ticket: Ticket) -> None:
        """The answer is over: the result, its session's cells kept (parked from a lane)."""
        self.tickets.remove(ticket)
        try:
            ticket.result = self._path.conclude(
                ticket.facts, ticket.state, ticket.prefill, ticket.run.outcome, ticket.seq, clean=True,
                ttft_ms=ticket.ttft_ms, started=ticket.started, clock=ticket.clock, cache=True,
                first_logits=ticket.first_logits)
            if ticket.seq != REQUEST_SEQ:
                self._sessions.park(ticket.state, ticket.seq)
        except EngineError as exc:
            ticket.error = exc
            ticket.state.kept = None
            self._context.seq_rm(ticket.seq)
        finally:
            self._free_lane(ticket)

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        self.tickets.remove(ticket)
        ticket.error = exc
        ticket.state.kept = None
        self._context.seq_rm(ticket.seq)
        if ticket.seq == REQUEST_SEQ:
            self._sessions.forget_active()
        self._free_lane(ticket)

    def _free_lane(self, ticket: Ticket) -> None:
        if ticket.seq != REQUEST_SEQ:
            self._busy_lanes.discard(ticket.seq)
            self._free_lanes.append(ticket.seq)
