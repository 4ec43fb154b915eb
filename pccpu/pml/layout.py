"""Schema layout: the fixed position range of every text chunk and parameter slot, computed once per schema.

Walk the schema in document order with a cursor that starts at 0. The root's first chunk is ``bos_tokens`` (when
any); each text chunk (text and role tags between two other items, rendered and tokenized as one string) takes the
next ``len(tokens)`` positions; a parameter reserves ``length`` positions; a nested module continues at the cursor;
every member of a union starts at the union's start and the union ends where its longest member ends. A module's
*own* content (its chunks and slots, not its nested modules) is what its cache entry holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from pccpu.errors import InternalError, LayoutOverflowError, ParameterError
from pccpu.pml import schema as s
from pccpu.pml.text import InOrder, pieces_to_pml
from pccpu.roles import RoleRenderer, RoleTag, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextChunk:
    module: str  # module path ("" for the root)
    start: int
    tokens: tuple[int, ...]
    text: str = ""  # the chunk as PML text (role tags as tags), for display

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class ParameterSlot:
    module: str
    name: str
    start: int
    length: int
    scaffold_tokens: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class NestedModule:
    """Where a nested (non-union) module sits in its parent's body."""

    path: str


@dataclass(frozen=True)
class UnionLayout:
    id: str  # "<parent path>#<index of the union in its parent>"
    parent: str
    start: int
    end: int
    members: tuple[str, ...]  # member paths
    scaffold: str | None = None  # member path


OwnItem = Union[TextChunk, ParameterSlot]  # noqa: UP007
BodyPart = Union[TextChunk, ParameterSlot, NestedModule, UnionLayout]  # noqa: UP007


@dataclass(frozen=True)
class ModuleLayout:
    path: str
    name: str
    parent: str | None
    start: int
    end: int  # exclusive: start + the module's whole span, nested modules included
    cache: bool
    body: tuple[BodyPart, ...]  # own items, nested modules and unions, in document order
    union_id: str | None = None

    @property
    def items(self) -> tuple[OwnItem, ...]:
        """The module's own content, in position order."""
        return tuple(p for p in self.body if isinstance(p, (TextChunk, ParameterSlot)))

    @property
    def children(self) -> tuple[str, ...]:
        out: list[str] = []
        for p in self.body:
            if isinstance(p, NestedModule):
                out.append(p.path)
            elif isinstance(p, UnionLayout):
                out.extend(p.members)
        return tuple(out)

    @property
    def own_tokens(self) -> int:
        """Cells the module's cache entry holds (its chunks; parameter slots hold scaffold or filler)."""
        return sum(i.length for i in self.items)

    @property
    def parameters(self) -> dict[str, ParameterSlot]:
        return {i.name: i for i in self.items if isinstance(i, ParameterSlot)}


@dataclass(frozen=True)
class SchemaLayout:
    name: str
    modules: dict[str, ModuleLayout]
    span: int
    source: str | None = None
    unions: dict[str, UnionLayout] = field(default_factory=dict)
    bos_tokens: tuple[int, ...] = ()
    last_tag: RoleTag | None = None  # the schema's last role tag in document order (a prompt's text follows it)

    @property
    def root(self) -> ModuleLayout:
        return self.modules[""]

    def tokens_at(self, path: str, start: int, length: int) -> tuple[int, ...]:
        """The tokens of module ``path``'s own chunks covering positions ``[start, start + length)``."""
        out: list[int] = []
        for chunk in self.modules[path].items:
            if isinstance(chunk, TextChunk):
                lo, hi = max(start, chunk.start), min(start + length, chunk.end)
                if lo < hi:
                    out.extend(chunk.tokens[lo - chunk.start : hi - chunk.start])
        if len(out) != length:
            raise InternalError(f"positions [{start}, {start + length}) are not all text of module {path!r}")
        return tuple(out)

    def to_dict(self, *, tokens: bool = False) -> dict[str, Any]:
        """A JSON-able description; ``tokens=True`` adds the token ids of every chunk."""
        def item(i: OwnItem) -> dict[str, Any]:
            if isinstance(i, TextChunk):
                d: dict[str, Any] = {"type": "text", "start": i.start, "length": i.length, "text": i.text}
                if tokens:
                    d["tokens"] = list(i.tokens)
                return d
            return {"type": "parameter", "name": i.name, "start": i.start, "length": i.length,
                    "scaffold_tokens": len(i.scaffold_tokens)}

        return {
            "schema": self.name,
            "source": self.source,
            "span": self.span,
            "modules": [
                {"path": m.path, "name": m.name, "parent": m.parent, "start": m.start, "end": m.end, "cache": m.cache,
                 "union": m.union_id, "own_tokens": m.own_tokens, "children": list(m.children),
                 "items": [item(i) for i in m.items]}
                for m in self.modules.values()
            ],
            "unions": [
                {"id": u.id, "parent": u.parent, "start": u.start, "end": u.end, "members": list(u.members),
                 "scaffold": u.scaffold}
                for u in self.unions.values()
            ],
        }

    def render_tree(self, module_note: Callable[[ModuleLayout], str] | None = None) -> str:
        """A readable tree of modules, unions and parameters with their position ranges.

        ``module_note`` adds text to each module line (``pccpu schema show`` adds KV memory); by default a
        ``cache=false`` module is marked as such.
        """
        note = module_note or (lambda mod: "" if mod.cache else "cache=false")
        lines = [f"schema {self.name}  [0, {self.span})  {self.span} positions"]
        self._render(self.root, 1, lines, note)
        return "\n".join(lines)

    def _render(self, mod: ModuleLayout, depth: int, lines: list[str], note: Callable[[ModuleLayout], str]) -> None:
        pad = "  " * depth
        for part in mod.body:
            if isinstance(part, TextChunk):
                preview = part.text.replace("\n", " ")
                preview = preview[:48] + "..." if len(preview) > 48 else preview
                lines.append(f"{pad}text [{part.start}, {part.end})  {part.length} tokens  {preview!r}")
            elif isinstance(part, ParameterSlot):
                scaffold = f"  scaffold {len(part.scaffold_tokens)} tokens" if part.scaffold_tokens else ""
                lines.append(f"{pad}parameter {part.name} [{part.start}, {part.end})  length {part.length}{scaffold}")
            elif isinstance(part, NestedModule):
                self._render_module(self.modules[part.path], depth, lines, note)
            else:
                scaffold = f"  scaffold={part.scaffold.rsplit('/', 1)[-1]}" if part.scaffold else ""
                members = f"{len(part.members)} member" + ("" if len(part.members) == 1 else "s")
                lines.append(f"{pad}union [{part.start}, {part.end})  {members}{scaffold}")
                for member in part.members:
                    self._render_module(self.modules[member], depth + 1, lines, note)

    def _render_module(self, mod: ModuleLayout, depth: int, lines: list[str],
                       note: Callable[[ModuleLayout], str]) -> None:
        extra = note(mod)
        lines.append(f"{'  ' * depth}module {mod.name} [{mod.start}, {mod.end})  own {mod.own_tokens} tokens"
                     + (f"  {extra}" if extra else ""))
        self._render(mod, depth + 1, lines, note)


