"""The request path after planning: bring a request's prompt into the KV cache (from the module store and the
session's cells, or by full prefill), then generate, and report where every token came from.

    PromptCache.ask -> plan (a Request) -> switch to the session -> RequestPath.prefill_cached: find each cached
    module's state (encoding what is missing) -> trace the request's cells and keep what the session already holds
    -> assemble the rest (restore, copy, decode) -> RequestPath.generate -> Result

Sequence ids in the context: 0 the request (the active session's cells), 1 and 2 for encoding (work and save),
3..n_seq_max-1 scratch sequences that hold restored module states while a request is assembled, then one per
resident module run (see ``resident.py``) when a resident budget is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pccpu.errors import ConfigError, EngineError, NoKvSlotError, StateError, WindowLostError
from pccpu.generation.stream import GenerationOutcome, generate
from pccpu.pml import CachedPiece
from pccpu.service.assembler import AssemblyTimings, assemble, run_keys
from pccpu.service.encoder import ModuleEncoder
from pccpu.service.options import GenerationOptions
from pccpu.service.request import ModuleSource, Request, module_uses
from pccpu.service.resident import ResidentModules
from pccpu.service.result import ModuleUse, Result, Timings
from pccpu.service.reuse import CellTrace, StateIds, common_prefix, plan_after, trace_plan
from pccpu.service.runtime import Runtime
from pccpu.service.sessions import SessionState, SessionTable

logger = logging.getLogger(__name__)

REQUEST_SEQ, WORK_SEQ, SAVE_SEQ, FIRST_SCRATCH_SEQ = 0, 1, 2, 3


class Prefill(NamedTuple):
    """A prompt in the request sequence: the logits after it, and where its cells came from."""

    logits: np.ndarray
    next_position: int  # where generation continues
    trace: CellTrace | None  # what the request's cells hold, for the session's next request (None: not reusable)
    session_tokens: int = 0
    cached_tokens: int = 0
    uses: tuple[ModuleUse, ...] = ()
    # work that needs the prompt's cells but not before the first token (storing chat chunks): run after the answer,
    # given the sequence that holds the cells then
    after_answer: Callable[[int], None] | None = None
    exact: bool = True  # no cell came from a composed state


@dataclass(frozen=True)
class PromptFacts:
    """What generation needs to know of the prompt it follows."""

    n_tokens: int
    tokens: Callable[[], Sequence[int]]  # all of them (for a repeat penalty), built only when asked for
    warnings: tuple[str, ...] = ()

    @classmethod
    def of(cls, request: Request) -> PromptFacts:
        return cls(request.prompt_tokens, request.plan.baseline_tokens, request.warnings)


@dataclass
class RequestPath:
    """What answering needs of a PromptCache: its engine, module encoder, sessions and resident runs."""

    runtime: Runtime
    encoder: ModuleEncoder
    sessions: SessionTable
    residents: ResidentModules
    n_ctx: int
    n_scratch_end: int  # scratch sequences are FIRST_SCRATCH_SEQ..n_scratch_end-1
    reuse_previous: bool = True
    state_ids: StateIds = field(default_factory=StateIds)

    def run(self, state: SessionState, prefill: Callable[[], Prefill], prompt: PromptFacts, opts: GenerationOptions,
            started: float, clock: dict[str, float], cache: bool, done: Callable[[Result], None]) -> Iterator[str]:
        """Switch to the session, bring the prompt in (``prefill``), then generate (a failed prefill leaves the
        session holding nothing)."""
        filled = self.prepare(state, prefill, clock)
        yield from self.generate(prompt, state, filled, opts, started, clock, cache, done)

    def prepare(self, state: SessionState, prefill: Callable[[], Prefill], clock: dict[str, float]) -> Prefill:
        """Switch to the session and bring the prompt into the request sequence."""
        clock["switch_ms"] = self.sessions.activate(state)
        state.requests += 1
        try:
            return prefill()
        except BaseException:
            self.runtime.context.seq_rm(REQUEST_SEQ)  # whatever the failed prefill left
            self.sessions.forget_active()
            raise

    def generate(self, prompt: PromptFacts, state: SessionState, prefill: Prefill, opts: GenerationOptions,
                 started: float, clock: dict[str, float], cache: bool,
                 done: Callable[[Result], None]) -> Iterator[str]:
        """Sample and decode the answer after ``prefill``, stream its text, keep the session's cells, report."""
        context, model = self.runtime.context, self.runtime.model
        first_logits = prefill.logits.copy() if opts.keep_logits else None  # generation reuses the logits buffer
        outcome = GenerationOutcome()
        pieces = generate(context, model, prefill.logits, seq_id=REQUEST_SEQ, next_position=prefill.next_position,
                          settings=opts.generation(), history=self.history(prompt, opts), outcome=outcome,
                          n_ctx=self.n_ctx)
        ttft_ms: float | None = None
        clean = False
        try:
            for piece in pieces:
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000
                yield piece
            clean = True
        except GeneratorExit:  # the caller stopped early: the cells decoded so far are sound
            clean = True
            raise
        finally:
            pieces.close()
            done(self.conclude(prompt, state, prefill, outcome, REQUEST_SEQ, clean=clean, ttft_ms=ttft_ms,
                               started=started, clock=clock, cache=cache, first_logits=first_logits))

    @staticmethod
    def history(prompt: PromptFacts, opts: GenerationOptions) -> list[int]:
        """The prompt's tokens, which matter to the repeat penalty only (building them costs ~1 ms at 8K tokens)."""
        return list(prompt.tokens()) if opts.repeat_penalty != 1.0 else []

    def conclude(self, prompt: PromptFacts, state: SessionState, prefill: Prefill, outcome: GenerationOutcome,
                 seq: int, *, clean: bool, ttft_ms: float | None, started: float, clock: dict[str, float],
                 cache: bool, first_logits: np.ndarray | None) -> Result:
        """After an answer generated in ``seq``: store what waited for it, record the session's cells (they stay in
        ``seq``; a failed answer's are removed) and build the Result."""
        context = self.runtime.context
        if clean and prefill.after_answer is not None:
            prefill.after_answer(seq)
        if clean and prefill.trace is not None and self.reuse_previous:
            # the generated tokens decoded into the request follow the prompt's cells
            answered = max(context.seq_pos_max(seq) + 1 - prefill.next_position, 0)
            state.kept = prefill.trace.extended(outcome.tokens[:answered], prefill.next_position)
            state.prompt_cells = prefill.next_position
        else:
            state.kept, state.prompt_cells = None, 0
            context.seq_rm(seq)
        if ttft_ms is None:  # nothing streamed (end of generation first, or max_tokens=0)
            ttft_ms = (time.perf_counter() - started) * 1000
        decoded = prompt.n_tokens - prefill.session_tokens - prefill.cached_tokens
        return Result(
            text=outcome.text, ttft_ms=ttft_ms, session_tokens=prefill.session_tokens,
            cached_tokens=prefill.cached_tokens, uncached_tokens=decoded, generated_tokens=len(outcome.tokens),
            finish_reason=outcome.finish_reason, modules=prefill.uses,
            timings=Timings(generate_ms=outcome.decode_ms, **clock), cached=cache, warnings=prompt.warnings,
            first_logits=first_logits, exact=prefill.exact,
            logprobs=None if outcome.logprobs is None else tuple(outcome.logprobs),
        )

    def _sources(self, request: Request, state: SessionState, clock: dict[str, float]) -> dict[str, ModuleSource]:
        """Each cached module's stored state; modules not stored (or unreadable) are encoded now."""
        started = time.perf_counter()
        record = request.schema
        hits = {path: self.encoder.find(record, path)
                for path in request.modules}
        clock["lookup_ms"] = (time.perf_counter() - started) * 1000
        sources = {path: ModuleSource(record.modules[path], hit.entry, hit.tier, hit.shift)
                   for path, hit in hits.items() if hit is not None}
        missing = [path for path, hit in hits.items() if hit is None]
        if missing:
            began = time.perf_counter()
            self.encoder.encode_missing(record, missing, None, force=True)  # absent, or present but unreadable
            clock["switch_ms"] += self.sessions.activate(state)  # encoding parked the session
            clock["encode_ms"] = (time.perf_counter() - began) * 1000
            for path in missing:
                hit = self.encoder.find(record, path)
                if hit is None:  # the RAM budget could not keep it and there is no disk tier
                    raise ConfigError(f"module {path!r} could not be kept in the store: raise ram_budget")
                sources[path] = ModuleSource(record.modules[path], hit.entry, "encoded", hit.shift)
        return sources

    def prefill_cached(self, request: Request, state: SessionState, clock: dict[str, float],
                       repair_tokens: int = 0) -> Prefill:
        """Assemble the request in the request sequence, after what the session's previous request left there if
        it began the same way (see reuse.py); the first ``repair_tokens`` tokens of each composed module run are
        decoded in place (see repair.py)."""
        sources = self._sources(request, state, clock)
        plan = request.plan
        live = request.live_tokens(repair_tokens)
        trace = None
        if self.reuse_previous:
            trace = trace_plan(plan, {p: (s.entry.key.file_stem, s.shift) for p, s in sources.items()},
                               self.state_ids, live)
        kept, state.kept = state.kept, None  # the request sequence changes from here on
        reused = common_prefix(kept, trace) if kept is not None and trace is not None else 0
        timings = AssemblyTimings()
        try:
            logits, next_position = self._assemble(request, sources, timings, trace, reused, live, repair_tokens)
        except (StateError, NoKvSlotError) as exc:
            if not len(self.residents) and not reused:
                raise
            if isinstance(exc, WindowLostError) and reused:  # the session's cells alone are at fault
                logger.info("the session's %d cells cannot be extended (%s); assembling from the store", reused, exc)
            else:
                # resident runs (or the reused cells) can leave no contiguous room for a restore: drop them all and
                # assemble from a cleared cache
                logger.info("no room beside %d resident run(s) and %d reused cells (%s); dropping them",
                            len(self.residents), reused, exc)
                self.residents.clear()
            reused = 0
            timings = AssemblyTimings()
            logits, next_position = self._assemble(request, sources, timings, trace, reused, live, repair_tokens)
        clock.update(restore_ms=timings.restore_ms, decode_ms=timings.decode_ms)
        # a prompt that ends with a cached piece has its last token decoded again, maybe at another position
        reusable = next_position == plan.next_position and not isinstance(plan.pieces[-1], CachedPiece)
        restored = trace.restored_cells(reused) if trace is not None else plan.cached_tokens - sum(live)
        uses = tuple(module_uses(request, sources, live))
        return Prefill(logits, next_position, trace if reusable else None, session_tokens=reused,
                       cached_tokens=restored, uses=uses, exact=not any(u.composed for u in uses))

    def _assemble(self, request: Request, sources: dict[str, ModuleSource], timings: AssemblyTimings,
                  trace: CellTrace | None, reused: int, live: tuple[int, ...],
                  repair_tokens: int) -> tuple[np.ndarray, int]:
        """Assemble the request, or only what follows its first ``reused`` cells (the request sequence holds them).
        ``live``: the request's repaired tokens per piece (``Request.live_tokens(repair_tokens)``)."""
        scratch = list(range(FIRST_SCRATCH_SEQ, self.n_scratch_end))
        context = self.runtime.context
        if reused and trace is not None:
            # positions grow along a plan: the kept cells are exactly those before the first one to assemble
            keep_below = int(trace.positions[reused - 1]) + 1
            tail = request.after(plan_after(request.plan, reused))
            return assemble(context, tail, sources, request_seq=REQUEST_SEQ, scratch_seqs=scratch, timings=timings,
                            residents=self.residents, keep_request_below=keep_below,
                            protect=run_keys(request, sources), live=tail.live_tokens(repair_tokens))
        return assemble(context, request, sources, request_seq=REQUEST_SEQ, scratch_seqs=scratch, timings=timings,
                        residents=self.residents, live=live)

    def prefill_baseline(self, tokens: Sequence[int], clock: dict[str, float]) -> Prefill:
        """Full prefill of the prompt's tokens from a cleared cache (resident runs stay)."""
        self.sessions.forget_active()
        context = self.runtime.context
        context.clear(keep=self.residents.seq_ids)
        started = time.perf_counter()
        logits = context.decode(tokens, seq_id=REQUEST_SEQ, start=0)
        clock["decode_ms"] = (time.perf_counter() - started) * 1000
        if logits is None:
            raise EngineError("llama.cpp returned no logits after the prompt")
        return Prefill(logits, len(tokens), None)

