"""The schemas a PromptCache knows: each one's layout, its encode passes, and one record per stored module.

A :class:`ModuleRecord` is everything the request path needs about one module of one schema: the key of its
stored state, the pass that encodes it and its text runs in schema positions (one stored state per run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pccpu.errors import UnknownModuleError, UnknownSchemaError
from pccpu.pml import SchemaLayout
from pccpu.service.passes import Cell, EncodePass
from pccpu.service.repair import RunContext, run_contexts
from pccpu.store import EntryKey

logger = logging.getLogger(__name__)

# (context cells, own cells, start) -> the key of the state those cells give
KeyFunction = Callable[[tuple[Cell, ...], tuple[Cell, ...], int], EntryKey]


@dataclass(frozen=True)
class ModuleRecord:
    path: str
    key: EntryKey
    pass_index: int  # into SchemaRecord.passes
    ranges: tuple[tuple[int, int], ...]  # [p0, p1) text runs in schema positions
    # per run: the cells it attended to before its first cell when encoded (see repair.py)
    contexts: tuple[RunContext, ...] = field(default=(), repr=False, compare=False)

    @property
    def n_cells(self) -> int:
        return sum(p1 - p0 for p0, p1 in self.ranges)


@dataclass(frozen=True)
class SchemaRecord:
    layout: SchemaLayout
    passes: tuple[EncodePass, ...]
    modules: dict[str, ModuleRecord]  # stored modules only, in document order

    @property
    def name(self) -> str:
        return self.layout.name

    def module(self, path: str) -> ModuleRecord:
        record = self.modules.get(path)
        if record is None:
            raise UnknownModuleError(f"schema {self.name!r} stores no module {path!r}; stored: "
                                     f"{', '.join(repr(p) for p in self.modules) or 'none'}")
        return record

    @classmethod
    def build(cls, layout: SchemaLayout, passes: list[EncodePass], key_of: KeyFunction) -> SchemaRecord:
        modules: dict[str, ModuleRecord] = {}
        for index, encode_pass in enumerate(passes):
            for cells in encode_pass.saved:
                key = key_of(encode_pass.context_of(cells), cells.cells, cells.start)
                modules[cells.path] = ModuleRecord(cells.path, key, index, cells.ranges,
                                                   run_contexts(encode_pass, cells))
        order = list(layout.modules)
        return cls(layout, tuple(passes), dict(sorted(modules.items(), key=lambda kv: order.index(kv[0]))))


class SchemaRegistry:
    """Schemas by name; adding a schema under a known name replaces it."""

    def __init__(self) -> None:
        self._records: dict[str, SchemaRecord] = {}

    def add(self, record: SchemaRecord) -> None:
        if record.name in self._records:
            logger.info("schema %r replaced", record.name)
        self._records[record.name] = record

    def get(self, name: str) -> SchemaRecord:
        record = self._records.get(name)
        if record is None:
            known = ", ".join(sorted(self._records)) or "none"
            raise UnknownSchemaError(f"schema {name!r} was not added (added: {known}); add it with add_schema()")
        return record

    def layouts(self) -> dict[str, SchemaLayout]:
        return {name: record.layout for name, record in self._records.items()}
