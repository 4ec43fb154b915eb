"""Encoding modules (``ModuleEncoder``): decode each pass (see ``passes.py``) into a work sequence and save every
module's text cells as its own sequence state.

Positions. Cells before the first saved cell of a pass are context: they are packed right before it, so the first
saved cell is decoded at its exact schema position with its context adjacent. After that, runs of consecutive
positions are decoded where they belong; a run after a gap (a shorter union member, a module left out of the
pass) is decoded at ``pos_max + 1`` (llama.cpp's rule) and then shifted to its schema position.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pccpu.engine.protocols import Context
from pccpu.errors import InternalError
from pccpu.service.passes import Cell, ContextMode, EncodePass, ModuleCells
from pccpu.service.resident import ResidentModules
from pccpu.service.runtime import Runtime
from pccpu.service.schemas import SchemaRecord
from pccpu.service.sessions import SessionTable
from pccpu.store import EntryKey, EntryMeta, Hit, ModuleStore, StoredModule, content_key

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens total)


@dataclass
class EncodedModule:
    cells: ModuleCells
    context: tuple[Cell, ...]
    state: np.ndarray  # the runs' sequence states, concatenated
    run_bytes: tuple[int, ...]  # size of each run's state, one per range of ``cells``


@dataclass
class EncodeStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _runs(cells: list[Cell]) -> list[list[Cell]]:
    runs: list[list[Cell]] = []
    for cell in cells:
        if runs and runs[-1][-1][0] + 1 == cell[0]:
            runs[-1].append(cell)
        else:
            runs.append([cell])
    return runs


def encode_pass(
    context: Context,
    encode_pass: EncodePass,
    *,
    work_seq: int,
    save_seq: int,
    stats: EncodeStats | None = None,
    progress: ProgressCallback | None = None,
    done_before: int = 0,
    total: int = 0,
) -> list[EncodedModule]:
    """Decode the pass into ``work_seq`` from a cleared cache and return each saved module's state."""
    started = time.perf_counter()
    first_saved = encode_pass.first_saved
    before = [c for c in encode_pass.cells if c[0] < first_saved]
    after = [c for c in encode_pass.cells if c[0] >= first_saved]
    context.clear()  # nothing else lives in the KV between requests; same cells as a full prefill would use
    done = done_before
    try:
        if before:
            # the context, packed so that it ends right before the first saved cell
            context.decode([t for _, t in before], seq_id=work_seq, start=first_saved - len(before), logits="none")
            done += len(before)
            if progress:
                progress(done, total)
        for run in _runs(after):
            target = run[0][0]
            next_free = context.seq_pos_max(work_seq) + 1
            at = target if next_free == 0 else next_free
            if at > target:
                raise InternalError(f"encode pass cells overlap at position {target}")
            context.decode([t for _, t in run], seq_id=work_seq, start=at, logits="none")
            if at != target:
                context.seq_add(work_seq, at, at + len(run), target - at)
            done += len(run)
            if progress:
                progress(done, total)
        context.apply_pending_shift()
        out = []
        for module in encode_pass.saved:
            # one state per run: each is restored at its own turn, keeping the request's cells in position order
            runs = []
            for p0, p1 in module.ranges:
                context.seq_cp(work_seq, save_seq, p0, p1)
                runs.append(context.state_seq_get(save_seq))  # a fresh array owned by the caller
                context.seq_rm(save_seq)
            state = runs[0] if len(runs) == 1 else np.concatenate(runs)
            out.append(EncodedModule(module, encode_pass.context_of(module), state, tuple(r.nbytes for r in runs)))
    finally:
        context.seq_rm(work_seq)
        context.seq_rm(save_seq)
    if stats is not None:
        stats.tokens += len(encode_pass.cells)
        stats.seconds += time.perf_counter() - started
    return out


