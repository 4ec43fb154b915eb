"""Resolve a prompt against a schema layout into a :class:`PromptPlan`: the pieces llama.cpp will really hold.

llama.cpp decodes a sequence only at ``pos_max + 1`` of what it already holds, while copied cached cells may keep
any positions. So the plan keeps a cursor, one past the last position placed, and walks the schema in order:

* a cached piece (a contiguous run of one module's own cells) keeps its schema positions when its schema start is
  >= the cursor (gaps are fine); otherwise it is shifted right to start at the cursor;
* an uncached piece (a parameter argument, the content of a ``cache="false"`` module, prompt text between
  references, trailing text) is decoded at the cursor.

A module with a parameter becomes: its cells up to the slot, the argument at the cursor (the slot's start), then
its cells after the slot at their schema positions; the slot's unused rest is a gap (filler cells are never copied).
A module's own cells before and after a nested module or union are separate pieces.

Prompt text goes right after the subtree of the reference that precedes it at the top level of ``<prompt>``; text
before the first reference goes right before that module; text after the last reference (or in a prompt with no
references) is trailing text, decoded after the whole schema.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from pccpu.errors import (
    DuplicateNameError,
    LayoutOverflowError,
    ParameterError,
    UnionConflictError,
    UnknownModuleError,
    UnknownSchemaError,
)
from pccpu.pml.layout import NestedModule, ParameterSlot, SchemaLayout, TextChunk, UnionLayout
from pccpu.pml.prompt import ModuleRef, Prompt, PromptText
from pccpu.pml.text import InOrder
from pccpu.roles import RoleRenderer, Tokenizer

log = logging.getLogger(__name__)

UncachedKind = Literal["argument", "uncached_module", "prompt_text", "trailing"]


@dataclass(frozen=True)
class CachedPiece:
    """Copy cells ``[schema_start, schema_start + length)`` of ``module``'s state, moved by ``start - schema_start``."""

    module: str
    schema_start: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def shift(self) -> int:
        return self.start - self.schema_start


@dataclass(frozen=True)
class UncachedPiece:
    """Tokens decoded fresh at positions ``[start, start + len(tokens))``."""

    tokens: tuple[int, ...]
    start: int
    kind: UncachedKind
    module: str | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


Piece = CachedPiece | UncachedPiece


@dataclass(frozen=True)
class PromptPlan:
    schema: str
    pieces: tuple[Piece, ...]
    included_modules: tuple[str, ...]  # paths, root ("") first, in schema order
    cached_tokens: int
    uncached_tokens: int
    next_position: int  # where generation continues
    layout: SchemaLayout = field(repr=False, compare=False)

    def piece_tokens(self, piece: Piece) -> tuple[int, ...]:
        if isinstance(piece, UncachedPiece):
            return piece.tokens
        return self.layout.tokens_at(piece.module, piece.schema_start, piece.length)

    def baseline_tokens(self) -> tuple[int, ...]:
        """Every piece's tokens in plan order: what a full prefill of the same text would decode."""
        return tuple(t for piece in self.pieces for t in self.piece_tokens(piece))

    def to_dict(self) -> dict[str, Any]:
        def one(p: Piece) -> dict[str, Any]:
            if isinstance(p, CachedPiece):
                return {"type": "cached", "module": p.module, "schema_start": p.schema_start, "start": p.start,
                        "length": p.length}
            return {"type": "uncached", "kind": p.kind, "module": p.module, "start": p.start, "length": p.length}

        return {"schema": self.schema, "included_modules": list(self.included_modules),
                "cached_tokens": self.cached_tokens, "uncached_tokens": self.uncached_tokens,
                "next_position": self.next_position, "pieces": [one(p) for p in self.pieces]}


def resolve_prompt(
    layout: SchemaLayout, prompt: Prompt, tokenizer: Tokenizer, roles: RoleRenderer, *, n_ctx: int | None = None
) -> PromptPlan:
    """Check a prompt against a layout and place every piece (see the module docstring)."""
    if prompt.schema != layout.name:
        raise UnknownSchemaError(f"the prompt names schema {prompt.schema!r}, but this layout is schema "
                                 f"{layout.name!r}", source=prompt.source)
    selection = _Selection(layout, tokenizer, prompt.source)
    for ref in prompt.refs:
        selection.select(ref, "")
    before: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    after: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    trailing: list[tuple[int, ...]] = []
    pending: list[tuple[int, ...]] = []
    previous: str | None = None
    in_order = InOrder(roles, layout.last_tag)
    for item in prompt.items:
        if isinstance(item, PromptText):
            text = in_order.render(item.pieces)
            tokens = tuple(tokenizer.tokenize(text)) if text else ()
            if tokens:
                pending.append(tokens)
        else:
            if previous is None:
                before[item.name].extend(pending)
            else:
                after[previous].extend(pending)
            pending = []
            previous = item.name
    trailing = pending
    walker = _Walker(layout, selection, before, after)
    walker.module("")
    for tokens in trailing:
        walker.uncached(tokens, "trailing", None)
    pieces = tuple(walker.pieces)
    cached = sum(p.length for p in pieces if isinstance(p, CachedPiece))
    uncached = sum(p.length for p in pieces if isinstance(p, UncachedPiece))
    plan = PromptPlan(layout.name, pieces, tuple(walker.included), cached, uncached, walker.cursor, layout)
    if n_ctx is not None and plan.next_position > n_ctx:
        raise LayoutOverflowError(f"the prompt for schema {layout.name!r} needs positions up to "
                                  f"{plan.next_position}, more than the model's context of n_ctx={n_ctx} "
                                  f"(schema span {layout.span})", source=prompt.source)
    log.debug("plan for %r: %d pieces, %d cached + %d uncached tokens", layout.name, len(pieces), cached, uncached)
    return plan


