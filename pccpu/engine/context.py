"""A llama.cpp context: decode at explicit positions into chosen sequences, sequence (KV) operations and
sequence state save/restore. The only place besides ``model.py`` that calls llama.cpp's C functions.

Every argument that would make llama.cpp abort the process (more tokens than n_batch in one decode,
positions past n_ctx, a seq id out of range, a token outside the vocabulary) is refused here, in Python,
with a typed error from ``pccpu.errors``, before any C call.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from pccpu.engine import swa
from pccpu.engine._lib import lib, llama_build_info
from pccpu.engine.model import LlamaModel, ModelInfo
from pccpu.engine.threads import available_cores
from pccpu.errors import (
    ContextOverflowError,
    DecodeError,
    DecodeInterrupted,
    EngineError,
    InvalidArgumentError,
    NoKvSlotError,
    StateError,
    WindowLostError,
)

logger = logging.getLogger(__name__)

KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                 "q5_0": 22 / 32, "q5_1": 24 / 32}
MAX_SEQ = 256  # LLAMA_MAX_SEQ in llama-cparams.h
_SWA_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_SWA_ONLY (llama.h): a sequence state of the sliding-window layers alone


def _c_strlen() -> int | None:
    """The address of the C library's ``strlen``, or None where it cannot be found."""
    try:
        libc = ctypes.CDLL(None) if sys.platform != "win32" else ctypes.cdll.msvcrt
        return ctypes.cast(libc.strlen, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


# Interrupting a decode from another thread: llama.cpp's CPU backend asks the context's abort callback between graph
# nodes and makes llama_decode return 2 when it says true. The callback is the C library's strlen on a two-byte flag
# buffer ("" = go on, "\x01" = stop): a C function of the same shape (one pointer in, a value whose low byte is the
# answer), so the compute threads never need Python's GIL (a Python callback would take it hundreds of times per
# decode and wait behind whatever thread holds it).
_STRLEN = _c_strlen()


@dataclass(frozen=True)
class ContextSettings:
    """Explicit settings of one context. Nothing is left to llama.cpp's defaults.

    >>> ContextSettings(n_ctx=4096, n_seq_max=4).n_batch
    512
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 4
    n_threads: int = field(default_factory=available_cores)
    n_threads_batch: int = field(default_factory=available_cores)
    # Off by default on CPU: with it on, llama.cpp's results depend on how a prompt is split into batches
    # (max logit differences ~0.5 on SmolLM2), so a cached answer could not equal a full prefill's.
    flash_attn: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    kv_unified: bool = True
    swa_full: bool = True
    # With layers on a GPU: keep the KV cache (and attention) there too. Without GPU layers it changes nothing.
    offload_kqv: bool = True

    def __post_init__(self) -> None:
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        if self.n_ubatch > self.n_batch:
            raise InvalidArgumentError(f"n_ubatch ({self.n_ubatch}) cannot exceed n_batch ({self.n_batch})")
        if self.n_seq_max > MAX_SEQ - 1:  # pccpu keeps one sequence for itself
            raise InvalidArgumentError(f"n_seq_max is at most {MAX_SEQ - 1} here, got {self.n_seq_max}")
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                raise InvalidArgumentError(f"{name} must be one of {sorted(KV_TYPES)}, got {getattr(self, name)!r}")
        if self.type_v not in ("f16", "f32", "bf16") and not self.flash_attn:
            raise InvalidArgumentError(f"a quantized V cache (type_v={self.type_v}) needs flash_attn=True")

    def state_fingerprint(self, placement: str = "cpu") -> str:
        """Hash of everything that changes the bytes of a saved sequence state (for cache keys).

        ``placement`` names where the model runs (see ``LlamaModel.placement``): a state computed on a GPU has
        (slightly) other values than one computed on the CPU, so the two are kept apart.
        """
        material = {
            "placement": placement,
            # with GPU layers, attention runs where the KV cache is: on the GPU or, with offload_kqv off, the CPU
            "kv_on_host": None if placement == "cpu" else not self.offload_kqv,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": self.flash_attn,  # changes V's layout in the cache
            "kv_unified": self.kv_unified,
            "swa_full": self.swa_full,
            "llama": llama_build_info(),
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def kv_bytes_per_token(self, info: ModelInfo) -> float:
        return info.n_layer * info.n_head_kv * (
            info.head_dim_k * KV_TYPE_BYTES[self.type_k] + info.head_dim_v * KV_TYPE_BYTES[self.type_v]
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


LogitsMode = Literal["last", "all", "none"]


class LlamaContext:
    """One ``llama_context`` with its KV memory and one reusable batch. Thread-safe: calls are serialized.

    Positions: a sequence that already holds cells can only be extended at ``pos_max + 1`` (llama.cpp's batch
    rule); an empty sequence may start anywhere. Cells copied in with ``seq_cp`` keep their positions, so a
    sequence may have gaps between copied modules.

    Sliding-window models (``n_swa > 0``): states are saved whole, in parts (``swa.py``), and every sequence has a
    *window floor*, the highest position whose SWA cell llama.cpp may have reused (-1: none). A decode at ``start``
    needs the cells from ``start - n_swa + 1``: ``window_intact`` says whether they are there, and ``decode`` refuses
    with ``WindowLostError`` when they are not.
    """

    def __init__(self, model: LlamaModel, settings: ContextSettings | None = None) -> None:
        self.model = model
        self.settings = settings or ContextSettings()
        s = self.settings
        if s.n_ctx > model.info.n_ctx_train:
            logger.warning("n_ctx %d exceeds the model's training context %d", s.n_ctx, model.info.n_ctx_train)
        llama_cpp = lib()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = s.n_ctx
        params.n_batch = s.n_batch
        params.n_ubatch = s.n_ubatch
        params.n_seq_max = s.n_seq_max + 1  # one more, kept internal, for apply_pending_shift()
        params.n_threads = s.n_threads
        params.n_threads_batch = s.n_threads_batch
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = KV_TYPES[s.type_k]
        params.type_v = KV_TYPES[s.type_v]
        params.kv_unified = s.kv_unified
        params.swa_full = s.swa_full
        params.offload_kqv = s.offload_kqv
        params.no_perf = True
        self._abort_flag = ctypes.create_string_buffer(2)  # see _STRLEN
        if _STRLEN is not None:
            params.abort_callback = llama_cpp.ggml_abort_callback(_STRLEN)
            params.abort_callback_data = ctypes.cast(self._abort_flag, ctypes.c_void_p)
        handle = llama_cpp.llama_init_from_model(model.handle, params)
        if not handle:
            raise EngineError(
                f"llama.cpp could not create a context with {s.as_dict()} (out of memory, or settings this model "
                "does not support; run with --verbose for llama.cpp's reason)"
            )
        self._handle = handle
        model._context_opened()
        self._memory = llama_cpp.llama_get_memory(handle)
        self.n_ctx = llama_cpp.llama_n_ctx(handle)
        self.n_batch = llama_cpp.llama_n_batch(handle)
        self.n_seq_max = llama_cpp.llama_n_seq_max(handle) - 1
        self._internal_seq = self.n_seq_max
        self._n_vocab = model.info.n_vocab
        self.n_swa = model.info.n_swa
        self._floor: dict[int, int] = {}  # seq -> window floor (sliding-window models only; absent: -1)
        self._lock = threading.RLock()
        self._shift_pending = False
        # One batch for the life of the context; numpy views write into its C arrays without Python loops.
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        self._wants_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        self._n_seq_id[:] = 1
        self._batch_seq: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            llama_cpp = lib()
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._handle)
            self._handle = None
            self.model._context_closed()

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise InvalidArgumentError("this context was closed; create a new one")
        return self._handle

    # -- validation ------------------------------------------------------------------------------------
    def _check_seq(self, seq_id: int) -> None:
        if not isinstance(seq_id, int) or not 0 <= seq_id < self.n_seq_max:
            raise InvalidArgumentError(
                f"seq_id {seq_id!r} is out of range: this context has n_seq_max={self.n_seq_max} "
                f"(valid ids 0..{self.n_seq_max - 1}); create it with a larger n_seq_max"
            )

    def _check_position(self, name: str, pos: int, *, allow_end: bool = False) -> None:
        limit = self.n_ctx if allow_end else self.n_ctx - 1
        if not isinstance(pos, int) or not 0 <= pos <= limit:
            raise ContextOverflowError(
                f"{name}={pos!r} is outside the context's positions 0..{limit} (n_ctx={self.n_ctx})"
            )

    # -- decoding --------------------------------------------------------------------------------------
    def decode(
        self, tokens: Sequence[int], *, seq_id: int, start: int, logits: LogitsMode = "last"
    ) -> np.ndarray | None:
        """Decode ``tokens`` at positions ``start, start+1, ...`` into sequence ``seq_id``.

        Splits into chunks of at most n_batch tokens. Returns the logits of the last token (``"last"``, shape
        ``(n_vocab,)``), of every token (``"all"``, shape ``(len(tokens), n_vocab)``) or None. On failure the
        tokens of this call are removed again, so the sequence is as it was.
        """
        n = len(tokens)
        if n == 0:
            raise InvalidArgumentError("decode needs at least one token")
        token_array = np.asarray(tokens, dtype=np.int32)
        if token_array.ndim != 1:
            raise InvalidArgumentError("tokens must be a flat sequence of token ids")
        bad = (token_array < 0) | (token_array >= self._n_vocab)
        if bad.any():
            raise InvalidArgumentError(
                f"token id {int(token_array[bad][0])} is outside the vocabulary (0..{self._n_vocab - 1})"
            )
        with self._lock:
            self._check_seq(seq_id)
            self._check_position("start", start)
            if start + n > self.n_ctx:
                raise ContextOverflowError(
                    f"{n} tokens from position {start} need positions up to {start + n - 1}, but the context has "
                    f"n_ctx={self.n_ctx}: shorten the prompt or create the context with a larger n_ctx"
                )
            last = self.seq_pos_max(seq_id)
            if last >= 0 and start != last + 1:
                raise InvalidArgumentError(
                    f"sequence {seq_id} ends at position {last}, so new tokens must start at {last + 1}, not {start} "
                    "(llama.cpp extends a sequence only at pos_max + 1)"
                )
            if last >= 0 and not self.window_intact(seq_id, start):
                raise self._window_lost(seq_id, f"a token at {start} attends to positions from "
                                        f"{max(start - self.n_swa + 1, 0)}: remove the sequence and restore or "
                                        "decode it again")
            lows = self._pos_mins()
            out = np.empty((n, self._n_vocab), dtype=np.float32) if logits == "all" else None
            result: np.ndarray | None = None
            try:
                for offset in range(0, n, self.n_batch):
                    chunk = token_array[offset : offset + self.n_batch]
                    is_last_chunk = offset + len(chunk) == n
                    self._fill_batch(chunk, seq_id, start + offset, logits, is_last_chunk)
                    self._decode_batch()
                    if out is not None:
                        for i in range(len(chunk)):
                            out[offset + i] = self._logits_ith(i)
                    elif logits == "last" and is_last_chunk:
                        result = self._logits_ith(len(chunk) - 1).copy()
            except EngineError:
                lib().llama_memory_seq_rm(self._memory, seq_id, start, -1)
                raise
            finally:
                self._note_purges(lows)
            return out if logits == "all" else result

    def decode_step(self, steps: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """One token for each of several sequences in one ``llama_decode`` (batched generation): ``steps`` holds
        ``(token, seq_id, position)``, one per sequence, each at that sequence's ``pos_max + 1``. Returns the logits
        after each, shape ``(len(steps), n_vocab)``, in the order given. On failure no step's token is kept.

        The tokens attend only to their own sequence's cells, but llama.cpp's results depend slightly on batch size
        and on where cells lie: a sequence decoded beside others does not reproduce its solo logits bit for bit."""
        n = len(steps)
        if not 1 <= n <= self.n_batch:
            raise InvalidArgumentError(f"decode_step takes 1..{self.n_batch} steps (n_batch), got {n}")
        tokens = np.asarray([s[0] for s in steps], dtype=np.int32)
        bad = (tokens < 0) | (tokens >= self._n_vocab)
        if bad.any():
            raise InvalidArgumentError(
                f"token id {int(tokens[bad][0])} is outside the vocabulary (0..{self._n_vocab - 1})"
            )
        seqs = [s[1] for s in steps]
        if len(set(seqs)) != n:
            raise InvalidArgumentError(f"decode_step takes one token per sequence, got sequences {seqs}")
        with self._lock:
            for _, seq_id, pos in steps:
                self._check_seq(seq_id)
                self._check_position("position", pos)
                last = self.seq_pos_max(seq_id)
                if last >= 0 and pos != last + 1:
                    raise InvalidArgumentError(
                        f"sequence {seq_id} ends at position {last}, so its next token goes at {last + 1}, not {pos}"
                    )
                if last >= 0 and not self.window_intact(seq_id, pos):
                    raise self._window_lost(seq_id, f"a token at {pos} attends to positions from "
                                            f"{max(pos - self.n_swa + 1, 0)}")
            lows = self._pos_mins()
            self._batch.n_tokens = n
            self._tokens[:n] = tokens
            self._pos[:n] = [s[2] for s in steps]
            self._wants_logits[:n] = 1
            for i, seq_id in enumerate(seqs):
                self._batch.seq_id[i][0] = seq_id
            self._batch_seq = None  # the per-token sequence ids no longer all hold one sequence
            try:
                self._decode_batch()
                return np.stack([self._logits_ith(i) for i in range(n)])
            except EngineError:
                for _, seq_id, pos in steps:
                    lib().llama_memory_seq_rm(self._memory, seq_id, pos, -1)
                raise
            finally:
                self._note_purges(lows)

    def _fill_batch(self, chunk: np.ndarray, seq_id: int, start: int, logits: LogitsMode, is_last: bool) -> None:
        m = len(chunk)
        self._batch.n_tokens = m
        self._tokens[:m] = chunk
        self._pos[:m] = np.arange(start, start + m, dtype=np.int32)
        self._wants_logits[:m] = 1 if logits == "all" else 0
        if logits == "last" and is_last:
            self._wants_logits[m - 1] = 1
        if self._batch_seq != seq_id:
            # seq_id is an array of per-token pointers (allocated by llama_batch_init): set each once per seq.
            for i in range(self.n_batch):
                self._batch.seq_id[i][0] = seq_id
            self._batch_seq = seq_id

    def _decode_batch(self) -> None:
        rc = lib().llama_decode(self.handle, self._batch)
        if rc == 0:
            self._shift_pending = False
            return
        if rc == 1:
            raise NoKvSlotError(
                f"no free KV cell for {self._batch.n_tokens} tokens: the context's {self.n_ctx} cells are in use; "
                "remove sequences (seq_rm) or create the context with a larger n_ctx"
            )
        if rc == 2:
            self._abort_flag[0] = b"\x00"
            raise DecodeInterrupted("llama_decode was interrupted (interrupt() was called)")
        raise DecodeError(f"llama_decode failed with code {rc} (run with --verbose for llama.cpp's reason)")

    def _logits_ith(self, i: int) -> np.ndarray:
        ptr = lib().llama_get_logits_ith(self.handle, i)
        if not ptr:
            raise DecodeError(f"llama.cpp has no logits for batch index {i}")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    @property
    def can_interrupt(self) -> bool:
        return _STRLEN is not None

    def interrupt(self) -> None:
        """Make the decode running now (in another thread), or else the next one, stop soon with
        :class:`DecodeInterrupted`; its tokens are removed again. Needs no lock: one byte is written. A caller that
        no longer wants the interruption calls ``clear_interrupt()`` (the flag stays set until a decode sees it)."""
        self._abort_flag[0] = b"\x01"

    def clear_interrupt(self) -> None:
        self._abort_flag[0] = b"\x00"

    # -- sliding-window bookkeeping (see the class docstring and swa.py) ----------------------------------
    def window_intact(self, seq_id: int, pos: int) -> bool:
        """Whether a token decoded at ``pos`` into ``seq_id`` would find every sliding-window cell it attends to
        (always true for models without SWA layers)."""
        return self._floor.get(seq_id, -1) < max(pos - self.n_swa + 1, 0) if self.n_swa else True

    def swa_kv_share(self) -> float:
        """The share of a cell's KV bytes that lives in sliding-window layers (0.0 without them), measured: two
        tokens decoded into the internal sequence, then the size of its state with and without the SWA-only flag,
        per cell. (llama.h says which layers slide only through the cache it builds.)"""
        if not self.n_swa:
            return 0.0
        with self._lock, self._internal_tokens(2):
            llama_cpp, seq = lib(), self._internal_seq
            size = llama_cpp.llama_state_seq_get_size_ext
            full2, swa2 = size(self.handle, seq, 0), size(self.handle, seq, _SWA_ONLY)
            llama_cpp.llama_memory_seq_rm(self._memory, seq, 1, -1)
            full1, swa1 = size(self.handle, seq, 0), size(self.handle, seq, _SWA_ONLY)
        return (swa2 - swa1) / (full2 - full1) if full2 > full1 else 0.0

    @contextlib.contextmanager
    def _internal_tokens(self, n: int) -> Iterator[None]:
        """``n`` throwaway tokens (BOS) decoded into the internal sequence for the body, removed after it. Their
        cells may be ones a sliding window no longer sees: purges are noted as for any decode."""
        token = max(self.model.bos_token, 0)
        self._fill_batch(np.full(n, token, dtype=np.int32), self._internal_seq, 0, "none", True)
        lows = self._pos_mins()
        try:
            self._decode_batch()
            yield
        finally:
            lib().llama_memory_seq_rm(self._memory, self._internal_seq, -1, -1)
            self._note_purges(lows)

    def _window_lost(self, seq_id: int, consequence: str) -> WindowLostError:
        return WindowLostError(f"sequence {seq_id} no longer holds the sliding-window cells of positions up to "
                               f"{self._floor.get(seq_id)} (llama.cpp reused them), {consequence}")

    def _pos_mins(self) -> list[int] | None:
        if not self.n_swa:
            return None
        pos_min = lib().llama_memory_seq_pos_min
        return [int(pos_min(self._memory, s)) for s in range(self.n_seq_max + 1)]

    def _note_purges(self, before: list[int] | None) -> None:
        """llama.cpp purges a sequence's oldest SWA cells when it reuses one of them (find_slot/apply_ubatch): the
        sequence's lowest position (taken from the SWA cache) rises. Remember how far, as the window floor."""
        if before is None:
            return
        pos_min = lib().llama_memory_seq_pos_min
        for seq_id, low in enumerate(before):
            now = int(pos_min(self._memory, seq_id))
            if low >= 0 and now > low:
                self._floor[seq_id] = max(self._floor.get(seq_id, -1), now - 1)
                logger.debug("sequence %d: llama.cpp reused its SWA cells up to position %d", seq_id, now - 1)

    def _forget_floor(self, seq_id: int) -> None:
        if seq_id == -1:
            self._floor.clear()
        else:
            self._floor.pop(seq_id, None)

    # -- sequence (KV memory) operations ---------------------------------------------------------------
    def apply_pending_shift(self) -> None:
        """Apply pending ``seq_add`` shifts now (llama.cpp applies them inside the next decode): decodes one token
        into an internal sequence and removes it again."""
        with self._lock:
            if not self._shift_pending:
                return
            with self._internal_tokens(1):
                pass

    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position held by the sequence, -1 when it is empty."""
        self._check_seq(seq_id)
        return int(lib().llama_memory_seq_pos_min(self._memory, seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position held by the sequence, -1 when it is empty."""
        self._check_seq(seq_id)
        return int(lib().llama_memory_seq_pos_max(self._memory, seq_id))

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        """Remove the sequence's cells with positions in [p0, p1) (-1: open end). seq_id -1 means every sequence."""
        with self._lock:
            if seq_id != -1:
                self._check_seq(seq_id)
            if not lib().llama_memory_seq_rm(self._memory, seq_id, p0, p1):
                raise EngineError(f"llama.cpp refused to remove positions [{p0}, {p1}) of sequence {seq_id}")
            if seq_id == -1 or self.seq_pos_max(seq_id) < 0:
                self._forget_floor(seq_id)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make dst share src's cells with positions in [p0, p1). Zero-copy with a unified KV cache."""
        with self._lock:
            self._check_seq(src)
            self._check_seq(dst)
            if src == dst:
                raise InvalidArgumentError("seq_cp needs two different sequences")
            lib().llama_memory_seq_cp(self._memory, src, dst, p0, p1)
            lost = self._floor.get(src, -1)
            if lost >= max(p0, 0):  # dst gets src's gap too, within the copied range
                lost = min(lost, p1 - 1) if p1 >= 0 else lost
                self._floor[dst] = max(self._floor.get(dst, -1), lost)

    def seq_keep(self, seq_id: int) -> None:
        with self._lock:
            self._check_seq(seq_id)
            lib().llama_memory_seq_keep(self._memory, seq_id)
            self._floor = {seq_id: self._floor[seq_id]} if seq_id in self._floor else {}

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions in [p0, p1) of a sequence by delta. K is re-rotated lazily, in the next decode.

        Position is per cell, shared by every sequence holding the cell: shift a module in a scratch sequence
        before copying it elsewhere.
        """
        with self._lock:
            self._check_seq(seq_id)
            if delta == 0:
                return
            llama_cpp = lib()
            if not llama_cpp.llama_memory_can_shift(self._memory):
                raise EngineError("this model's KV memory cannot shift positions")
            lo, hi = self.seq_pos_min(seq_id), self.seq_pos_max(seq_id)
            if lo < 0:
                return
            first = max(lo, p0 if p0 >= 0 else lo)
            last = min(hi, p1 - 1 if p1 >= 0 else hi)
            if first <= last and (first + delta < 0 or last + delta >= self.n_ctx):
                raise ContextOverflowError(
                    f"shifting positions {first}..{last} by {delta} leaves the context's positions 0..{self.n_ctx - 1}"
                )
            llama_cpp.llama_memory_seq_add(self._memory, seq_id, p0, p1, delta)
            self._shift_pending = True
            lost = self._floor.get(seq_id, -1)
            if lost >= 0 and first <= lost <= last:
                self._floor[seq_id] = lost + delta

    def clear(self, keep: Sequence[int] = ()) -> None:
        """Remove every cell of every sequence and start placing cells from the first one again; with ``keep``,
        remove every sequence but those (their cells stay where they are, and new cells fill the gaps).

        Without flash attention llama.cpp's results depend (slightly) on which cells hold a sequence, so code that
        wants reproducible logits starts from a cleared cache. The KV bytes are left as they are (no memset).
        """
        with self._lock:
            if not keep:
                lib().llama_memory_clear(self._memory, False)
                self._shift_pending = False
                self._floor.clear()
                return
            for seq_id in keep:
                self._check_seq(seq_id)
            kept = set(keep)
            for seq_id in range(self.n_seq_max + 1):  # the internal sequence too
                if seq_id not in kept:
                    lib().llama_memory_seq_rm(self._memory, seq_id, -1, -1)
                    self._forget_floor(seq_id)

    # -- sequence state --------------------------------------------------------------------------------
    def state_seq_size(self, seq_id: int) -> int:
        """Bytes of llama.cpp's own state of the sequence (for a sliding-window model, without the cells its next
        token cannot see: ``state_seq_get`` saves more, see swa.py)."""
        self._check_seq(seq_id)
        return int(lib().llama_state_seq_get_size_ext(self.handle, seq_id, 0))

    def state_seq_get(self, seq_id: int, into: np.ndarray | None = None) -> np.ndarray:
        """Save the sequence's cells (positions, K, V) into a uint8 array; ``into`` is reused when large enough.

        The blob holds no token ids and no logits, and K is stored rotated for the cells' positions. For a
        sliding-window model it is swa.py's container of parts, every cell included.
        """
        if into is not None and (into.dtype != np.uint8 or not into.flags.c_contiguous):
            raise InvalidArgumentError("state buffers must be C-contiguous uint8 arrays")
        with self._lock:
            self._check_seq(seq_id)
            if self._shift_pending:
                raise StateError("a position shift is pending (it is applied by the next decode); decode before saving")
            if not self.n_swa:
                return self._state_get(seq_id, into)
            if self._floor.get(seq_id, -1) >= 0:
                raise self._window_lost(seq_id, "so its state cannot be saved whole")
            parts = []
            scratch = self._internal_seq
            for p0, p1 in swa.part_ranges(self.seq_pos_min(seq_id), self.seq_pos_max(seq_id), self.n_swa):
                lib().llama_memory_seq_cp(self._memory, seq_id, scratch, p0, p1)
                try:
                    if lib().llama_memory_seq_pos_max(self._memory, scratch) >= 0:  # a gap leaves a range empty
                        parts.append(self._state_get(scratch, None))
                finally:
                    lib().llama_memory_seq_rm(self._memory, scratch, -1, -1)
            if not parts:
                parts.append(self._state_get(seq_id, None))  # an empty sequence: llama.cpp's own empty state
            return swa.pack(parts, into)

    def _state_get(self, seq_id: int, into: np.ndarray | None) -> np.ndarray:
        size = int(lib().llama_state_seq_get_size_ext(self.handle, seq_id, 0))
        buffer = into if into is not None and into.nbytes >= size else np.empty(size, dtype=np.uint8)
        written = lib().llama_state_seq_get_data_ext(
            self.handle, buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq_id, 0
        )
        if written != size:
            raise StateError(f"llama.cpp wrote {written} of {size} state bytes for sequence {seq_id}")
        return buffer[:size]

    def state_seq_set(self, seq_id: int, data: np.ndarray | bytes | memoryview) -> None:
        """Restore a saved state into seq_id. This first erases seq_id: a restore replaces, it never appends."""
        array = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        if array.dtype != np.uint8 or not array.flags.c_contiguous:
            raise InvalidArgumentError("state data must be a C-contiguous uint8 array or bytes")
        if array.size == 0:
            raise StateError("empty state data")
        with self._lock:
            self._check_seq(seq_id)
            if not self.n_swa:
                self._state_set(seq_id, array)
                return
            parts = swa.unpack(array)
            lows = self._pos_mins()
            self._forget_floor(seq_id)
            scratch = self._internal_seq
            try:
                self._state_set(seq_id, parts[0])
                if lows is not None:
                    lows[seq_id] = self.seq_pos_min(seq_id)  # restored whole: purges count from here
                for part in parts[1:]:  # in position order: the cells land as they were computed
                    self._state_set(scratch, part)
                    lib().llama_memory_seq_cp(self._memory, scratch, seq_id, -1, -1)
                    lib().llama_memory_seq_rm(self._memory, scratch, -1, -1)
            except StateError:
                lib().llama_memory_seq_rm(self._memory, seq_id, -1, -1)
                lib().llama_memory_seq_rm(self._memory, scratch, -1, -1)
                raise
            finally:
                self._note_purges(lows)

    def _state_set(self, seq_id: int, array: np.ndarray) -> None:
        read = lib().llama_state_seq_set_data_ext(
            self.handle, array.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), array.size, seq_id, 0
        )
        if read == 0:
            raise StateError(
                f"llama.cpp rejected a {array.size}-byte state for sequence {seq_id}: it was saved by another "
                "model or with other context settings (KV types, flash attention), or it is damaged, or the "
                "context has no room for its cells"
            )
