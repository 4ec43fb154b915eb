"""One stored module state and its metadata, checked once when it is created or loaded.

A module's state is one llama.cpp sequence state per contiguous run of its text (a module interrupted by a nested
module has several runs), concatenated; ``run_bytes`` says where each run's bytes end, so each run can be restored at
its own turn and the request's KV cells end up in position order, as a full prefill lays them out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pccpu.errors import CorruptEntryError
from pccpu.store.keys import EntryKey

Range = tuple[int, int]


@dataclass(frozen=True)
class EntryMeta:
    """What a stored state describes. Written into the disk file's header (see ``entry_file.py``)."""

    schema: str
    module: str  # path in the schema ("" is the schema's own text)
    mode: str  # context mode it was encoded in
    ranges: tuple[Range, ...]  # [p0, p1) text runs at the positions it was encoded at
    run_bytes: tuple[int, ...]  # state bytes of each run
    model: str  # model fingerprint
    state: str  # engine settings fingerprint
    model_file: str = ""
    created: float = 0.0
    context: str = ""  # chat chunks in compose mode: digest of the prefix it was computed after ("" when unknown)

    @property
    def n_cells(self) -> int:
        return sum(p1 - p0 for p0, p1 in self.ranges)

    def to_fields(self) -> dict[str, Any]:
        return {"schema": self.schema, "module": self.module, "mode": self.mode, "n_cells": self.n_cells,
                "ranges": [list(r) for r in self.ranges], "run_bytes": list(self.run_bytes), "model": self.model,
                "state": self.state, "model_file": self.model_file, "created": self.created,
                "context": self.context}

    @classmethod
    def from_fields(cls, fields: dict[str, Any], *, where: str) -> EntryMeta:
        """Typed metadata from a file header; a missing or ill-typed field is a :class:`CorruptEntryError`."""
        try:
            ranges = tuple((int(r[0]), int(r[1])) for r in fields["ranges"])
            run_bytes = tuple(int(n) for n in fields["run_bytes"])
            meta = cls(schema=str(fields["schema"]), module=str(fields["module"]), mode=str(fields["mode"]),
                       ranges=ranges, run_bytes=run_bytes, model=str(fields["model"]), state=str(fields["state"]),
                       model_file=str(fields.get("model_file", "")), created=float(fields.get("created", 0.0)),
                       context=str(fields.get("context", "")))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CorruptEntryError(f"{where}: unreadable metadata ({type(exc).__name__}: {exc}); it will be "
                                    "encoded again") from None
        return meta


@dataclass(frozen=True)
class StoredModule:
    """One module's saved state (uint8, as llama_state_seq_get_data wrote it, runs concatenated) and its metadata."""

    key: EntryKey
    state: np.ndarray = field(repr=False)
    meta: EntryMeta

    def __post_init__(self) -> None:
        m = self.meta
        if len(m.run_bytes) != len(m.ranges) or not m.ranges or any(n <= 0 for n in m.run_bytes) \
                or sum(m.run_bytes) != self.state.nbytes or any(p1 <= p0 for p0, p1 in m.ranges):
            raise CorruptEntryError(
                f"stored module {self.key.file_stem}: {len(m.ranges)} text run(s) {list(m.ranges)} with run sizes "
                f"{list(m.run_bytes)} do not describe its {self.state.nbytes} state bytes; it will be encoded again"
            )

    @property
    def nbytes(self) -> int:
        return int(self.state.nbytes)

    def runs(self) -> list[np.ndarray]:
        """The state split into one sequence state per text run (views, no copy)."""
        bounds = [0, *itertools.accumulate(self.meta.run_bytes)]
        return [self.state[a:b] for a, b in itertools.pairwise(bounds)]
