"""What to decode to encode a schema's modules: the *passes*. Pure layout arithmetic, no engine.

A pass is a set of (position, token) cells decoded together in position order; the modules it *saves* are the
ones whose text cells are stored from it. Two context modes:

* ``isolated`` (the paper): one pass per module, made of the module's own cells and the own cells of its
  ancestors that precede it (the root's text, so BOS and the system text, is always there). Siblings never see
  each other.
* ``sequential`` (the reference prototype): every module attends to every schema chunk before it, each union
  filled with its scaffold member (or nothing without a scaffold). Modules inside a non-scaffold union member are
  saved from a pass that chooses that member; everything else comes from one main pass.

Parameter slots are decoded with their scaffold tokens followed by a filler token up to the slot's length; those
cells are attended to by later text but never saved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pccpu.errors import ConfigError, InternalError
from pccpu.pml import NestedModule, SchemaLayout, TextChunk, UnionLayout

ContextMode = Literal["isolated", "sequential"]
CONTEXT_MODES: tuple[str, ...] = ("isolated", "sequential")

Cell = tuple[int, int]  # (position, token)


@dataclass(frozen=True)
class ModuleCells:
    """The cells a module's stored state holds: its text, as position ranges and (position, token) pairs."""

    path: str
    ranges: tuple[tuple[int, int], ...]  # [p0, p1) runs of consecutive text positions
    cells: tuple[Cell, ...]

    @property
    def start(self) -> int:
        return self.ranges[0][0]

    @property
    def end(self) -> int:
        return self.ranges[-1][1]


@dataclass(frozen=True)
class EncodePass:
    cells: tuple[Cell, ...]  # sorted by position, unique positions
    saved: tuple[ModuleCells, ...]

    @property
    def first_saved(self) -> int:
        return min(m.start for m in self.saved)

    def context_of(self, module: ModuleCells) -> tuple[Cell, ...]:
        """Cells the module's state was computed from, besides its own, at the positions they are decoded at:
        cells before the pass's first saved cell are packed right before it (see ``encoder.py``)."""
        own = {p for p, _ in module.cells}
        first = self.first_saved
        before = [c for c in self.cells if c[0] < first]
        packed = [(first - len(before) + i, token) for i, (_, token) in enumerate(before)]
        between = [c for c in self.cells if first <= c[0] < module.end and c[0] not in own]
        return (*packed, *between)


def check_mode(mode: str) -> ContextMode:
    if mode not in CONTEXT_MODES:
        raise ConfigError(f"context mode must be one of {', '.join(CONTEXT_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def own_cells(layout: SchemaLayout, path: str, filler: int) -> list[Cell]:
    """The module's own text cells plus its parameter slots filled (scaffold, then filler)."""
    out: list[Cell] = []
    for item in layout.modules[path].items:
        if isinstance(item, TextChunk):
            out.extend((item.start + i, t) for i, t in enumerate(item.tokens))
        else:
            fill = list(item.scaffold_tokens) + [filler] * (item.length - len(item.scaffold_tokens))
            out.extend((item.start + i, t) for i, t in enumerate(fill))
    return out


def module_cells(layout: SchemaLayout, path: str) -> ModuleCells | None:
    """The module's saved cells (text chunks only), or None for a module without text."""
    cells: list[Cell] = []
    ranges: list[tuple[int, int]] = []
    for item in layout.modules[path].items:
        if isinstance(item, TextChunk) and item.tokens:
            cells.extend((item.start + i, t) for i, t in enumerate(item.tokens))
            if ranges and ranges[-1][1] == item.start:
                ranges[-1] = (ranges[-1][0], item.end)
            else:
                ranges.append((item.start, item.end))
    return ModuleCells(path, tuple(ranges), tuple(cells)) if cells else None


def ancestors(layout: SchemaLayout, path: str) -> list[str]:
    chain: list[str] = []
    parent = layout.modules[path].parent
    while parent is not None:
        chain.append(parent)
        parent = layout.modules[parent].parent
    return chain[::-1]


def cached_modules(layout: SchemaLayout) -> list[str]:
    """Modules whose state is stored: cache=True ones with text, in document order."""
    return [p for p, m in layout.modules.items() if m.cache and module_cells(layout, p) is not None]


def plan_passes(layout: SchemaLayout, mode: ContextMode, filler: int, only: Iterable[str] | None = None) -> list[
        EncodePass]:
    """The passes that encode ``only`` (default: every cached module)."""
    wanted = list(only) if only is not None else cached_modules(layout)
    if mode == "isolated":
        return [_isolated_pass(layout, p, filler) for p in wanted]
    groups: dict[frozenset[tuple[str, str]], list[str]] = defaultdict(list)
    for path in wanted:
        groups[frozenset(_forced_choices(layout, path).items())].append(path)
    return [_sequential_pass(layout, dict(forced), paths, filler) for forced, paths in groups.items()]


def _isolated_pass(layout: SchemaLayout, path: str, filler: int) -> EncodePass:
    saved = module_cells(layout, path)
    if saved is None:
        raise InternalError(f"module {path!r} has no text to encode (the caller should have skipped it)")
    cells = [c for a in ancestors(layout, path) for c in own_cells(layout, a, filler) if c[0] < saved.start]
    cells += own_cells(layout, path, filler)
    return EncodePass(tuple(sorted(cells)), (saved,))


def _forced_choices(layout: SchemaLayout, path: str) -> dict[str, str]:
    """Union choices a pass must make for ``path`` to be present: union id -> member on the path."""
    forced: dict[str, str] = {}
    for p in [*ancestors(layout, path), path]:
        uid = layout.modules[p].union_id
        if uid is not None:
            forced[uid] = p
    return forced


def _included(layout: SchemaLayout, forced: dict[str, str]) -> list[str]:
    out: list[str] = []

    def walk(path: str) -> None:
        out.append(path)
        for part in layout.modules[path].body:
            if isinstance(part, NestedModule):
                walk(part.path)
            elif isinstance(part, UnionLayout):
                member = forced.get(part.id, part.scaffold)
                if member is not None:
                    walk(member)

    walk("")
    return out


def _sequential_pass(layout: SchemaLayout, forced: dict[str, str], paths: list[str], filler: int) -> EncodePass:
    saved = [m for m in (module_cells(layout, p) for p in paths) if m is not None]
    end = max(m.end for m in saved)
    cells = sorted(c for p in _included(layout, forced) for c in own_cells(layout, p, filler) if c[0] < end)
    return EncodePass(tuple(cells), tuple(saved))

