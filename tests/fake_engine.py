"""A pure-Python fake of the llama.cpp engine (``FakeModel``, ``FakeContext``) for fast tests of the service layer.

It implements the ``Model`` and ``Context`` Protocols of ``pccpu.engine.protocols`` with ``LlamaContext``'s rules
and errors, on a simulated *unified* KV cache of ``n_ctx`` cells. Each cell holds a position, a set of seq ids and a
64-bit "kv" value: a hash of (token, position, digest of the (position, kv) pairs the token attends to), so a cell's
value depends on everything before it in its sequence, exactly as K and V do. Logits are drawn from a token's kv.
Hence a module encoded at the same positions (in any sequence, restored or copied) gives bit-identical logits to a
full prefill, and a shifted module (``seq_add``: its kv is re-hashed, as llama.cpp re-rotates K) gives others.

Not modelled: which cells hold a sequence never changes a value (llama.cpp without flash attention differs slightly);
free cells are always searched from cell 0 (llama.cpp keeps a moving ``head``); apply_pending_shift decodes nothing
(it still needs a free cell); no sliding window, no GPU, no threads or locks, no n_ubatch, no KV types or sizes; the
tokenizer is byte-level. Like llama.cpp, shifts are summed per cell and applied by the next decode (K re-rotated).
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pccpu.engine.model import ModelInfo
from pccpu.engine.protocols import LogitsMode
from pccpu.errors import (
    ContextOverflowError,
    DecodeInterrupted,
    InvalidArgumentError,
    NoKvSlotError,
    StateError,
    WindowLostError,
)

PAD, BOS, EOS, IM_START, IM_END = 0, 1, 2, 259, 260
BYTE_OFFSET = 3
SPECIAL_PIECES = {PAD: b"<pad>", BOS: b"<s>", EOS: b"</s>", IM_START: b"<|im_start|>", IM_END: b"<|im_end|>"}
_SPECIAL_TEXT = re.compile(r"(<\|im_start\|>|<\|im_end\|>)")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
__all__ = ["CHATML_TEMPLATE", "FakeContext", "FakeModel"]

STATE_MAGIC = b"FAKESEQ1"
_HEADER = struct.Struct("<8sQI")  # magic, model seed, cell count
_CELL = np.dtype([("pos", "<i4"), ("kv", "<u8")])  # packed: 12 bytes per cell


def _hash64(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class FakeModel:
    """Byte-level tokenizer (id = byte + 3), ChatML special tokens 259/260, a made-up shape and a seeded identity."""

    def __init__(self, n_vocab: int = 261, *, seed: int = 0, path: str | Path = "fake.gguf") -> None:
        if n_vocab < IM_END + 1:
            raise InvalidArgumentError(f"a FakeModel needs n_vocab >= {IM_END + 1}, got {n_vocab}")
        if not 0 <= seed < 1 << 64:
            raise InvalidArgumentError(f"seed must fit in 64 bits, got {seed}")
        self.seed = seed
        self.path = Path(path)
        self.info = ModelInfo(architecture="fake", n_ctx_train=8192, n_layer=2, n_head=4, n_head_kv=2, n_embd=32,
                              head_dim_k=8, head_dim_v=8, n_vocab=n_vocab, n_swa=0, size_bytes=0, n_params=0)
        self.bos_token, self.eos_token, self.add_bos = BOS, EOS, False
        self._fingerprint = hashlib.sha256(f"pccpu-fake-model|{seed}|{n_vocab}".encode()).hexdigest()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def placement(self) -> str:
        return "cpu"

    @property
    def chat_template(self) -> str | None:
        return CHATML_TEMPLATE

    def tokenize(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        tokens = [BOS] if add_bos else []
        for part in _SPECIAL_TEXT.split(text) if parse_special else [text]:
            if parse_special and part in ("<|im_start|>", "<|im_end|>"):
                tokens.append(IM_START if part == "<|im_start|>" else IM_END)
            else:
                tokens.extend(b + BYTE_OFFSET for b in part.encode("utf-8"))
        return tokens

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        if not 0 <= token < self.info.n_vocab:
            raise InvalidArgumentError(f"token id {token} is outside this model's vocabulary "
                                       f"(0..{self.info.n_vocab - 1})")
        if BYTE_OFFSET <= token < BYTE_OFFSET + 256:
            return bytes([token - BYTE_OFFSET])
        return SPECIAL_PIECES.get(token, b"") if special else b""

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.token_to_piece(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return token in (EOS, IM_END)

    def close(self) -> None:
        pass


class FakeContext:
    """A unified KV cache of ``n_ctx`` cells with ``LlamaContext``'s rules, errors and return values.

    Counters for tests: ``decoded_tokens`` (tokens placed by successful decodes), ``decode_calls`` (calls to
    ``decode`` that passed validation) and ``restored_cells`` (cells placed by ``state_seq_set``).
    """

    def __init__(self, model: FakeModel, n_ctx: int = 256, n_batch: int = 64, n_seq_max: int = 4) -> None:
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_seq_max", n_seq_max)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.n_ctx, self.n_batch, self.n_seq_max = n_ctx, n_batch, n_seq_max
        self._pos = [-1] * n_ctx
        self._kv = [0] * n_ctx
        self._shift = [0] * n_ctx  # pending position shift per cell, applied (kv re-hashed) by the next decode
        self._seqs: list[set[int]] = [set() for _ in range(n_ctx)]
        self._shift_pending = False
        self._closed = False
        self.decoded_tokens = self.decode_calls = self.restored_cells = self.step_calls = 0
        self.seconds_per_token = 0.0  # decodes take this long per token (type-ahead tests), interruptible
        # sliding-window tests: a window size and, per sequence, the highest position whose window cell was "reused"
        # (set by the test; LlamaContext detects it); cleared with the sequence
        self.n_swa = 0
        self.window_floor: dict[int, int] = {}
        self._interrupted = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> FakeContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation (LlamaContext's checks and messages) -------------------------------------------------
    def _check_seq(self, seq_id: int) -> None:
        if self._closed:
            raise InvalidArgumentError("this context was closed; create a new one")
        if not isinstance(seq_id, int) or not 0 <= seq_id < self.n_seq_max:
            raise InvalidArgumentError(f"seq_id {seq_id!r} is out of range: this context has "
                                       f"n_seq_max={self.n_seq_max} (valid ids 0..{self.n_seq_max - 1})")

    def _cells(self, seq_id: int, p0: int = -1, p1: int = -1) -> list[int]:
        """Indices of the cells of seq_id (-1: any held cell) with positions in [p0, p1) (-1: open end)."""
        lo, hi = (p0 if p0 >= 0 else 0), (p1 if p1 >= 0 else 1 << 62)
        return [i for i, seqs in enumerate(self._seqs)
                if seqs and (seq_id == -1 or seq_id in seqs) and lo <= self._pos[i] < hi]

    def _free_cells(self) -> list[int]:
        return [i for i, seqs in enumerate(self._seqs) if not seqs]

    def _place(self, cell: int, pos: int, kv: int, seq_id: int) -> None:
        self._pos[cell], self._kv[cell], self._shift[cell], self._seqs[cell] = pos, kv, 0, {seq_id}

    def _apply_shifts(self) -> None:
        """What llama.cpp's K-shift does at the start of a decode: re-rotate every moved cell once, by its sum."""
        for i, shift in enumerate(self._shift):
            if shift:
                self._kv[i], self._shift[i] = _hash64(self._kv[i], "shift", shift), 0

    # -- decoding ----------------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], *, seq_id: int, start: int,
               logits: LogitsMode = "last") -> np.ndarray | None:
        n = len(tokens)
        if n == 0:
            raise InvalidArgumentError("decode needs at least one token")
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self.model.info.n_vocab]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary "
                                       f"(0..{self.model.info.n_vocab - 1})")
        self._check_seq(seq_id)
        if not isinstance(start, int) or not 0 <= start <= self.n_ctx - 1:
            raise ContextOverflowError(f"start={start!r} is outside the context's positions 0..{self.n_ctx - 1}")
        if start + n > self.n_ctx:
            raise ContextOverflowError(f"{n} tokens from position {start} need positions up to {start + n - 1}, "
                                       f"but the context has n_ctx={self.n_ctx}")
        last = self.seq_pos_max(seq_id)
        if last >= 0 and start != last + 1:
            raise InvalidArgumentError(f"sequence {seq_id} ends at position {last}, so new tokens must start at "
                                       f"{last + 1}, not {start} (llama.cpp extends a sequence only at pos_max + 1)")
        if last >= 0 and not self.window_intact(seq_id, start):
            raise WindowLostError(f"sequence {seq_id} no longer holds the sliding-window cells a token at {start} "
                                  "needs (llama.cpp reused them)")
        self._wait(n)
        self.decode_calls += 1
        self._apply_shifts()  # llama.cpp does it before looking for cells, so also when none is found
        # what the first token attends to, ordered by position (cell order never matters); each token adds itself
        visible = sorted((self._pos[i], self._kv[i]) for i in self._cells(seq_id) if self._pos[i] < start)
        running = hashlib.blake2b(digest_size=16)
        for pos, kv in visible:
            running.update(struct.pack("<iQ", pos, kv))
        kvs: list[int] = []
        try:
            for offset in range(0, n, self.n_batch):
                chunk = ids[offset : offset + self.n_batch]
                free = self._free_cells()[: len(chunk)]
                if len(free) < len(chunk):
                    raise NoKvSlotError(f"no free KV cell for {len(chunk)} tokens: the context's {self.n_ctx} "
                                        "cells are in use")
                for cell, token in zip(free, chunk, strict=True):
                    pos = start + len(kvs)
                    kv = _hash64(self.model.seed, token, pos, running.copy().digest())
                    running.update(struct.pack("<iQ", pos, kv))
                    self._place(cell, pos, kv, seq_id)
                    kvs.append(kv)
                self._shift_pending = False
                self.decoded_tokens += len(chunk)
        except NoKvSlotError:
            self.seq_rm(seq_id, start, -1)
            raise
        if logits == "all":
            return np.stack([self._logits(kv) for kv in kvs])
        return self._logits(kvs[-1]) if logits == "last" else None

    def decode_step(self, steps: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """LlamaContext.decode_step's checks; each step decoded as ``decode`` would (the fake's logits never depend
        on batching). Counts one ``step_calls``."""
        if not 1 <= len(steps) <= self.n_batch:
            raise InvalidArgumentError(f"decode_step takes 1..{self.n_batch} steps (n_batch), got {len(steps)}")
        if len({seq for _, seq, _ in steps}) != len(steps):
            raise InvalidArgumentError("decode_step takes one token per sequence")
        for _, seq_id, pos in steps:
            self._check_seq(seq_id)
            last = self.seq_pos_max(seq_id)
            if last >= 0 and pos != last + 1:
                raise InvalidArgumentError(f"sequence {seq_id} ends at position {last}, so its next token goes at "
                                           f"{last + 1}, not {pos}")
        self.step_calls += 1
        rows = []
        try:
            for token, seq_id, pos in steps:
                rows.append(self.decode([token], seq_id=seq_id, start=pos))
        except Exception:
            for _, seq_id, pos in steps[: len(rows)]:
                self.seq_rm(seq_id, pos, -1)
            raise
        return np.stack(rows)

    def _wait(self, n: int) -> None:
        """Take ``seconds_per_token`` per token, like a real decode; ``interrupt()`` stops it (nothing placed)."""
        if self._interrupted.wait(self.seconds_per_token * n) if self.seconds_per_token else self._interrupted.is_set():
            self._interrupted.clear()
            raise DecodeInterrupted("llama_decode was interrupted (interrupt() was called)")

    @property
    def can_interrupt(self) -> bool:
        return True

    def interrupt(self) -> None:
        self._interrupted.set()

    def clear_interrupt(self) -> None:
        self._interrupted.clear()

    def _logits(self, kv: int) -> np.ndarray:
        return np.random.default_rng(kv).standard_normal(self.model.info.n_vocab).astype(np.float32)

    # -- sequence (KV memory) operations -----------------------------------------------------------------
    def apply_pending_shift(self) -> None:
        """Like LlamaContext: the shift is applied by a one-token decode, which needs one free cell."""
        if not self._shift_pending:
            return
        self._apply_shifts()
        if not self._free_cells():
            raise NoKvSlotError(f"no free KV cell for 1 tokens: the context's {self.n_ctx} cells are in use")
        self._shift_pending = False

    def swa_kv_share(self) -> float:
        return 0.0

    def window_intact(self, seq_id: int, pos: int) -> bool:
        return self.window_floor.get(seq_id, -1) < max(pos - self.n_swa + 1, 0) if self.n_swa else True

    def seq_pos_min(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return min((self._pos[i] for i in self._cells(seq_id)), default=-1)

    def seq_pos_max(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return max((self._pos[i] for i in self._cells(seq_id)), default=-1)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        if seq_id != -1:
            self._check_seq(seq_id)
        for i in self._cells(seq_id, p0, p1):
            if seq_id == -1:
                self._seqs[i].clear()
            else:
                self._seqs[i].discard(seq_id)
        if seq_id == -1 or self.seq_pos_max(seq_id) < 0:
            self.window_floor.clear() if seq_id == -1 else self.window_floor.pop(seq_id, None)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._check_seq(src)
        self._check_seq(dst)
        if src == dst:
            raise InvalidArgumentError("seq_cp needs two different sequences")
        for i in self._cells(src, p0, p1):
            self._seqs[i].add(dst)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions of the seq's cells in [p0, p1) by delta, for every seq holding them; lazy, like K."""
        self._check_seq(seq_id)
        if delta == 0:
            return
        lo, hi = self.seq_pos_min(seq_id), self.seq_pos_max(seq_id)
        if lo < 0:
            return
        first, last = max(lo, p0 if p0 >= 0 else lo), min(hi, p1 - 1 if p1 >= 0 else hi)
        if first <= last and (first + delta < 0 or last + delta >= self.n_ctx):
            raise ContextOverflowError(f"shifting positions {first}..{last} by {delta} leaves the context's "
                                       f"positions 0..{self.n_ctx - 1}")
        for i in self._cells(seq_id, p0, p1):
            self._pos[i] += delta
            self._shift[i] += delta
        self._shift_pending = True

    def clear(self, keep: Sequence[int] = ()) -> None:
        """Remove every sequence but those in keep (kept cells stay where they are). No keep: everything."""
        self.window_floor = {s: f for s, f in self.window_floor.items() if s in keep}
        if not keep:
            for seqs in self._seqs:
                seqs.clear()
            self._shift = [0] * self.n_ctx
            self._shift_pending = False
            return
        for seq_id in keep:
            self._check_seq(seq_id)
        for seqs in self._seqs:
            seqs.intersection_update(keep)

    # -- sequence state ----------------------------------------------------------------------------------
    def state_seq_get(self, seq_id: int, into: np.ndarray | None = None) -> np.ndarray:
        """The seq's cells (position, kv) in cell order, after a header (magic, model seed, count)."""
        self._check_seq(seq_id)
        if self._shift_pending:
            raise StateError("a position shift is pending (it is applied by the next decode); decode before saving")
        if self.n_swa and self.window_floor.get(seq_id, -1) >= 0:
            raise WindowLostError(f"sequence {seq_id} lost sliding-window cells: it cannot be saved whole")
        cells = self._cells(seq_id)
        records = np.array([(self._pos[i], self._kv[i]) for i in cells], dtype=_CELL)
        blob = _HEADER.pack(STATE_MAGIC, self.model.seed, len(cells)) + records.tobytes()
        size = len(blob)
        buffer = into if into is not None and into.nbytes >= size else np.empty(size, dtype=np.uint8)
        if buffer.dtype != np.uint8 or not buffer.flags.c_contiguous:
            raise InvalidArgumentError("state buffers must be C-contiguous uint8 arrays")
        buffer[:size] = np.frombuffer(blob, dtype=np.uint8)
        return buffer[:size]

    def state_seq_set(self, seq_id: int, data: np.ndarray | bytes | memoryview) -> None:
        """Erase seq_id, then place the saved cells into the first run of free cells long enough (or StateError)."""
        array = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        if array.dtype != np.uint8 or not array.flags.c_contiguous:
            raise InvalidArgumentError("state data must be a C-contiguous uint8 array or bytes")
        if array.size == 0:
            raise StateError("empty state data")
        self._check_seq(seq_id)
        self.seq_rm(seq_id)  # like llama.cpp: the destination is erased, also when the restore then fails
        raw = array.tobytes()
        if len(raw) < _HEADER.size:
            raise StateError(f"a {len(raw)}-byte state is too short to be one")
        magic, seed, count = _HEADER.unpack_from(raw)
        if magic != STATE_MAGIC or seed != self.model.seed:
            raise StateError(f"this state was not saved by this model (magic {magic!r}, seed {seed})")
        if len(raw) < _HEADER.size + count * _CELL.itemsize:
            raise StateError(f"a truncated state: {count} cells need {_HEADER.size + count * _CELL.itemsize} bytes")
        records = np.frombuffer(raw, dtype=_CELL, count=count, offset=_HEADER.size)
        if count and (int(records["pos"].min()) < 0 or int(records["pos"].max()) >= self.n_ctx):
            raise StateError(f"the state holds positions outside this context's 0..{self.n_ctx - 1}")
        first = self._first_free_run(count)
        if first is None:
            raise StateError(f"the context has no run of {count} free cells for this state")
        for offset, (pos, kv) in enumerate(records.tolist()):
            self._place(first + offset, pos, kv, seq_id)
        self.restored_cells += count

    def _first_free_run(self, count: int) -> int | None:
        if count == 0:
            return 0
        run = 0
        for i, seqs in enumerate(self._seqs):
            run = 0 if seqs else run + 1
            if run == count:
                return i - count + 1
        return None

    # -- for tests ---------------------------------------------------------------------------------------
    def used_cells(self) -> int:
        return sum(1 for seqs in self._seqs if seqs)

    def cells_of(self, seq_id: int) -> list[int]:
        """Indices of the cells holding seq_id, in cell order."""
        return self._cells(seq_id)
