"""``PromptCache``: encode a schema's modules once, store them, answer prompts from them.

    with PromptCache(model="smollm2") as pc:
        pc.add_schema("schemas/travel.xml")
        answer = pc.ask(open("schemas/travel.domestic.prompt.xml").read())
        print(answer.text(), answer.result().ttft_ms)

The request path, once per request: ``plan`` (parse, check and place every piece: a :class:`Request`) -> switch to
the request's session -> find each cached module's state in the store (encoding what is missing) -> trace the
request's cells and keep what the session already holds -> assemble the rest (restore, copy, decode) -> generate.

Sequence ids in the context: 0 the request (the active session's cells), 1 and 2 for encoding (work and save),
3..n_seq_max-1 scratch sequences that hold restored module states while a request is assembled, then one per
resident module run (see ``resident.py``) when a resident budget is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from typing_extensions import Unpack

from pccpu.engine import ContextSettings, ModelInfo, available_cores, parse_gpu_layers
from pccpu.errors import BusyError, ConfigError, EngineError, NoKvSlotError, OptionError, StateError
from pccpu.generation.stream import GenerationOutcome, generate
from pccpu.pml import CachedPiece, SchemaLayout, build_layout, parse_prompt, parse_schema, resolve_prompt
from pccpu.service.answer import Answer
from pccpu.service.assembler import AssemblyTimings, assemble, run_keys
from pccpu.service.encoder import EncodeStats, ProgressCallback, encode_pass
from pccpu.service.options import GenerationKwargs, GenerationOptions
from pccpu.service.passes import ContextMode, cached_modules, check_mode, plan_passes
from pccpu.service.prompt_builder import Selection, build_prompt_xml
from pccpu.service.request import ModuleSource, Request, module_uses, order_warnings
from pccpu.service.resident import ResidentModules, ResidentStats
from pccpu.service.result import ModuleUse, Result, Timings
from pccpu.service.reuse import CellTrace, StateIds, common_prefix, plan_after, trace_plan
from pccpu.service.runtime import Runtime, check_supported
from pccpu.service.schemas import SchemaRecord, SchemaRegistry
from pccpu.service.sessions import SessionState, SessionStats, SessionTable
from pccpu.service.turns import ends_user_turn, with_generation_prompt
from pccpu.store import EntryKey, EntryMeta, ModuleStore, StoredModule, content_key
from pccpu.store.module_store import StoreStats, default_ram_budget

if TYPE_CHECKING:
    from pccpu.service.session import Session

logger = logging.getLogger(__name__)

REQUEST_SEQ, WORK_SEQ, SAVE_SEQ, FIRST_SCRATCH_SEQ = 0, 1, 2, 3


@dataclass(frozen=True)
class CacheStats:
    store: StoreStats
    sessions: SessionStats
    residents: ResidentStats
    encode: EncodeStats


class Prefill(NamedTuple):
    """A prompt in the request sequence: the logits after it, and where its cells came from."""

    logits: np.ndarray
    next_position: int  # where generation continues
    trace: CellTrace | None  # what the request's cells hold, for the session's next request (None: not reusable)
    session_tokens: int = 0
    cached_tokens: int = 0
    uses: tuple[ModuleUse, ...] = ()


class PromptCache:
    """Prompt Cache on one model: schemas in, answers out. One call at a time (a second thread gets BusyError)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        flash_attn: bool | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
        n_seq_max: int = 16,
        mode: str = "sequential",
        roles: str = "auto",
        store_dir: str | Path | None = None,
        namespace: str = "default",
        ram_budget: int | None = None,
        disk_budget: int | None = None,
        persist: bool = True,
        n_gpu_layers: int | str = 0,
        offload_kqv: bool = True,
        resident_budget: int = 0,
        resident_slots: int = 64,
        reuse_previous: bool = True,
        session_budget: int | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        """``model``: a registry name or a .gguf path (default: $PCCPU_MODEL or the registry's default).

        ``reuse_previous``: each session keeps its cells for its next request (off: every request is assembled
        from the module store, for measurements). ``session_budget``: bytes of parked session states in RAM
        (default: a tenth of the memory available). ``runtime``: an opened model and context to use instead of
        ``model`` and the engine settings (tests pass a fake engine here).
        """
        self.mode: ContextMode = check_mode(mode)
        if n_seq_max < FIRST_SCRATCH_SEQ + 1:
            raise ConfigError(f"n_seq_max must be at least {FIRST_SCRATCH_SEQ + 1}, got {n_seq_max}")
        if resident_budget < 0 or resident_slots < 1:
            raise ConfigError(f"resident_budget must be >= 0 bytes and resident_slots >= 1, got {resident_budget} "
                              f"and {resident_slots}")
        if session_budget is not None and session_budget < 0:
            raise ConfigError(f"session_budget must be >= 0 bytes, got {session_budget}")
        resident_seqs = resident_slots if resident_budget else 0
        if runtime is None:
            gpu_layers = parse_gpu_layers(n_gpu_layers)
            if flash_attn is None:  # on a GPU flash attention is faster and keeps V untransposed (one copy per layer)
                flash_attn = gpu_layers != 0
            threads = available_cores() if n_threads is None else n_threads
            settings = ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                       n_seq_max=n_seq_max + resident_seqs, flash_attn=flash_attn, type_k=type_k,
                                       type_v=type_v, offload_kqv=offload_kqv, n_threads=threads,
                                       n_threads_batch=threads)
            runtime = Runtime.open(model, settings, roles=roles, n_gpu_layers=gpu_layers,
                                   reserve_bytes=resident_budget)
        elif model is not None:
            raise ConfigError("give a model or a runtime, not both")
        try:
            check_supported(runtime.model)
        except BaseException:
            runtime.close()
            raise
        self._runtime = runtime
        self.n_ctx = runtime.n_ctx  # the longest prompt plus answer; the context has extra cells for resident runs
        self._n_scratch_end = n_seq_max
        try:
            self._store = ModuleStore(directory=store_dir, namespace=namespace, ram_budget=ram_budget,
                                      disk_budget=disk_budget, persist=persist)
        except BaseException:
            runtime.close()
            raise
        self._model_fp = runtime.model.fingerprint
        self._state_fp = runtime.settings.state_fingerprint(runtime.model.placement)
        self._residents = ResidentModules(runtime.context, list(range(n_seq_max, n_seq_max + resident_seqs)),
                                          runtime.reserved_cells if resident_budget else 0)
        budget = int(default_ram_budget() * 0.4) if session_budget is None else session_budget
        self._sessions = SessionTable(runtime.context, REQUEST_SEQ, budget, self._residents.seq_ids)
        self._default_session = self._sessions.open("default")
        self._reuse_previous = reuse_previous
        self._schemas = SchemaRegistry()
        self._filler = self._filler_token()
        opening = runtime.roles.generation_prompt  # the assistant's turn, opened after a user turn
        self._generation_prompt = tuple(runtime.model.tokenize(opening)) if opening else ()
        self._state_ids = StateIds()
        self._lock = threading.Lock()
        self._encode_stats = EncodeStats()

    # -- lifecycle and what a caller may read ------------------------------------------------------------
    def close(self) -> None:
        self._runtime.close()

    def __enter__(self) -> PromptCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model_path(self) -> Path:
        return self._runtime.model.path

    @property
    def model_info(self) -> ModelInfo:
        return self._runtime.model.info

    @property
    def kv_bytes_per_token(self) -> float:
        """KV cache bytes of one token with this cache's settings (a module state is about this per cell)."""
        return self._runtime.settings.kv_bytes_per_token(self.model_info)

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens for ``text`` (special tokens parsed, no BOS)."""
        return self._runtime.model.tokenize(text)

    def detokenize(self, tokens: list[int]) -> str:
        return self._runtime.model.detokenize(tokens)

    def stats(self) -> CacheStats:
        return CacheStats(self._store.stats(), self._sessions.stats(), self._residents.stats, self._encode_stats)

    def warm_up(self) -> None:
        """Decode one token and drop it: the first decode of a context pays one-time costs (graph setup, page
        faults) that a measurement should not count."""
        with self._exclusive():
            self._sessions.park_active()
            context = self._runtime.context
            context.decode([max(self._runtime.model.bos_token, 0)], seq_id=REQUEST_SEQ, start=0, logits="none")
            context.seq_rm(REQUEST_SEQ)

    def clear_residents(self) -> None:
        """Drop every resident module run from the KV cache (the next requests restore them from RAM)."""
        with self._exclusive():
            self._residents.clear()

    def clear_store(self, *, ram: bool = True, disk: bool = True) -> int:
        """Forget stored module states (``disk=False``: only the RAM tier, as after a restart); the number removed."""
        with self._exclusive():
            return self._store.clear(ram=ram, disk=disk)

    def _exclusive(self) -> _Exclusive:
        return _Exclusive(self._lock)

    # -- schemas -----------------------------------------------------------------------------------------
    @property
    def schemas(self) -> dict[str, SchemaLayout]:
        return self._schemas.layouts()

    def add_schema(self, schema: str | Path, *, encode: bool = True,
                   progress: ProgressCallback | None = None) -> SchemaLayout:
        """Parse and lay out a schema (a path or PML text); encode its modules unless stored already."""
        with self._exclusive():
            parsed = parse_schema(schema)
            rt = self._runtime
            layout = build_layout(parsed, rt.model, rt.roles, bos_tokens=rt.bos_tokens, n_ctx=self.n_ctx)
            record = SchemaRecord.build(layout, plan_passes(layout, self.mode, self._filler), self._key)
            self._schemas.add(record)
            if encode:
                self._encode_missing(record, cached_modules(layout), progress)
            return layout

    def encode(self, name: str, *, progress: ProgressCallback | None = None) -> int:
        """Encode every module of schema ``name`` that is not stored; the number of passes run."""
        with self._exclusive():
            record = self._schemas.get(name)
            return self._encode_missing(record, list(record.modules), progress)

    def pin(self, schema: str, module: str | None = None) -> int:
        """Keep a schema's module states (or one module's) in RAM whatever the budget pressure; the number
        pinned. Pinned states are never evicted from the RAM tier."""
        with self._exclusive():
            record = self._schemas.get(schema)
            paths = [record.module(module).path] if module is not None else list(record.modules)
            for path in paths:
                self._store.pin(record.modules[path].key)
            return len(paths)

    def _key(self, context: tuple[tuple[int, int], ...], cells: tuple[tuple[int, int], ...], start: int) -> EntryKey:
        content = content_key(namespace=self._store.namespace, model_fingerprint=self._model_fp,
                              state_fingerprint=self._state_fp, mode=self.mode, context=context, cells=cells,
                              start=start)
        return EntryKey(content, start)

    def _expect(self) -> dict[str, Any]:
        return {"model": self._model_fp, "state": self._state_fp}

    def _stored(self, record: SchemaRecord, path: str) -> bool:
        """Whether the module's state is stored, at its start or another (a cheap check: nothing is read)."""
        key = record.modules[path].key
        return self._store.contains(key) or bool(self._store.starts_of(key.content))

    def _encode_missing(self, record: SchemaRecord, paths: list[str], progress: ProgressCallback | None, *,
                        force: bool = False) -> int:
        """Run the passes that encode ``paths`` (those not stored, unless ``force``); the number of passes."""
        if not force and all(self._stored(record, p) for p in paths):
            return 0
        with self._store.exclusive():
            # another process may have encoded them while this one waited for the lock
            missing = list(paths) if force else [p for p in paths if not self._stored(record, p)]
            indices = sorted({record.modules[p].pass_index for p in missing})
            if not indices:
                return 0
            # encoding starts from a cleared cache, as everywhere: the active session is parked first, and resident
            # runs are dropped (cells placed around them would give slightly other states under the same key)
            self._sessions.park_active()
            self._residents.clear()
            total = sum(len(record.passes[i].cells) for i in indices)
            done = 0
            for i in indices:
                encoded = encode_pass(self._runtime.context, record.passes[i], work_seq=WORK_SEQ, save_seq=SAVE_SEQ,
                                      stats=self._encode_stats, progress=progress, done_before=done, total=total)
                done += len(record.passes[i].cells)
                for module in encoded:
                    meta = EntryMeta(schema=record.name, module=module.cells.path, mode=self.mode,
                                     ranges=module.cells.ranges, run_bytes=module.run_bytes, model=self._model_fp,
                                     state=self._state_fp, model_file=self.model_path.name, created=time.time())
                    self._store.save(StoredModule(record.modules[module.cells.path].key, module.state, meta))
        logger.info("encoded %d module(s) of %r in %d pass(es): %d tokens at %.0f tokens/s", len(missing),
                    record.name, len(indices), total, self._encode_stats.tokens_per_second)
        return len(indices)

    # -- requests ----------------------------------------------------------------------------------------
    def plan(self, prompt: str | Path, *, add_generation_prompt: bool | None = None) -> Request:
        """Resolve a prompt (PML text or a path) against its schema, without running anything: what ``ask`` would
        restore and decode, where (``Request.plan``). ``ask`` takes the result."""
        parsed = parse_prompt(prompt)
        record = self._schemas.get(parsed.schema)
        rt = self._runtime
        plan = resolve_prompt(record.layout, parsed, rt.model, rt.roles, n_ctx=self.n_ctx)
        wants = ends_user_turn(parsed.items) if add_generation_prompt is None else add_generation_prompt
        if wants:
            plan = with_generation_prompt(plan, self._generation_prompt, self.n_ctx)
        warnings = order_warnings(record.layout, parsed)
        for warning in warnings:
            logger.warning("%s", warning)
        return Request.build(plan, record, warnings)

    def ask(self, prompt: str | Path | Request, *, cache: bool = True, session: Session | None = None,
            options: GenerationOptions | None = None, **kwargs: Unpack[GenerationKwargs]) -> Answer:
        """Answer a prompt (PML text, a path, or a :class:`Request` from ``plan``): an :class:`Answer` to iterate
        for text as it is generated, or to call ``.result()`` / ``.text()`` on. Nothing runs before that.

        ``cache=False`` answers by full prefill of the same tokens (the baseline). ``session``: the conversation
        whose cells the request may reuse and leaves its own in (default: this cache's default session). Options
        are the fields of :class:`GenerationOptions`, as ``options=`` or keywords (keywords win); an unknown one is
        an :class:`~pccpu.errors.OptionError`.
        """
        opts = GenerationOptions.from_kwargs(kwargs, options)
        if isinstance(prompt, Request) and opts.add_generation_prompt is not None:
            raise OptionError("add_generation_prompt is decided when a Request is planned: pass it to plan()")
        state = self._default_session if session is None else session._state_for(self)
        self._sessions.check(state)
        return Answer(lambda done: self._run(prompt, state, cache, opts, done))

    def ask_parts(self, schema: str, modules: Selection | None = None, question: str | None = None, *,
                  role: str = "user", cache: bool = True, session: Session | None = None,
                  options: GenerationOptions | None = None, **kwargs: Unpack[GenerationKwargs]) -> Answer:
        """Answer a prompt given as data (see ``build_prompt_xml``): the question can never inject markup."""
        return self.ask(build_prompt_xml(schema, modules, question, role=role), cache=cache, session=session,
                        options=options, **kwargs)

    def session(self, name: str | None = None) -> Session:
        """A new conversation: its requests reuse the cells its previous request left (see ``sessions.py``)."""
        from pccpu.service.session import Session

        return Session(self, self._sessions.open(name))

    def _close_session(self, state: SessionState) -> None:
        with self._exclusive():
            self._sessions.close(state)

    def _run(self, prompt: str | Path | Request, state: SessionState, cache: bool, opts: GenerationOptions,
             done: Any) -> Iterator[str]:
        """The request path (see the module docstring); ``done`` gets the Result, also when stopped early."""
        with self._exclusive():
            started = time.perf_counter()
            request = prompt if isinstance(prompt, Request) else self.plan(
                prompt, add_generation_prompt=opts.add_generation_prompt)
            if self._schemas.get(request.schema.name) is not request.schema:
                raise ConfigError(f"schema {request.schema.name!r} was added again after this request was planned; "
                                  "plan it again")
            clock = {"plan_ms": (time.perf_counter() - started) * 1000}
            clock["switch_ms"] = self._sessions.activate(state)
            state.requests += 1
            try:
                prefill = self._prefill_cached(request, state, clock) if cache else self._prefill_baseline(request,
                                                                                                            clock)
            except BaseException:
                self._runtime.context.seq_rm(REQUEST_SEQ)  # whatever the failed assembly left
                self._sessions.forget_active()
                raise
            yield from self._generate(request, state, prefill, opts, started, clock, cache, done)

    def _generate(self, request: Request, state: SessionState, prefill: Prefill, opts: GenerationOptions,
                  started: float, clock: dict[str, float], cache: bool, done: Any) -> Iterator[str]:
        context, model = self._runtime.context, self._runtime.model
        first_logits = prefill.logits.copy() if opts.keep_logits else None  # generation reuses the logits buffer
        # the prompt's tokens matter to the repeat penalty only; building them costs ~1 ms at 8K tokens
        history = list(request.plan.baseline_tokens()) if opts.repeat_penalty != 1.0 else []
        outcome = GenerationOutcome()
        pieces = generate(context, model, prefill.logits, seq_id=REQUEST_SEQ, next_position=prefill.next_position,
                          settings=opts.generation(), history=history, outcome=outcome, n_ctx=self.n_ctx)
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
            if clean and prefill.trace is not None and self._reuse_previous:
                # the generated tokens decoded into the request follow the prompt's cells
                answered = max(context.seq_pos_max(REQUEST_SEQ) + 1 - prefill.next_position, 0)
                state.kept = prefill.trace.extended(outcome.tokens[:answered], prefill.next_position)
            else:
                state.kept = None
                context.seq_rm(REQUEST_SEQ)
            if ttft_ms is None:  # nothing streamed (end of generation first, or max_tokens=0)
                ttft_ms = (time.perf_counter() - started) * 1000
            decoded = request.prompt_tokens - prefill.session_tokens - prefill.cached_tokens
            done(Result(
                text=outcome.text, ttft_ms=ttft_ms, session_tokens=prefill.session_tokens,
                cached_tokens=prefill.cached_tokens, uncached_tokens=decoded, generated_tokens=len(outcome.tokens),
                finish_reason=outcome.finish_reason, modules=prefill.uses,
                timings=Timings(generate_ms=outcome.decode_ms, **clock), cached=cache, warnings=request.warnings,
                first_logits=first_logits,
            ))

    def _sources(self, request: Request, state: SessionState, clock: dict[str, float]) -> dict[str, ModuleSource]:
        """Each cached module's stored state; modules not stored (or unreadable) are encoded now."""
        started = time.perf_counter()
        record = request.schema
        hits = {path: self._store.find(record.modules[path].key, self._expect(), runs=len(record.modules[path].ranges))
                for path in request.modules}
        clock["lookup_ms"] = (time.perf_counter() - started) * 1000
        sources = {path: ModuleSource(record.modules[path], hit.entry, hit.tier, hit.shift)
                   for path, hit in hits.items() if hit is not None}
        missing = [path for path, hit in hits.items() if hit is None]
        if missing:
            began = time.perf_counter()
            self._encode_missing(record, missing, None, force=True)  # absent, or present but unreadable
            clock["switch_ms"] += self._sessions.activate(state)  # encoding parked the session
            clock["encode_ms"] = (time.perf_counter() - began) * 1000
            for path in missing:
                hit = self._store.find(record.modules[path].key, self._expect(), runs=len(record.modules[path].ranges))
                if hit is None:  # the RAM budget could not keep it and there is no disk tier
                    raise ConfigError(f"module {path!r} could not be kept in the store: raise ram_budget")
                sources[path] = ModuleSource(record.modules[path], hit.entry, "encoded", hit.shift)
        return sources

    def _prefill_cached(self, request: Request, state: SessionState, clock: dict[str, float]) -> Prefill:
        """Assemble the request in the request sequence, after what the session's previous request left there if
        it began the same way (see reuse.py)."""
        sources = self._sources(request, state, clock)
        plan = request.plan
        trace = None
        if self._reuse_previous:
            trace = trace_plan(plan, {p: (s.entry.key.file_stem, s.shift) for p, s in sources.items()},
                               self._state_ids)
        kept, state.kept = state.kept, None  # the request sequence changes from here on
        reused = common_prefix(kept, trace) if kept is not None and trace is not None else 0
        timings = AssemblyTimings()
        try:
            logits, next_position = self._assemble(request, sources, timings, trace, reused)
        except (StateError, NoKvSlotError) as exc:
            if not len(self._residents) and not reused:
                raise
            # resident runs (or the reused cells) can leave no contiguous room for a restore: drop them all and
            # assemble from a cleared cache
            logger.info("no room beside %d resident run(s) and %d reused cells (%s); dropping them",
                        len(self._residents), reused, exc)
            self._residents.clear()
            reused = 0
            timings = AssemblyTimings()
            logits, next_position = self._assemble(request, sources, timings, trace, reused)
        clock.update(restore_ms=timings.restore_ms, decode_ms=timings.decode_ms)
        # a prompt that ends with a cached piece has its last token decoded again, maybe at another position
        reusable = next_position == plan.next_position and not isinstance(plan.pieces[-1], CachedPiece)
        restored = trace.restored_cells(reused) if trace is not None else plan.cached_tokens
        return Prefill(logits, next_position, trace if reusable else None, session_tokens=reused,
                       cached_tokens=restored, uses=tuple(module_uses(request, sources)))

    def _assemble(self, request: Request, sources: dict[str, ModuleSource], timings: AssemblyTimings,
                  trace: CellTrace | None, reused: int) -> tuple[np.ndarray, int]:
        """Assemble the request, or only what follows its first ``reused`` cells (the request sequence holds them)."""
        scratch = list(range(FIRST_SCRATCH_SEQ, self._n_scratch_end))
        context = self._runtime.context
        if reused and trace is not None:
            # positions grow along a plan: the kept cells are exactly those before the first one to assemble
            keep_below = int(trace.positions[reused - 1]) + 1
            return assemble(context, request.after(plan_after(request.plan, reused)), sources,
                            request_seq=REQUEST_SEQ, scratch_seqs=scratch, timings=timings, residents=self._residents,
                            keep_request_below=keep_below, protect=run_keys(request, sources))
        return assemble(context, request, sources, request_seq=REQUEST_SEQ, scratch_seqs=scratch, timings=timings,
                        residents=self._residents)

    def _prefill_baseline(self, request: Request, clock: dict[str, float]) -> Prefill:
        """Full prefill of the prompt's tokens from a cleared cache (resident runs stay)."""
        self._sessions.forget_active()
        tokens = list(request.plan.baseline_tokens())
        context = self._runtime.context
        context.clear(keep=self._residents.seq_ids)
        started = time.perf_counter()
        logits = context.decode(tokens, seq_id=REQUEST_SEQ, start=0)
        clock["decode_ms"] = (time.perf_counter() - started) * 1000
        if logits is None:
            raise EngineError("llama.cpp returned no logits after the prompt")
        return Prefill(logits, len(tokens), None)

    def _filler_token(self) -> int:
        tokens = self._runtime.model.tokenize(" ")
        return tokens[0] if tokens else 0


class _Exclusive:
    """One call at a time: a second caller gets a clear error instead of corrupting the shared context."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise BusyError("this PromptCache is busy with another call, or an earlier answer is still being "
                            "streamed: finish it (result()) or close() it first; from several threads, use one "
                            "PromptCache per thread or serialize the calls (for example with a queue)")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
