"""``PromptCache``: encode a schema's modules once, store them, answer prompts from them.

    with PromptCache(model="smollm2") as pc:
        pc.add_schema("schemas/demo.xml")
        result = pc.ask(open("schemas/demo_prompt.xml").read())
        print(result.text, result.ttft_ms)

Sequence ids in the context: 0 the request, 1 and 2 for encoding (work and save), 3..n_seq_max-1 scratch
sequences that hold restored module states while a request is assembled, then one per resident module run (see
``resident.py``) when a resident budget is set.

GPU offload: ``n_gpu_layers`` ("all", "none" or a count) with a CUDA build of llama-cpp-python; the KV cache goes
with the layers unless ``offload_kqv=False``. Module states are restored from host memory into the (GPU) KV cache;
with ``resident_budget`` bytes, used module runs also stay in the KV cache between requests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pccpu.engine import ContextSettings, parse_gpu_layers
from pccpu.errors import (
    BusyError,
    ConfigError,
    NoKvSlotError,
    StateError,
    UnknownSchemaError,
    UnsupportedModelError,
)
from pccpu.generation.sampling import SamplingSettings
from pccpu.generation.stream import GenerationOutcome, GenerationSettings, generate
from pccpu.pml import (
    CachedPiece,
    PromptPlan,
    PromptText,
    SchemaLayout,
    UncachedPiece,
    build_layout,
    parse_prompt,
    parse_schema,
    resolve_prompt,
)
from pccpu.roles import Role, RoleTag
from pccpu.service.assembler import AssemblyTimings, ModuleSource, assemble, plan_run_keys
from pccpu.service.encoder import EncodeStats, ProgressCallback, encode_pass
from pccpu.service.passes import ContextMode, EncodePass, cached_modules, check_mode, plan_passes
from pccpu.service.prompt_builder import Selection, build_prompt_xml
from pccpu.service.resident import ResidentModules
from pccpu.service.result import ModuleUse, Result, Source
from pccpu.service.reuse import CellTrace, StateIds, common_prefix, plan_after, trace_plan
from pccpu.service.runtime import Runtime
from pccpu.store import EntryKey, ModuleStore, StoredModule, content_key

logger = logging.getLogger(__name__)


class Prefill(NamedTuple):
    """A prompt in the request sequence: the logits after it and what it took."""

    logits: Any
    next_position: int  # where generation continues
    uses: list[ModuleUse]
    trace: CellTrace | None  # what the request's cells hold, for the next prompt to reuse (None: not reusable)
    reused: int = 0  # cells held from the previous answer
    reused_decoded: int = 0  # of those, cells that had been decoded (not restored)

REQUEST_SEQ, WORK_SEQ, SAVE_SEQ, FIRST_SCRATCH_SEQ = 0, 1, 2, 3


@dataclass
class _Schema:
    layout: SchemaLayout
    passes: list[EncodePass]
    keys: dict[str, EntryKey]  # module path -> key of its state
    pass_of: dict[str, int]  # module path -> index into passes
    ranges: dict[str, tuple[tuple[int, int], ...]]  # module path -> its text runs (one stored state each)


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
    ) -> None:
        self.mode: ContextMode = check_mode(mode)
        if n_seq_max < FIRST_SCRATCH_SEQ + 1:
            raise ConfigError(f"n_seq_max must be at least {FIRST_SCRATCH_SEQ + 1}, got {n_seq_max}")
        if resident_budget < 0 or resident_slots < 1:
            raise ConfigError(f"resident_budget must be >= 0 bytes and resident_slots >= 1, got {resident_budget} "
                              f"and {resident_slots}")
        gpu_layers = parse_gpu_layers(n_gpu_layers)
        if flash_attn is None:  # on a GPU flash attention is faster and keeps V untransposed (one copy per layer)
            flash_attn = gpu_layers != 0
        threads = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
        resident_seqs = resident_slots if resident_budget else 0
        settings = ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_seq_max + resident_seqs,
                                   flash_attn=flash_attn, type_k=type_k, type_v=type_v, offload_kqv=offload_kqv,
                                   **threads)
        self.n_ctx = n_ctx  # the longest prompt plus answer; the context has extra cells for resident runs
        self._n_scratch_end = n_seq_max
        self.store = ModuleStore(directory=store_dir, namespace=namespace, ram_budget=ram_budget,
                                 disk_budget=disk_budget, persist=persist)
        self.runtime = Runtime.open(model, settings, roles=roles, n_gpu_layers=gpu_layers,
                                    reserve_bytes=resident_budget)
        n_swa = self.runtime.model.info.n_swa
        if n_swa > 0:
            name = self.runtime.model.path.name
            self.runtime.close()
            # Measured on gemma-3-270m: composed module states differ from full prefill (KL ~0.01 on a prefix
            # layout), so sliding-window models are refused until their iSWA cache is handled deliberately.
            raise UnsupportedModelError(
                f"{name} uses sliding-window attention (window {n_swa} tokens), which "
                "pccpu does not support yet: its composed module states do not match a full prefill. Use a model "
                "with full attention (for example smollm2 or qwen2.5-coder-1.5b)"
            )
        self.settings = settings
        self._model_fp = self.runtime.model.fingerprint
        self._state_fp = settings.state_fingerprint(self.runtime.model.placement)
        self.residents = ResidentModules(self.runtime.context, list(range(n_seq_max, n_seq_max + resident_seqs)),
                                         self.runtime.reserved_cells)
        self._filler = self._filler_token()
        opening = self.runtime.roles.generation_prompt  # the assistant's turn, opened after a user turn
        self._generation_prompt = tuple(self.runtime.model.tokenize(opening)) if opening else ()
        self._schemas: dict[str, _Schema] = {}
        # the last answer's cells, left in the request sequence for the next prompt to reuse (see reuse.py)
        self.reuse_previous = reuse_previous
        self._kept: CellTrace | None = None
        self._state_ids = StateIds()
        self._lock = threading.Lock()
        self.encode_stats = EncodeStats()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> PromptCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exclusive(self) -> _Exclusive:
        return _Exclusive(self._lock)

    # -- schemas -----------------------------------------------------------------------------------------
    @property
    def schemas(self) -> dict[str, SchemaLayout]:
        return {name: s.layout for name, s in self._schemas.items()}

    def add_schema(self, schema: str | Path, *, encode: bool = True,
                   progress: ProgressCallback | None = None) -> SchemaLayout:
        """Parse and lay out a schema (a path or PML text); encode its modules unless stored already."""
        with self._exclusive():
            parsed = parse_schema(schema)
            rt = self.runtime
            layout = build_layout(parsed, rt.model, rt.roles, bos_tokens=rt.bos_tokens, n_ctx=self.n_ctx)
            passes = plan_passes(layout, self.mode, self._filler)
            keys: dict[str, EntryKey] = {}
            pass_of: dict[str, int] = {}
            ranges: dict[str, tuple[tuple[int, int], ...]] = {}
            for index, encode_plan in enumerate(passes):
                for module in encode_plan.saved:
                    keys[module.path] = self._key(encode_plan.context_of(module), module.cells, module.start)
                    pass_of[module.path] = index
                    ranges[module.path] = module.ranges
            if parsed.name in self._schemas:
                logger.info("schema %r replaced", parsed.name)
            self._schemas[parsed.name] = _Schema(layout, passes, keys, pass_of, ranges)
            if encode:
                self._encode_missing(self._schemas[parsed.name], cached_modules(layout), progress)
            return layout

    def encode(self, name: str, *, progress: ProgressCallback | None = None) -> int:
        """Encode every module of schema ``name`` that is not stored; the number of passes run."""
        with self._exclusive():
            entry = self._schema(name)
            return self._encode_missing(entry, cached_modules(entry.layout), progress)

    def pin(self, schema: str, module: str | None = None) -> int:
        """Keep a schema's module states (or one module's) in RAM whatever the budget pressure; the number
        pinned. Pinned states are never evicted from the RAM tier."""
        with self._exclusive():
            entry = self._schema(schema)
            paths = [module] if module is not None else list(entry.keys)
            for path in paths:
                if path not in entry.keys:
                    from pccpu.errors import UnknownModuleError

                    raise UnknownModuleError(f"schema {schema!r} stores no module {path!r}; stored: "
                                             f"{', '.join(sorted(entry.keys))}")
                self.store.pin(entry.keys[path])
            return len(paths)

    def _schema(self, name: str) -> _Schema:
        if name not in self._schemas:
            known = ", ".join(sorted(self._schemas)) or "none"
            raise UnknownSchemaError(f"schema {name!r} was not added (added: {known}); add it with add_schema()")
        return self._schemas[name]

    def _key(self, context: tuple[tuple[int, int], ...], cells: tuple[tuple[int, int], ...], start: int) -> EntryKey:
        content = content_key(namespace=self.store.namespace, model_fingerprint=self._model_fp,
                              state_fingerprint=self._state_fp, mode=self.mode, context=context, cells=cells,
                              start=start)
        return EntryKey(content, start)

    def _expect(self) -> dict[str, Any]:
        return {"model": self._model_fp, "state": self._state_fp}

    def _encode_missing(self, entry: _Schema, paths: list[str], progress: ProgressCallback | None, *,
                        force: bool = False) -> int:
        """Run the passes that encode ``paths`` (those not stored, unless ``force``); the number of passes."""
        if not force and all(self._stored(entry, p) for p in paths):
            return 0
        with self.store.exclusive():
            # another process may have encoded them while this one waited for the lock
            missing = list(paths) if force else [p for p in paths if not self._stored(entry, p)]
            indices = sorted({entry.pass_of[p] for p in missing})
            if indices:
                self._kept = None  # encoding clears the cache
            if indices and len(self.residents):
                # encode from a cleared cache, as everywhere: cells placed around resident runs would give slightly
                # other states under the same key (without flash attention results depend on cell placement)
                self.residents.clear()
            total = sum(len(entry.passes[i].cells) for i in indices)
            done = 0
            for i in indices:
                self._run_pass(entry, entry.passes[i], progress, done, total)
                done += len(entry.passes[i].cells)
        if indices:
            logger.info("encoded %d module(s) of %r in %d pass(es): %d tokens at %.0f tokens/s", len(missing),
                        entry.layout.name, len(indices), total, self.encode_stats.tokens_per_second)
        return len(indices)

    def _run_pass(self, entry: _Schema, encode_plan: EncodePass, progress: ProgressCallback | None, done: int,
                  total: int) -> None:
        encoded = encode_pass(self.runtime.context, encode_plan, work_seq=WORK_SEQ, save_seq=SAVE_SEQ,
                              stats=self.encode_stats, progress=progress, done_before=done, total=total)
        for module in encoded:
            key = entry.keys[module.cells.path]
            meta = dict(self._expect(), schema=entry.layout.name, module=module.cells.path, mode=self.mode,
                        n_cells=len(module.cells.cells), ranges=[list(r) for r in module.cells.ranges],
                        run_bytes=list(module.run_bytes),
                        model_file=self.runtime.model.path.name, created=time.time())
            self.store.save(StoredModule(key, module.state, meta))

    def _stored(self, entry: _Schema, path: str) -> bool:
        """Whether the module's state is stored, at its start or another (a cheap check: nothing is read)."""
        key = entry.keys[path]
        return self.store.contains(key) or bool(self.store.starts_of(key.content))

    def _find(self, entry: _Schema, path: str) -> tuple[StoredModule, Source, int] | None:
        """The stored state of a module: exact key first, else the same content at another start (shifted)."""
        key = entry.keys[path]
        hit = self.store.lookup(key, self._expect())
        if hit is not None:
            return hit.entry, hit.tier, 0
        for start in sorted(self.store.starts_of(key.content)):
            hit = self.store.lookup(EntryKey(key.content, start), self._expect())
            if hit is not None:
                return hit.entry, hit.tier, key.start - start
        return None

    # -- answering ---------------------------------------------------------------------------------------
    def plan(self, prompt: str | Path, *, add_generation_prompt: bool | None = None) -> PromptPlan:
        """Resolve a prompt (PML text or a path) against its schema, without running anything."""
        parsed = parse_prompt(prompt)
        entry = self._schema(parsed.schema)
        rt = self.runtime
        plan = resolve_prompt(entry.layout, parsed, rt.model, rt.roles, n_ctx=self.n_ctx)
        wants = _ends_user_turn(parsed.items) if add_generation_prompt is None else add_generation_prompt
        if wants and self._generation_prompt:
            plan = _append_uncached(plan, self._generation_prompt, self.n_ctx)
        return plan

    def ask(self, prompt: str | Path, *, cache: bool = True, **options: Any) -> Result:
        """Answer a prompt; ``cache=False`` answers it by full prefill of the same tokens (the baseline).

        Options: max_tokens, stop, temperature, top_k, top_p, min_p, repeat_penalty, seed, add_generation_prompt,
        keep_logits (the next-token logits after the prompt in ``Result.first_logits``, for fidelity checks).
        """
        outcome_box: list[Result] = []
        for _ in self._answer(prompt, cache, outcome_box, **options):
            pass
        return outcome_box[0]

    def stream(self, prompt: str | Path, *, cache: bool = True, **options: Any) -> AnswerStream:
        """Iterate over the answer's text pieces as they are generated; ``.result`` holds the Result once the
        stream has ended. Closing it (or leaving a ``with`` block) stops generation early."""
        box: list[Result] = []
        return AnswerStream(self._answer(prompt, cache, box, **options), box)

    def first_token_logits(self, prompt: str | Path, *, cache: bool = True,
                           add_generation_prompt: bool | None = None) -> Any:
        """The next-token logits after the prompt (a float32 array over the vocabulary): for fidelity checks."""
        with self._exclusive():
            plan = self.plan(prompt, add_generation_prompt=add_generation_prompt)
            timings: dict[str, float] = {}
            self._kept = None
            try:
                prefill = self._prefill_cached if cache else self._prefill_baseline
                return prefill(plan, timings)[0]
            finally:
                self.runtime.context.seq_rm(REQUEST_SEQ)

    def ask_parts(self, schema: str, modules: Selection | None = None, question: str | None = None, *,
                  role: str = "user", **options: Any) -> Result:
        """Answer a prompt given as data (see ``build_prompt_xml``): the question can never inject markup."""
        return self.ask(build_prompt_xml(schema, modules, question, role=role), **options)

    def _answer(self, prompt: str | Path, cache: bool, box: list[Result] | None, *, max_tokens: int = 128,
                stop: tuple[str, ...] | list[str] = (), add_generation_prompt: bool | None = None,
                keep_logits: bool = False, **sampling: Any) -> Iterator[str]:
        generation = GenerationSettings(max_tokens=max_tokens, stop=tuple(stop), sampling=SamplingSettings(**sampling))
        with self._exclusive():
            started = time.perf_counter()
            timings: dict[str, float] = {}
            plan = self.plan(prompt, add_generation_prompt=add_generation_prompt)
            timings["parse_ms"] = (time.perf_counter() - started) * 1000
            ctx = self.runtime.context
            prefill = self._prefill_cached(plan, timings) if cache else self._prefill_baseline(plan, timings)
            logits, next_position, trace = prefill.logits, prefill.next_position, prefill.trace
            first_logits = logits.copy() if keep_logits else None  # generation reuses the logits buffer
            # the prompt's tokens matter to the repeat penalty only; building them costs ~1 ms at 8K tokens
            history = list(plan.baseline_tokens()) if generation.sampling.repeat_penalty != 1.0 else []
            outcome = GenerationOutcome()
            pieces = generate(ctx, self.runtime.model, logits, seq_id=REQUEST_SEQ, next_position=next_position,
                              settings=generation, history=history, outcome=outcome, n_ctx=self.n_ctx)
            ttft_ms: float | None = None
            finished = False
            try:
                for piece in pieces:
                    if ttft_ms is None:
                        ttft_ms = (time.perf_counter() - started) * 1000
                    yield piece
                finished = True
            finally:
                pieces.close()
                if finished and trace is not None:  # None when reuse is off or the prompt cannot be reused
                    # the generated tokens decoded into the request follow the prompt's cells
                    answered = ctx.seq_pos_max(REQUEST_SEQ) + 1 - next_position
                    self._kept = trace.extended(outcome.tokens[:max(answered, 0)], next_position)
                else:
                    ctx.seq_rm(REQUEST_SEQ)
            if ttft_ms is None:  # nothing streamed (end of generation first): the first sample still happened
                ttft_ms = (time.perf_counter() - started) * 1000
            timings["generate_ms"] = outcome.decode_ms
            prompt_tokens = plan.cached_tokens + plan.uncached_tokens
            # prompt = restored from stored states + decoded now + held from the previous answer
            cached = plan.cached_tokens - (prefill.reused - prefill.reused_decoded) if cache else 0
            if box is not None:
                box.append(Result(
                    text=outcome.text, ttft_ms=ttft_ms, cached_tokens=cached,
                    uncached_tokens=prompt_tokens - cached - prefill.reused, prompt_tokens=prompt_tokens,
                    generated_tokens=len(outcome.tokens), finish_reason=outcome.finish_reason, modules=prefill.uses,
                    timings=timings, cached=cache, first_logits=first_logits, reused_tokens=prefill.reused,
                ))

    def _prefill_cached(self, plan: PromptPlan, timings: dict[str, float]) -> Prefill:
        """Assemble ``plan`` in the request sequence, after what the previous answer left there if it began the same
        way (see reuse.py)."""
        kept, self._kept = self._kept, None  # the request sequence changes from here on
        entry = self._schema(plan.schema)
        started = time.perf_counter()
        needed = list(dict.fromkeys(p.module for p in plan.pieces if isinstance(p, CachedPiece)))
        found = {path: self._find(entry, path) for path in needed}
        timings["lookup_ms"] = (time.perf_counter() - started) * 1000
        missing = [p for p, f in found.items() if f is None]
        encoded_now: set[str] = set()
        if missing:
            began = time.perf_counter()
            self._encode_missing(entry, missing, None, force=True)  # absent, or present but unreadable
            timings["encode_ms"] = (time.perf_counter() - began) * 1000
            for path in missing:
                found[path] = self._find(entry, path)
                if found[path] is None:  # the RAM budget could not keep it and no disk tier
                    raise ConfigError(f"module {path!r} could not be kept in the store: raise ram_budget")
                encoded_now.add(path)
        sources = {p: ModuleSource(f[0], f[2], entry.ranges[p]) for p, f in found.items() if f is not None}
        trace = (trace_plan(plan, {p: (s.entry.key.file_stem, s.shift) for p, s in sources.items()}, self._state_ids)
                 if self.reuse_previous else None)
        # the previous answer's first cells, if this prompt starts the same way (and nothing was encoded since)
        reused = common_prefix(kept, trace) if kept is not None and trace is not None and not encoded_now else 0
        assembly = AssemblyTimings()
        scratch = list(range(FIRST_SCRATCH_SEQ, self._n_scratch_end))
        try:
            logits, next_position = self._assemble(plan, sources, scratch, assembly, trace, reused)
        except (StateError, NoKvSlotError) as exc:
            if not len(self.residents) and not reused:
                raise
            # resident runs (or the reused cells) can leave no contiguous room for a restore: drop them all and
            # assemble from a cleared cache
            logger.info("no room beside %d resident run(s) and %d reused cells (%s); dropping them",
                        len(self.residents), reused, exc)
            self.residents.clear()
            reused = 0
            assembly = AssemblyTimings()
            logits, next_position = self._assemble(plan, sources, scratch, assembly, trace, reused)
        timings.update(restore_ms=assembly.restore_ms, copy_ms=assembly.copy_ms, decode_ms=assembly.decode_ms)
        cached_tokens: Counter[str] = Counter()
        for piece in plan.pieces:
            if isinstance(piece, CachedPiece):
                cached_tokens[piece.module] += piece.length
        uses = []
        for path in needed:
            stored, tier, shift = found[path]  # type: ignore[misc]
            source: Source = "encoded" if path in encoded_now else tier
            uses.append(ModuleUse(path, source, cached_tokens[path], stored.nbytes, shifted=shift != 0))
        for piece in plan.pieces:
            if isinstance(piece, UncachedPiece) and piece.kind == "uncached_module" and piece.module:
                uses.append(ModuleUse(piece.module, "uncached", piece.length))
        # a prompt that ends with a cached piece has its last token decoded again, maybe at another position
        reusable = next_position == plan.next_position and isinstance(plan.pieces[-1], UncachedPiece)
        return Prefill(logits, next_position, uses, trace if reusable else None, reused,
                       trace.decoded_cells(reused) if trace is not None else 0)

    def _assemble(self, plan: PromptPlan, sources: dict[str, ModuleSource], scratch: list[int],
                  assembly: AssemblyTimings, trace: CellTrace | None, reused: int) -> tuple[Any, int]:
        """Assemble the plan, or only what follows its first ``reused`` cells (the request sequence holds them)."""
        if reused and trace is not None:
            # positions grow along a plan: the kept cells are exactly those before the first one to assemble
            keep_below = int(trace.positions[reused - 1]) + 1
            return assemble(self.runtime.context, plan_after(plan, reused), sources, request_seq=REQUEST_SEQ,
                            scratch_seqs=scratch, timings=assembly, residents=self.residents,
                            keep_request_below=keep_below, protect=plan_run_keys(plan, sources))
        return assemble(self.runtime.context, plan, sources, request_seq=REQUEST_SEQ, scratch_seqs=scratch,
                        timings=assembly, residents=self.residents)

    def _prefill_baseline(self, plan: PromptPlan, timings: dict[str, float]) -> Prefill:
        self._kept = None
        tokens = list(plan.baseline_tokens())
        ctx = self.runtime.context
        ctx.clear(keep=self.residents.seq_ids)
        started = time.perf_counter()
        logits = ctx.decode(tokens, seq_id=REQUEST_SEQ, start=0)
        timings["decode_ms"] = (time.perf_counter() - started) * 1000
        return Prefill(logits, len(tokens), [], None)

    # -- helpers -----------------------------------------------------------------------------------------
    def _filler_token(self) -> int:
        tokens = self.runtime.model.tokenize(" ")
        return tokens[0] if tokens else 0


