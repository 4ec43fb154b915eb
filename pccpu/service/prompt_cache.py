"""``PromptCache``: encode a schema's modules once, store them, answer prompts from them.

    with PromptCache(model="smollm2") as pc:
        pc.add_schema("schemas/travel.xml")
        answer = pc.ask(open("schemas/travel.domestic.prompt.xml").read())
        print(answer.text(), answer.result().ttft_ms)

This is the facade: configuration, schemas and the public calls. What a call does lives in one module each:
``request.py`` (a planned prompt), ``encoder.py`` (encoding missing modules), ``answering.py`` (the request path:
restore, reuse, assemble, generate), ``sessions.py`` (conversations), ``answer.py`` (the streamed or blocking
answer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from typing_extensions import Unpack

from pccpu.engine import ContextSettings, ModelInfo, available_cores, parse_gpu_layers
from pccpu.errors import ConfigError, OptionError
from pccpu.pml import SchemaLayout, build_layout, parse_prompt, parse_schema, resolve_prompt
from pccpu.service.answer import Answer
from pccpu.service.answering import (
    FIRST_SCRATCH_SEQ,
    REQUEST_SEQ,
    SAVE_SEQ,
    WORK_SEQ,
    Prefill,
    PromptFacts,
    RequestPath,
)
from pccpu.service.batching import Batch, ChatJob, PlannedChat
from pccpu.service.chat import (
    DEFAULT_MIN_CHUNK_TOKENS,
    ChatChunk,
    ChatPath,
    ChatReuse,
    build_chunks,
    check_reuse,
    chunk_trace,
    message_texts,
    text_chunks,
)
from pccpu.service.encoder import EncodeStats, ModuleEncoder, ProgressCallback
from pccpu.service.lock import CacheLock
from pccpu.service.options import GenerationKwargs, GenerationOptions, check_repair_tokens
from pccpu.service.passes import ContextMode, cached_modules, check_mode, plan_passes
from pccpu.service.prompt_builder import Selection, build_prompt_xml
from pccpu.service.repair import DEFAULT_REPAIR_TOKENS
from pccpu.service.request import Request, order_warnings
from pccpu.service.resident import ResidentModules, ResidentStats
from pccpu.service.result import Result
from pccpu.service.runtime import Runtime
from pccpu.service.schemas import SchemaRecord, SchemaRegistry
from pccpu.service.session import Session
from pccpu.service.sessions import SessionState, SessionStats, SessionTable
from pccpu.service.turns import ends_user_turn, with_generation_prompt
from pccpu.service.typeahead import DEFAULT_BATCH_TOKENS, Draft, TokenMemo, TypeAhead, check_draft_settings
from pccpu.store import ModuleStore
from pccpu.store.module_store import StoreStats, default_ram_budget

logger = logging.getLogger(__name__)

N_SEQ_MAX_DEFAULT = 16  # request, work and save sequences, then scratch sequences (PML modules, batch lanes)

__all__ = ["REQUEST_SEQ", "CacheStats", "PromptCache"]


@dataclass(frozen=True)
class CacheStats:
    store: StoreStats
    sessions: SessionStats
    residents: ResidentStats
    encode: EncodeStats


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
        n_seq_max: int = N_SEQ_MAX_DEFAULT,
        mode: str = "sequential",
        roles: str = "auto",
        chat_template: str | None = None,
        store_dir: str | Path | None = None,
        namespace: str = "default",
        ram_budget: int | None = None,
        disk_budget: int | None = None,
        persist: bool = True,
        store_url: str | None = None,
        n_gpu_layers: int | str = 0,
        offload_kqv: bool = True,
        resident_budget: int = 0,
        resident_slots: int = 64,
        reuse_previous: bool = True,
        session_budget: int | None = None,
        min_chunk_tokens: int = DEFAULT_MIN_CHUNK_TOKENS,
        auto_sessions: int = 16,
        repair_tokens: int = DEFAULT_REPAIR_TOKENS,
        chat_reuse: str = "exact",
        runtime: Runtime | None = None,
    ) -> None:
        """``model``: a registry name or a .gguf path (default: $PCCPU_MODEL or the registry's default).

        ``reuse_previous``: each session keeps its cells for its next request (off: every request is assembled
        from the module store, for measurements). ``session_budget``: bytes of parked session states in RAM
        (default: a tenth of the memory available). ``min_chunk_tokens``: chat messages shorter than this
        are stored together with the next (see ``chat()``). ``repair_tokens``: boundary repair by default, the
        first tokens of each module placed after other text than it was encoded after that are decoded in place
        instead of restored (``service/repair.py``; a request's ``repair_tokens`` option overrides it).
        ``chat_reuse``: how ``chat()`` reuses stored messages by default, ``"exact"`` (only after the same
        conversation prefix: the full prefill's answer) or ``"compose"`` (wherever they appear, repaired).
        ``store_url``: a Redis server (``redis://HOST:PORT/DB``) that several machines share as a remote tier behind
        RAM and disk; each module is encoded once per fleet (see docs/remote-store.md).
        ``chat_template``: a Jinja chat template used instead of the model's own for role tags and ``chat()`` (a
        base model's GGUF has none).
        ``runtime``: an opened model and context to use instead of ``model`` and the engine settings (tests pass a
        fake engine here).
        """
        self.mode: ContextMode = check_mode(mode)
        check_repair_tokens(repair_tokens)
        self.repair_tokens = repair_tokens
        self.chat_reuse: ChatReuse = check_reuse(chat_reuse)
        if n_seq_max < FIRST_SCRATCH_SEQ + 1:
            raise ConfigError(f"n_seq_max must be at least {FIRST_SCRATCH_SEQ + 1}, got {n_seq_max}")
        if resident_budget < 0 or resident_slots < 1:
            raise ConfigError(f"resident_budget must be >= 0 bytes and resident_slots >= 1, got {resident_budget} "
                              f"and {resident_slots}")
        if session_budget is not None and session_budget < 0:
            raise ConfigError(f"session_budget must be >= 0 bytes, got {session_budget}")
        if isinstance(min_chunk_tokens, bool) or not isinstance(min_chunk_tokens, int) or min_chunk_tokens < 1:
            raise ConfigError(f"min_chunk_tokens must be an integer >= 1, got {min_chunk_tokens!r}")
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
            runtime = Runtime.open(model, settings, roles=roles, chat_template=chat_template, n_gpu_layers=gpu_layers,
                                   reserve_bytes=resident_budget)
        elif model is not None:
            raise ConfigError("give a model or a runtime, not both")
        elif chat_template is not None:
            raise ConfigError("a chat template goes with a model; an opened runtime has its roles already")
        self._runtime = runtime
        self.n_ctx = runtime.n_ctx  # the longest prompt plus answer; the context has extra cells for resident runs
        try:
            self._store = ModuleStore(directory=store_dir, namespace=namespace, ram_budget=ram_budget,
                                      disk_budget=disk_budget, persist=persist, remote_url=store_url)
        except BaseException:
            runtime.close()
            raise
        self._residents = ResidentModules(runtime.context, list(range(n_seq_max, n_seq_max + resident_seqs)),
                                          runtime.reserved_cells if resident_budget else 0)
        budget = int(default_ram_budget() * 0.4) if session_budget is None else session_budget
        residents = self._residents
        self._busy_lanes: set[int] = set()  # batch lanes holding answers in flight (batching.py)
        busy_lanes = self._busy_lanes

        def resident_seqs_now() -> list[int]:  # sequences no clear may touch: asked for each time
            return [*residents.seq_ids, *sorted(busy_lanes)]

        self._sessions = SessionTable(runtime.context, REQUEST_SEQ, budget, resident_seqs_now)
        self._default_session = self._sessions.open("default")
        self._encoder = ModuleEncoder(runtime, self._store, self.mode, self._sessions, self._residents,
                                      work_seq=WORK_SEQ, save_seq=SAVE_SEQ)
        self._path = RequestPath(runtime, self._encoder, self._sessions, self._residents, n_ctx=self.n_ctx,
                                 n_scratch_end=n_seq_max, reuse_previous=reuse_previous)
        self._chat_path = ChatPath(runtime, self._store, request_seq=REQUEST_SEQ, save_seq=SAVE_SEQ,
                                   expect=self._encoder.expect, keep_seqs=resident_seqs_now)
        self._lanes = list(range(FIRST_SCRATCH_SEQ, n_seq_max))  # scratch sequences double as batch lanes
        self._min_chunk_tokens = min_chunk_tokens
        self._auto_sessions = auto_sessions
        self._schemas = SchemaRegistry()
        filler = runtime.model.tokenize(" ")  # fills parameter slots beyond their scaffold when encoding
        self._filler = filler[0] if filler else 0
        opening = runtime.roles.generation_prompt  # the assistant's turn, opened after a user turn
        self._generation_prompt = tuple(runtime.model.tokenize(opening)) if opening else ()
        self._lock = CacheLock()
        self._typeahead: TypeAhead | None = None  # started by the first draft()
        self._open_batch: Batch | None = None  # holds the cache while open (batch())

    # -- lifecycle and what a caller may read ------------------------------------------------------------
    def close(self) -> None:
        if self._typeahead is not None:
            self._typeahead.stop()
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
        return CacheStats(self._store.stats(), self._sessions.stats(), self._residents.stats, self._encoder.stats)

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

    def _exclusive(self) -> AbstractContextManager[None]:
        return self._lock.foreground()

    # -- schemas -----------------------------------------------------------------------------------------
    @property
    def schemas(self) -> dict[str, SchemaLayout]:
        return self._schemas.layouts()

    def add_schema(self, schema: str | Path, *, encode: bool = True, progress: ProgressCallback | None = None,
                   allowed_roots: Sequence[str | Path] = ()) -> SchemaLayout:
        """Parse and lay out a schema (a path or PML text); encode its modules unless stored already.
        ``allowed_roots``: folders that ``src=`` may read below, besides a schema file's own folder (PML text has
        none: its ``src=`` is refused without them)."""
        with self._exclusive():
            parsed = parse_schema(schema, allowed_roots=allowed_roots)
            rt = self._runtime
            layout = build_layout(parsed, rt.model, rt.roles, bos_tokens=rt.bos_tokens, n_ctx=self.n_ctx)
            record = SchemaRecord.build(layout, plan_passes(layout, self.mode, self._filler), self._encoder.key)
            self._schemas.add(record)
            if encode:
                self._encoder.encode_missing(record, cached_modules(layout), progress)
            return layout

    def encode(self, name: str, *, progress: ProgressCallback | None = None) -> int:
        """Encode every module of schema ``name`` that is not stored; the number of passes run."""
        with self._exclusive():
            record = self._schemas.get(name)
            return self._encoder.encode_missing(record, list(record.modules), progress)

    def pin(self, schema: str, module: str | None = None) -> int:
        """Keep a schema's module states (or one module's) in RAM whatever the budget pressure; the number
        pinned. Pinned states are never evicted from the RAM tier."""
        with self._exclusive():
            record = self._schemas.get(schema)
            paths = [record.module(module).path] if module is not None else list(record.modules)
            for path in paths:
                self._store.pin(record.modules[path].key)
            return len(paths)

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
        return Session(self, self._sessions.open(name))

    def chat(self, messages: Sequence[Mapping[str, Any]], *, cache: bool = True,
             session: Session | Literal["auto"] | None = None, reuse: ChatReuse | None = None,
             options: GenerationOptions | None = None, **kwargs: Unpack[GenerationKwargs]) -> Answer:
        """Answer an OpenAI-style conversation (``[{"role": "user", "content": "..."}, ...]``) without a schema:
        each message, and each text part of a message's content, is a module stored the first time it is computed
        and restored anywhere, across sessions and restarts (``chat.py``). ``reuse="exact"`` restores a stored
        message only after the same conversation prefix (the full prefill's answer); ``"compose"`` wherever it
        appears, in any order or combination, with boundary repair (``repair_tokens``; default: ``chat_reuse``).
        ``add_generation_prompt`` (default on) opens the assistant's turn after the last message.
        ``session="auto"``: the conversation is found by content, for clients that name none: the automatic
        session whose last prompt this one continues, else a new one (at most ``auto_sessions`` of them)."""
        opts = GenerationOptions.from_kwargs(kwargs, options)
        return self._chat(messages, cache, session, check_reuse(self.chat_reuse if reuse is None else reuse), opts)

    def _chat(self, messages: Sequence[Mapping[str, Any]], cache: bool, session: Session | Literal["auto"] | None,
              mode: ChatReuse, opts: GenerationOptions,
              tokenize: Callable[[str], list[int]] | None = None) -> Answer:
        """``chat()`` with its options checked; ``tokenize``: a draft's memo of the tokenizer (the conversation
        before a typed message is not tokenized again when it is sent)."""
        state = self._chat_session(session)

        def chunks() -> list[ChatChunk]:
            return build_chunks(messages, self._runtime, seed=self._encoder.seed, n_ctx=self.n_ctx,
                                add_generation_prompt=opts.add_generation_prompt is not False,
                                min_chunk_tokens=self._min_chunk_tokens, reuse=mode, tokenize=tokenize)

        compose = mode == "compose"
        job = ChatJob(opts, lambda: self._plan_chat(chunks, state, cache, opts, compose)) if cache else None
        return Answer(lambda done: self._run_chat(chunks, state, cache, opts, done, compose=compose), job)

    def draft(self, messages: Sequence[Mapping[str, Any]] = (), *, session: Session | None = None,
              reuse: ChatReuse | None = None, speculate_after_ms: float = 0.0,
              batch_tokens: int = DEFAULT_BATCH_TOKENS) -> Draft:
        """Type-ahead (``typeahead.py``): a user message typed after ``messages`` (the conversation so far) in
        ``session`` (default: this cache's default session). Call ``type(text)`` on every keystroke with the whole
        input, then ``submit()`` for the answer, ``chat(messages + [user: text])`` with what was decoded while typing
        already in the session. ``speculate_after_ms``: how long the input must rest before the end of the turn is
        decoded speculatively (0: at once, the lowest latency; more: less CPU spent on texts that change).
        ``batch_tokens``: the most tokens of typed text decoded in one step."""
        mode = self.chat_reuse if reuse is None else check_reuse(reuse)
        check_draft_settings(speculate_after_ms, batch_tokens)
        if not self._path.reuse_previous:
            raise ConfigError("type-ahead keeps what it decodes in the session: it needs reuse_previous=True")
        if messages:
            message_texts(messages)  # checked now, not on the first keystroke
        chosen = Session(self, self._default_session) if session is None else session
        state = chosen._state_for(self)
        self._sessions.check(state)
        memo = TokenMemo(self._runtime.model.tokenize)

        def build(conversation: Sequence[Mapping[str, Any]]) -> list[ChatChunk]:
            return build_chunks(conversation, self._runtime, seed=self._encoder.seed, n_ctx=self.n_ctx,
                                min_chunk_tokens=self._min_chunk_tokens, reuse=mode, tokenize=memo)

        if self._typeahead is None:
            self._typeahead = TypeAhead(self._lock, self._runtime, self._sessions, self._chat_path,
                                        lambda: self.repair_tokens)
        return self._typeahead.open(Draft(self._typeahead, chosen, state, messages, mode, build, memo,
                                          speculate_after_ms=speculate_after_ms, batch_tokens=batch_tokens))

    def complete(self, prompt: str, *, cache: bool = True, session: Session | Literal["auto"] | None = None,
                 options: GenerationOptions | None = None, **kwargs: Unpack[GenerationKwargs]) -> Answer:
        """Continue a raw text (no chat template, no schema): what ``/v1/completions`` serves. Nothing is stored;
        the session keeps the cells for a next prompt that extends this one."""
        opts = GenerationOptions.from_kwargs(kwargs, options)
        state = self._chat_session(session)

        def chunks() -> list[ChatChunk]:
            return text_chunks(prompt, self._runtime, n_ctx=self.n_ctx)

        job = ChatJob(opts, lambda: self._plan_chat(chunks, state, cache, opts)) if cache else None
        return Answer(lambda done: self._run_chat(chunks, state, cache, opts, done), job)

    def _chat_session(self, session: Session | Literal["auto"] | None) -> SessionState | None:
        """The session a chat runs in: the default one, a given one, or None for one found by content."""
        if session == "auto":
            return None
        if session is None:
            return self._default_session
        if not isinstance(session, Session):
            raise OptionError(f"session must be a Session, 'auto' or None, got {session!r}")
        state = session._state_for(self)
        self._sessions.check(state)
        return state

    def _run_chat(self, make_chunks: Callable[[], list[ChatChunk]], state: SessionState | None, cache: bool,
                  opts: GenerationOptions, done: Callable[[Result], None], compose: bool = False) -> Iterator[str]:
        with self._exclusive():
            planned = self._plan_chat(make_chunks, state, cache, opts, compose)
            session = planned.session()
            yield from self._path.run(session, planned.prefill(session, planned.clock), planned.facts, opts,
                                      planned.started, planned.clock, cache, done)

    def _plan_chat(self, make_chunks: Callable[[], list[ChatChunk]], state: SessionState | None, cache: bool,
                   opts: GenerationOptions, compose: bool = False) -> PlannedChat:
        """A chat request's chunks, and how to find its session and prefill it (``_run_chat`` and batches)."""
        started = time.perf_counter()
        chunks = make_chunks()
        trace = chunk_trace(chunks)  # the conversation's tokens, in position order
        clock = {"plan_ms": (time.perf_counter() - started) * 1000}

        def session() -> SessionState:
            return self._sessions.continuation(trace, limit=self._auto_sessions) if state is None else state

        def prefill(session: SessionState, clock: dict[str, float]) -> Callable[[], Prefill]:
            def run() -> Prefill:
                if cache:
                    return self._chat_path.prefill(chunks, trace, session, clock, reuse=self._path.reuse_previous,
                                                   compose=compose, repair_tokens=self._repair_tokens(opts))
                return self._path.prefill_baseline(trace.values.tolist(), clock)
            return run

        return PlannedChat(len(trace), PromptFacts(len(trace), trace.values.tolist), session, prefill, started, clock)

    @staticmethod
    def n_seq_max_for(parallel: int) -> int:
        """The smallest ``n_seq_max`` whose cache can open ``batch(parallel)``: the answer in the request sequence,
        and a lane (a scratch sequence) for each other one."""
        return parallel + FIRST_SCRATCH_SEQ - 1

    def batch(self, parallel: int = 4) -> Batch:
        """Generate several chat answers together (``batching.py``): ``admit`` chat() or complete() answers, then
        ``step`` until none is active. Holds this cache until the batch is closed (other calls get BusyError).
        ``parallel``: the most answers in flight at once."""
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ConfigError(f"parallel must be an integer >= 1, got {parallel!r}")
        if parallel > len(self._lanes) + 1:
            raise ConfigError(f"parallel={parallel} needs n_seq_max >= {self.n_seq_max_for(parallel)} (a lane "
                              f"per answer beside the request sequence); this cache has {len(self._lanes)} lanes")
        held = ExitStack()
        held.enter_context(self._exclusive())
        held.callback(setattr, self, "_open_batch", None)
        self._open_batch = Batch(self._path, self._sessions, self._lanes, parallel, self._busy_lanes, held.close)
        return self._open_batch

    def _repair_tokens(self, opts: GenerationOptions) -> int:
        """The request's boundary repair: its own option, else this cache's default."""
        return self.repair_tokens if opts.repair_tokens is None else opts.repair_tokens

    def _close_session(self, state: SessionState) -> None:
        batch = self._open_batch
        if batch is not None and batch.owner == threading.get_ident():  # a server's conversation dropped
            batch.forget(state)
            self._sessions.close(state)
            return
        with self._exclusive():
            self._sessions.close(state)

    def _run(self, prompt: str | Path | Request, state: SessionState, cache: bool, opts: GenerationOptions,
             done: Callable[[Result], None]) -> Iterator[str]:
        """Plan (unless given a Request), switch to the session, then the request path (``answering.py``);
        ``done`` gets the Result, also when the answer is stopped early."""
        with self._exclusive():
            started = time.perf_counter()
            request = prompt if isinstance(prompt, Request) else self.plan(
                prompt, add_generation_prompt=opts.add_generation_prompt)
            if self._schemas.get(request.schema.name) is not request.schema:
                raise ConfigError(f"schema {request.schema.name!r} was added again after this request was planned; "
                                  "plan it again")
            clock = {"plan_ms": (time.perf_counter() - started) * 1000}

            def prefill() -> Prefill:
                if cache:
                    return self._path.prefill_cached(request, state, clock, self._repair_tokens(opts))
                return self._path.prefill_baseline(request.plan.baseline_tokens(), clock)

            yield from self._path.run(state, prefill, PromptFacts.of(request), opts, started, clock, cache, done)

