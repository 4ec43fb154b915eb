"""Exact keys for stored module states.

A state's bytes depend on the model file, the engine settings that shape the KV cache (KV types, flash
attention, unified KV, sliding-window mode), the llama.cpp build, the encoding mode, and every token it was
computed from, the attended context included, with their positions. The *content* key hashes all of that with
positions taken relative to the module's first cell; the start position is kept apart, so the same content at
another offset is found (and shifted) instead of encoded again. A namespace keeps tenants apart: identical text in
two namespaces gives two different keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
# How a module's state is laid out (one sequence state per contiguous text run); part of every key, so entries
# written under another layout are never found.
STATE_LAYOUT = "runs/1"


@dataclass(frozen=True, order=True)
class EntryKey:
    content: str  # hex digest of everything the state depends on, positions relative to `start`
    start: int  # position of the module's first cell

    @property
    def file_stem(self) -> str:
        return f"{self.content}@{self.start}"


def content_key(
    *,
    namespace: str,
    model_fingerprint: str,
    state_fingerprint: str,
    mode: str,
    context: Sequence[tuple[int, int]],
    cells: Sequence[tuple[int, int]],
    start: int,
) -> str:
    """Hash of (namespace, model, engine settings, mode, context and saved cells as (position, token) pairs).

    Positions are made relative to ``start`` before hashing.
    """
    digest = hashlib.sha256()
    for part in (STATE_LAYOUT, namespace, model_fingerprint, state_fingerprint, mode):
        digest.update(part.encode())
        digest.update(b"\x00")
    for label, pairs in ((b"ctx", context), (b"cells", cells)):
        digest.update(label)
        array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        array[:, 0] -= start
        digest.update(array.tobytes())
    return digest.hexdigest()
