"""Sequence states of sliding-window (iSWA) models, saved whole.

A model with sliding-window attention layers (Gemma 3: 5 of every 6 layers see the last ``n_swa`` positions) keeps
two KV caches in llama.cpp, one for the full-attention layers and one for the SWA layers. Two behaviours of that
cache matter to pccpu (llama.cpp as vendored by llama-cpp-python 0.3.36, ``src/llama-kv-cache.cpp``):

1. ``llama_state_seq_get_data`` skips the SWA cells that the sequence's *next* token could not see
   (``is_masked_swa(pos, seq_pos_max)``), even with ``swa_full``. A restored state then holds fewer SWA cells than the
   sequence had, packed from the first free cell, so they sit at other cell indices than in the context that computed
   them. Without flash attention llama.cpp's sums depend on cell indices (SIMD lanes), and gemma-3-270m amplifies
   those last bits to max logit differences of ~1 (KL ~5e-3): that is the "composed states differ from a full
   prefill" that pccpu 0.1 refused the model for. Nothing is lost for a decode that continues the sequence at its
   end; a decode *inside* the sequence (a chat going back to an earlier turn) would miss the dropped cells.
2. ``find_slot`` reuses a cell whose only sequence can no longer see it (SWA-masked for that sequence's next token),
   and ``apply_ubatch`` then purges every older position of that sequence from the SWA cache, ``swa_full`` or not.

pccpu therefore saves such a sequence in *parts*, each spanning at most ``part_span(n_swa)`` positions, copied into
a scratch sequence first: within a part no cell is masked for the part's last position, so every cell is written. A
restore puts the parts back in order, so the cells are placed as in the context that computed them. The parts travel
in one blob, this module's container. Purges (2) are detected by the context (a sequence's lowest position rising
during a decode or a restore) and remembered as the sequence's *window floor*: a decode that would need a purged cell
is refused (``WindowLostError``), and so is a save.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from pccpu.errors import StateError

MAGIC = b"PCSWA\x00\x01\x00"  # name, format version 1
_HEADER = struct.Struct("<8sII")  # magic, part count, reserved
_SIZE = struct.Struct("<Q")


def part_span(n_swa: int) -> int:
    """Positions per saved part: half the window, aligned to multiples of it, so no cell of a part is masked for
    the part's last position under any of llama.cpp's window types (standard: ``p1 - p0 >= n_swa``; chunked:
    another chunk of ``n_swa``; symmetric: ``|p1 - p0| > n_swa / 2``)."""
    return max(1, n_swa // 2)


def part_ranges(pos_min: int, pos_max: int, n_swa: int) -> list[tuple[int, int]]:
    """The aligned position ranges [p0, p1) that cover pos_min..pos_max."""
    if pos_min < 0:
        return []
    span = part_span(n_swa)
    first = pos_min // span * span
    return [(p0, p0 + span) for p0 in range(first, pos_max + 1, span)]


def pack(parts: Sequence[np.ndarray], into: np.ndarray | None = None) -> np.ndarray:
    """One blob of llama.cpp sequence states; ``into`` is reused when large enough."""
    header = _HEADER.pack(MAGIC, len(parts), 0) + b"".join(_SIZE.pack(p.nbytes) for p in parts)
    size = len(header) + sum(p.nbytes for p in parts)
    buffer = into if into is not None and into.nbytes >= size else np.empty(size, dtype=np.uint8)
    buffer[: len(header)] = np.frombuffer(header, dtype=np.uint8)
    offset = len(header)
    for part in parts:
        buffer[offset : offset + part.nbytes] = part
        offset += part.nbytes
    return buffer[:size]


def unpack(blob: np.ndarray) -> list[np.ndarray]:
    """The parts of a blob made by ``pack``, checked: a state saved by pccpu for another model, or cut short,
    raises StateError."""
    if blob.nbytes < _HEADER.size:
        raise StateError(f"a {blob.nbytes}-byte state is too short for a sliding-window model's state")
    magic, count, _ = _HEADER.unpack(blob[: _HEADER.size].tobytes())
    if magic != MAGIC:
        raise StateError("this state was not saved for a sliding-window model (or by another pccpu version): "
                         "it cannot be restored into this context; clear the store entry and encode it again")
    sizes_end = _HEADER.size + count * _SIZE.size
    if count == 0 or blob.nbytes < sizes_end:
        raise StateError(f"a sliding-window state with {count} parts is damaged (its header is cut short)")
    sizes = [_SIZE.unpack_from(blob[_HEADER.size : sizes_end].tobytes(), i * _SIZE.size)[0] for i in range(count)]
    if sizes_end + sum(sizes) != blob.nbytes or 0 in sizes:
        raise StateError(f"a sliding-window state is damaged: its {count} parts hold {sum(sizes)} bytes, the blob "
                         f"{blob.nbytes - sizes_end}")
    parts, offset = [], sizes_end
    for size in sizes:
        parts.append(blob[offset : offset + size])
        offset += size
    return parts