def build_layout(
    schema: s.Schema,
    tokenizer: Tokenizer,
    roles: RoleRenderer,
    *,
    bos_tokens: Sequence[int] = (),
    n_ctx: int | None = None,
) -> SchemaLayout:
    """Tokenize every chunk and give it its fixed position range (see the module docstring)."""
    builder = _LayoutBuilder(schema, tokenizer, roles)
    bos = tuple(bos_tokens)
    root = builder.module(schema.body, "", schema.name, None, 0, None, True, prefix=bos)
    layout = SchemaLayout(name=schema.name, modules=builder.modules, span=root.end, source=schema.source,
                          unions=builder.unions, bos_tokens=bos, last_tag=builder.text.previous)
    if n_ctx is not None and layout.span > n_ctx:
        raise LayoutOverflowError(f"schema {schema.name!r} spans {layout.span} positions, more than the model's "
                                  f"context of n_ctx={n_ctx}", source=schema.source)
    log.debug("layout of %r: %d modules, span %d", schema.name, len(layout.modules), layout.span)
    return layout


class _LayoutBuilder:
    def __init__(self, schema: s.Schema, tokenizer: Tokenizer, roles: RoleRenderer) -> None:
        self.schema = schema
        self.tokenizer = tokenizer
        self.text = InOrder(roles)
        self.modules: dict[str, ModuleLayout] = {}
        self.unions: dict[str, UnionLayout] = {}

    def module(self, nodes: tuple[s.Node, ...], path: str, name: str, parent: str | None, start: int,
               union_id: str | None, cache: bool, prefix: tuple[int, ...] = ()) -> ModuleLayout:
        cursor = start
        body: list[BodyPart] = []
        if prefix:
            body.append(TextChunk(path, cursor, prefix, "<bos>"))
            cursor += len(prefix)
        self.modules[path] = None  # type: ignore[assignment]  # reserve document order for the parent
        n_unions = 0
        for node in nodes:
            if isinstance(node, s.Text):
                text = self.text.render(node.pieces)
                tokens = tuple(self.tokenizer.tokenize(text)) if text else ()
                if tokens:
                    body.append(TextChunk(path, cursor, tokens, pieces_to_pml(node.pieces)))
                    cursor += len(tokens)
            elif isinstance(node, s.Parameter):
                scaffold = tuple(self.tokenizer.tokenize(node.scaffold)) if node.scaffold else ()
                if len(scaffold) > node.length:
                    raise ParameterError(f"line {node.line}: scaffold of parameter {node.name!r} in module {path!r} "
                                         f"is {len(scaffold)} tokens, longer than its length of {node.length} tokens",
                                         source=self.schema.source)
                body.append(ParameterSlot(path, node.name, cursor, node.length, scaffold))
                cursor += node.length
            elif isinstance(node, s.Module):
                child = self.module(node.body, _join(path, node.name), node.name, path, cursor, None, node.cache)
                body.append(NestedModule(child.path))
                cursor = child.end
            else:
                uid = f"{path}#{n_unions}"
                n_unions += 1
                members = []
                before, after = self.text.previous, set()
                for m in node.members:  # alternatives: each follows the tag before the union
                    self.text.previous = before
                    members.append(self.module(m.body, _join(path, m.name), m.name, path, cursor, uid, m.cache))
                    after.add(self.text.previous)
                # what follows the union follows one of them: known only when they all end alike
                self.text.previous = after.pop() if len(after) == 1 else None
                end = max(m.end for m in members)
                union = UnionLayout(uid, path, cursor, end, tuple(m.path for m in members),
                                    _join(path, node.scaffold) if node.scaffold else None)
                self.unions[uid] = union
                body.append(union)
                cursor = end
        layout = ModuleLayout(path, name, parent, start, cursor, cache, tuple(body), union_id)
        self.modules[path] = layout
        return layout


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name