class _Selection:
    """Which modules a prompt includes, with their arguments tokenized and checked."""

    def __init__(self, layout: SchemaLayout, tokenizer: Tokenizer, source: str | None) -> None:
        self.layout = layout
        self.tokenizer = tokenizer
        self.source = source
        self.included: dict[str, dict[str, tuple[int, ...]]] = {"": {}}
        self.chosen: dict[str, str] = {}  # union id -> member path

    def _scope(self, parent: str) -> str:
        return f"schema {self.layout.name!r}" if parent == "" else f"module {parent!r}"

    def select(self, ref: ModuleRef, parent: str) -> None:
        path = f"{parent}/{ref.name}" if parent else ref.name
        mod = self.layout.modules.get(path)
        if mod is None or mod.parent != parent:
            names = ", ".join(c.rsplit("/", 1)[-1] for c in self.layout.modules[parent].children) or "none"
            raise UnknownModuleError(f"line {ref.line}: {self._scope(parent)} has no module {ref.name!r} "
                                     f"(valid: {names})", source=self.source)
        if path in self.included:
            raise DuplicateNameError(f"line {ref.line}: module {ref.name!r} is referenced twice", source=self.source)
        if mod.union_id is not None:
            other = self.chosen.get(mod.union_id)
            if other is not None:
                raise UnionConflictError(f"line {ref.line}: modules {other.rsplit('/', 1)[-1]!r} and {ref.name!r} "
                                         f"are members of one union in {self._scope(parent)}; choose one",
                                         source=self.source)
            self.chosen[mod.union_id] = path
        self.included[path] = self._arguments(ref, path)
        for child in ref.children:
            self.select(child, path)

    def _arguments(self, ref: ModuleRef, path: str) -> dict[str, tuple[int, ...]]:
        slots = self.layout.modules[path].parameters
        args = ref.arguments
        for name in args:
            if name not in slots:
                valid = ", ".join(slots) or "none"
                raise ParameterError(f"line {ref.line}: module {ref.name!r} has no parameter {name!r} "
                                     f"(parameters: {valid})", source=self.source)
        out: dict[str, tuple[int, ...]] = {}
        for name, slot in slots.items():
            if name not in args:
                raise ParameterError(f"line {ref.line}: module {ref.name!r} needs an argument for parameter "
                                     f"{name!r} (write <{ref.name} {name}=\"...\">)", source=self.source)
            tokens = tuple(self.tokenizer.tokenize(args[name])) if args[name] else ()
            if len(tokens) > slot.length:
                raise ParameterError(f"line {ref.line}: argument {name!r}={args[name]!r} of module {ref.name!r} is "
                                     f"{len(tokens)} tokens, longer than the parameter's length of {slot.length} "
                                     "tokens", source=self.source)
            out[name] = tokens
        return out


class _Walker:
    def __init__(self, layout: SchemaLayout, selection: _Selection, before: dict[str, list[tuple[int, ...]]],
                 after: dict[str, list[tuple[int, ...]]]) -> None:
        self.layout = layout
        self.selection = selection
        self.before = before
        self.after = after
        self.cursor = 0
        self.pieces: list[Piece] = []
        self.included: list[str] = []

    def cached(self, module: str, schema_start: int, length: int) -> None:
        start = max(schema_start, self.cursor)
        self.pieces.append(CachedPiece(module, schema_start, start, length))
        self.cursor = start + length

    def uncached(self, tokens: tuple[int, ...], kind: UncachedKind, module: str | None) -> None:
        if tokens:
            self.pieces.append(UncachedPiece(tokens, self.cursor, kind, module))
            self.cursor += len(tokens)

    def child(self, path: str) -> None:
        if path not in self.selection.included:
            return
        name = path.rsplit("/", 1)[-1]
        top = "/" not in path
        for tokens in self.before.get(name, []) if top else []:
            self.uncached(tokens, "prompt_text", None)
        self.module(path)
        for tokens in self.after.get(name, []) if top else []:
            self.uncached(tokens, "prompt_text", None)

    def module(self, path: str) -> None:
        mod = self.layout.modules[path]
        args = self.selection.included[path]
        self.included.append(path)
        run: list[int] = []  # [schema_start, length] of the current cached run

        def flush() -> None:
            if run:
                self.cached(path, run[0], run[1])
                run.clear()

        for part in mod.body:
            if isinstance(part, TextChunk):
                if not mod.cache:
                    self.uncached(part.tokens, "uncached_module", path)
                elif run and run[0] + run[1] == part.start:
                    run[1] += part.length
                else:
                    flush()
                    run.extend((part.start, part.length))
            elif isinstance(part, ParameterSlot):
                flush()
                self.uncached(args[part.name], "argument", path)
            elif isinstance(part, NestedModule):
                flush()
                self.child(part.path)
            elif isinstance(part, UnionLayout):
                flush()
                for member in part.members:
                    self.child(member)
        flush()