class AnswerStream:
    """Text pieces of one answer; ``result`` is set when the stream ends (None while it runs or if closed early)."""

    def __init__(self, pieces: Iterator[str], box: list[Result]) -> None:
        self._pieces = pieces
        self._box = box

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def result(self) -> Result | None:
        return self._box[0] if self._box else None


class _Exclusive:
    """One call at a time: a second thread gets a clear error instead of corrupting the shared context."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise BusyError("this PromptCache is answering another call; use one PromptCache per thread or "
                            "serialize calls (for example with a queue)")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _ends_user_turn(items: tuple[Any, ...]) -> bool:
    """True when the prompt's text closes a user turn last (then the assistant's turn is opened for it)."""
    last: RoleTag | None = None
    for item in items:
        if isinstance(item, PromptText):
            for piece in item.pieces:
                if isinstance(piece, RoleTag):
                    last = piece
    return last is not None and last.role is Role.USER and last.kind in ("close", "empty")


def _append_uncached(plan: PromptPlan, tokens: tuple[int, ...], n_ctx: int) -> PromptPlan:
    from pccpu.errors import LayoutOverflowError

    if not tokens:
        return plan
    end = plan.next_position + len(tokens)
    if end > n_ctx:
        raise LayoutOverflowError(f"the prompt needs {end} positions with the assistant's turn opened, more than "
                                  f"n_ctx={n_ctx}")
    piece = UncachedPiece(tokens, plan.next_position, "trailing", None)
    return dataclasses.replace(plan, pieces=(*plan.pieces, piece), uncached_tokens=plan.uncached_tokens + len(tokens),
                               next_position=end)