class ModuleEncoder:
    """Keys a schema's module states and encodes the missing ones into the store.

    Encoding starts from a cleared KV cache, as everywhere: the active session is parked first (its cells come back
    with its next request) and resident runs are dropped (cells placed around them would give slightly other states
    under the same key). Processes sharing a store take turns (its inter-process lock), and the second finds the
    states the first wrote instead of writing them again; machines sharing a remote tier take a lease per module
    (``store/fleet.py``), so each module is encoded once per fleet.
    """

    def __init__(self, runtime: Runtime, store: ModuleStore, mode: ContextMode, sessions: SessionTable,
                 residents: ResidentModules, *, work_seq: int, save_seq: int) -> None:
        self._runtime = runtime
        self._store = store
        self._mode = mode
        self._sessions = sessions
        self._residents = residents
        self._work_seq, self._save_seq = work_seq, save_seq
        self._model_fp = runtime.model.fingerprint
        self._state_fp = runtime.settings.state_fingerprint(runtime.model.placement)
        self.stats = EncodeStats()

    @property
    def expect(self) -> dict[str, str]:
        """Header fields a stored state must carry to be loaded here: the model and engine fingerprints."""
        return {"model": self._model_fp, "state": self._state_fp}

    @property
    def seed(self) -> str:
        """What every key of this cache starts from: namespace, model and engine fingerprints."""
        return f"{self._store.namespace}\0{self._model_fp}\0{self._state_fp}"

    def key(self, context: tuple[Cell, ...], cells: tuple[Cell, ...], start: int) -> EntryKey:
        content = content_key(namespace=self._store.namespace, model_fingerprint=self._model_fp,
                              state_fingerprint=self._state_fp, mode=self._mode, context=context, cells=cells,
                              start=start)
        return EntryKey(content, start)

    def find(self, record: SchemaRecord, path: str) -> Hit | None:
        """The module's stored state: at its key, or the same content stored at another start (shifted)."""
        module = record.modules[path]
        return self._store.find(module.key, self.expect, runs=len(module.ranges))

    def stored(self, record: SchemaRecord, path: str) -> bool:
        """Whether the module's state is stored, at its start or another (a cheap check: nothing is read)."""
        key = record.modules[path].key
        return self._store.contains(key) or bool(self._store.starts_of(key.content))

    def encode_missing(self, record: SchemaRecord, paths: list[str], progress: ProgressCallback | None, *,
                       force: bool = False) -> int:
        """Run the passes that encode ``paths`` (those not stored, unless ``force``); the number of passes."""
        if not force and all(self.stored(record, p) for p in paths):
            return 0
        with self._store.exclusive():
            # another process may have encoded them while this one waited for the lock
            missing = list(paths) if force else [p for p in paths if not self.stored(record, p)]
            by_key: dict[EntryKey, list[str]] = {}
            by_pass: dict[int, list[EntryKey]] = {}
            for path in missing:
                module = record.modules[path]
                by_key.setdefault(module.key, []).append(path)
                by_pass.setdefault(module.pass_index, []).append(module.key)
            passes = 0
            # with a remote tier, in turns: the modules this process holds the lease of; others are waited for
            groups = [by_pass[i] for i in sorted(by_pass)]
            with contextlib.closing(self._store.encode_turns(groups, self._readable)) as turns:
                for turn in turns:
                    passes += self._encode(record, [p for key in turn for p in by_key[key]], progress)
        return passes

    def _readable(self, key: EntryKey) -> bool:
        return self._store.lookup(key, self.expect) is not None

    def _encode(self, record: SchemaRecord, paths: list[str], progress: ProgressCallback | None) -> int:
        """Run the passes that encode ``paths`` and save their modules; the number of passes."""
        indices = sorted({record.modules[p].pass_index for p in paths})
        if not indices:
            return 0
        self._sessions.park_active()
        self._residents.clear()
        total = sum(len(record.passes[i].cells) for i in indices)
        done = 0
        for i in indices:
            encoded = encode_pass(self._runtime.context, record.passes[i], work_seq=self._work_seq,
                                  save_seq=self._save_seq, stats=self.stats, progress=progress, done_before=done,
                                  total=total)
            done += len(record.passes[i].cells)
            for module in encoded:
                meta = EntryMeta(schema=record.name, module=module.cells.path, mode=self._mode,
                                 ranges=module.cells.ranges, run_bytes=module.run_bytes, model=self._model_fp,
                                 state=self._state_fp, model_file=self._runtime.model.path.name,
                                 created=time.time())
                self._store.save(StoredModule(record.modules[module.cells.path].key, module.state, meta))
        logger.info("encoded %d module(s) of %r in %d pass(es): %d tokens at %.0f tokens/s", len(paths),
                    record.name, len(indices), total, self.stats.tokens_per_second)
        return len(indices)
