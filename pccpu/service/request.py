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
    warnings: tuple[str, ...] = ()

    @classmethod
    def build(cls, plan: PromptPlan, schema: SchemaRecord, warnings: tuple[str, ...] = ()) -> Request:
        runs = tuple(_run_of(schema.module(p.module), p) if isinstance(p, CachedPiece) else None
                     for p in plan.pieces)
        modules = tuple(dict.fromkeys(run[0] for run in runs if run is not None))
        return cls(plan, schema, runs, modules, warnings)

    @property
    def prompt_tokens(self) -> int:
        return self.plan.cached_tokens + self.plan.uncached_tokens

    def run_cells(self, run: RunKey) -> int:
        p0, p1 = self.schema.module(run[0]).ranges[run[1]]
        return p1 - p0

    def after(self, plan: PromptPlan) -> Request:
        """This request with ``plan`` (a tail of this one's plan, see ``reuse.plan_after``)."""
        return Request.build(plan, self.schema, self.warnings)


@dataclass(frozen=True)
class ModuleSource:
    """Where a cached module's cells come from in one request."""

    record: ModuleRecord
    entry: StoredModule
    tier: Source  # ram or disk; "encoded" when it was encoded for this request
    shift: int  # applied to all of its cells: non-zero when it was found stored at another start

    def use(self, tokens: int) -> ModuleUse:
        return ModuleUse(self.record.path, self.tier, tokens, self.entry.nbytes, shifted=self.shift != 0)


def _run_of(record: ModuleRecord, piece: CachedPiece) -> RunKey:
    for index, (p0, p1) in enumerate(record.ranges):
        if p0 <= piece.schema_start and piece.schema_start + piece.length <= p1:
            return record.path, index
    raise InternalError(f"piece [{piece.schema_start}, {piece.schema_start + piece.length}) of module "
                         f"{piece.module!r} lies in none of its text runs {record.ranges} (a planner bug)")


def module_uses(request: Request, sources: dict[str, ModuleSource]) -> list[ModuleUse]:
    """One entry per module the prompt includes: cached ones with their source, then cache="false" ones."""
    tokens: dict[str, int] = dict.fromkeys(request.modules, 0)
    for piece in request.plan.pieces:
        if isinstance(piece, CachedPiece):
            tokens[piece.module] += piece.length
    uses = [sources[path].use(n) for path, n in tokens.items()]
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
