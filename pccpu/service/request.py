"""A request: a prompt resolved once into everything the request path needs, then passed down.

``PromptCache.plan(prompt)`` builds a :class:`Request` (parsing, checking and placing every piece; pure, nothing
runs); ``PromptCache.ask(request)`` sends it, as httpx's ``build_request`` and ``send``. When it is sent, each cached
module is looked up once in the store (:class:`ModuleSource`: the stored entry, its tier and shift) and the
request's cells are traced once (:class:`~pccpu.service.reuse.CellTrace`, for reuse by the session's next request).
"""

from __future__ import annotations

from dataclasses import dataclass

from pccpu.errors import InternalError
from pccpu.pml import CachedPiece, PromptPlan, SchemaLayout, UncachedPiece
from pccpu.pml.prompt import ModuleRef, Prompt
from pccpu.service.repair import composed_offsets, live_tokens
from pccpu.service.result import ModuleUse, Source
from pccpu.service.schemas import ModuleRecord, SchemaRecord
from pccpu.store import StoredModule

RunKey = tuple[str, int]  # (module path, index of one of its text runs)


@dataclass(frozen=True)
class Request:
    """A prompt planned against its schema. Build it with ``PromptCache.plan``; read ``plan`` to see what will be
    restored and decoded, where."""

    plan: PromptPlan
    schema: SchemaRecord
    runs: tuple[RunKey | None, ...]  # per piece of the plan: the module run a cached piece copies from
    modules: tuple[str, ...]  # cached modules in the order the plan first uses them
    # per piece: None, or (a composed cached piece: placed after other cells than it was encoded after) how far
    # into its run it begins (see repair.py)
    composed: tuple[int | None, ...]
    warnings: tuple[str, ...] = ()

    @classmethod
    def build(cls, plan: PromptPlan, schema: SchemaRecord, warnings: tuple[str, ...] = ()) -> Request:
        runs = tuple(_run_of(schema.module(p.module), p) if isinstance(p, CachedPiece) else None
                     for p in plan.pieces)
        modules = tuple(dict.fromkeys(run[0] for run in runs if run is not None))
        records = [schema.modules[run[0]] if run is not None else None for run in runs]
        contexts = [r.contexts[run[1]] if r is not None and run is not None and r.contexts else None
                    for r, run in zip(records, runs, strict=True)]
        starts = [r.ranges[run[1]][0] if r is not None and run is not None else None
                  for r, run in zip(records, runs, strict=True)]
        return cls(plan, schema, runs, modules, composed_offsets(plan, contexts, starts), warnings)

    def live_tokens(self, repair_tokens: int) -> tuple[int, ...]:
        """Per piece: how many first tokens to decode live with boundary repair of ``repair_tokens``."""
        return live_tokens(self.plan, self.composed, repair_tokens)

    def composed_modules(self) -> frozenset[str]:
        return frozenset(p.module for p, c in zip(self.plan.pieces, self.composed, strict=True)
                         if c is not None and isinstance(p, CachedPiece))

    @property
    def prompt_tokens(self) -> int:
        return self.plan.cached_tokens + self.plan.uncached_tokens

    def run_cells(self, run: RunKey) -> int:
        p0, p1 = self.schema.module(run[0]).ranges[run[1]]
        return p1 - p0

    def after(self, plan: PromptPlan) -> Request:
        """This request with ``plan``: a tail of this one's plan (see ``reuse.plan_after``), whose first piece may
        begin inside this one's piece at the same index from the end."""
        n = len(plan.pieces)
        if n == 0:
            return Request(plan, self.schema, (), (), (), self.warnings)
        runs, composed = self.runs[-n:], list(self.composed[-n:])
        cut = plan.pieces[0].start - self.plan.pieces[-n].start
        if composed[0] is not None:
            composed[0] += cut
        modules = tuple(dict.fromkeys(run[0] for run in runs if run is not None))
        return Request(plan, self.schema, runs, modules, tuple(composed), self.warnings)


@dataclass(frozen=True)
class ModuleSource:
    """Where a cached module's cells come from in one request."""

    record: ModuleRecord
    entry: StoredModule
    tier: Source  # ram or disk; "encoded" when it was encoded for this request
    shift: int  # applied to all of its cells: non-zero when it was found stored at another start

    def use(self, tokens: int, *, composed: bool = False, repaired: int = 0) -> ModuleUse:
        return ModuleUse(self.record.path, self.tier, tokens, self.entry.nbytes, shifted=self.shift != 0,
                         composed=composed or self.shift != 0, repaired_tokens=repaired)


def _run_of(record: ModuleRecord, piece: CachedPiece) -> RunKey:
    for index, (p0, p1) in enumerate(record.ranges):
        if p0 <= piece.schema_start and piece.schema_start + piece.length <= p1:
            return record.path, index
    raise InternalError(f"piece [{piece.schema_start}, {piece.schema_start + piece.length}) of module "
                         f"{piece.module!r} lies in none of its text runs {record.ranges} (a planner bug)")


def module_uses(request: Request, sources: dict[str, ModuleSource], live: tuple[int, ...] = ()) -> list[ModuleUse]:
    """One entry per module the prompt includes: cached ones with their source (and how many of their tokens were
    decoded in place by boundary repair, ``live``), then cache="false" ones."""
    tokens: dict[str, int] = dict.fromkeys(request.modules, 0)
    repaired: dict[str, int] = dict.fromkeys(request.modules, 0)
    composed = request.composed_modules()
    for index, piece in enumerate(request.plan.pieces):
        if isinstance(piece, CachedPiece):
            tokens[piece.module] += piece.length
            repaired[piece.module] += live[index] if live else 0
    uses = [sources[path].use(n, composed=path in composed, repaired=repaired[path]) for path, n in tokens.items()]
    for piece in request.plan.pieces:
        if isinstance(piece, UncachedPiece) and piece.kind == "uncached_module" and piece.module:
            uses.append(ModuleUse(piece.module, "uncached", piece.length))
    return uses


def order_warnings(layout: SchemaLayout, prompt: Prompt) -> tuple[str, ...]:
    """A warning for each group of sibling references written out of schema order: modules always take their
    schema positions, so such a prompt is answered in schema order."""
    warnings: list[str] = []

    def check(refs: tuple[ModuleRef, ...], parent: str) -> None:
        paths = [f"{parent}/{r.name}" if parent else r.name for r in refs]
        known = [p for p in paths if p in layout.modules]
        in_schema_order = sorted(known, key=lambda p: layout.modules[p].start)
        if known != in_schema_order:
            names = [p.rsplit("/", 1)[-1] for p in known]
            used = [p.rsplit("/", 1)[-1] for p in in_schema_order]
            where = f" inside {parent!r}" if parent else ""
            warnings.append(f"modules {', '.join(names)}{where} are referenced out of schema order; they are placed "
                            f"at their schema positions, in the order {', '.join(used)}")
        for ref, path in zip(refs, paths, strict=True):
            check(ref.children, path)

    check(prompt.refs, "")
    return tuple(warnings)
