"""What the service layer needs from a model and a context, as Protocols.

``LlamaModel`` and ``LlamaContext`` implement them with llama.cpp; ``tests/fake_engine.py`` implements them in
pure Python, so the request path (planning, store lookups, reuse, sessions) is tested in milliseconds. Anything the
service calls on an engine object must be declared here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from pccpu.engine.model import ModelInfo

LogitsMode = Literal["last", "all", "none"]


class Model(Protocol):
    """A loaded model: tokenizer, shape and identity."""

    path: Path
    info: ModelInfo
    bos_token: int
    eos_token: int
    add_bos: bool

    @property
    def fingerprint(self) -> str:
        """A digest of the model file: part of every stored state's key."""
        ...

    @property
    def placement(self) -> str:
        """Where the layers run: ``cpu`` or ``gpu:N`` (states computed on either are kept apart)."""
        ...

    @property
    def chat_template(self) -> str | None: ...

    def tokenize(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]: ...

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes: ...

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str: ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def close(self) -> None: ...


class Context(Protocol):
    """One KV cache with sequences, decoded at explicit positions (see ``LlamaContext`` for the rules)."""

    n_ctx: int
    n_batch: int
    n_seq_max: int

    def decode(self, tokens: Sequence[int], *, seq_id: int, start: int,
               logits: LogitsMode = "last") -> np.ndarray | None: ...

    def decode_step(self, steps: Sequence[tuple[int, int, int]]) -> np.ndarray: ...

    def interrupt(self) -> None: ...

    def clear_interrupt(self) -> None: ...

    @property
    def can_interrupt(self) -> bool: ...

    def apply_pending_shift(self) -> None: ...

    def swa_kv_share(self) -> float:
        """The share of a cell's KV bytes in sliding-window layers (0.0 without them)."""
        ...

    def window_intact(self, seq_id: int, pos: int) -> bool:
        """Whether a decode at ``pos`` finds every sliding-window cell it needs (see ``LlamaContext``)."""
        ...

    def seq_pos_min(self, seq_id: int) -> int: ...

    def seq_pos_max(self, seq_id: int) -> int: ...

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> None: ...

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None: ...

    def clear(self, keep: Sequence[int] = ()) -> None: ...

    def state_seq_get(self, seq_id: int, into: np.ndarray | None = None) -> np.ndarray: ...

    def state_seq_set(self, seq_id: int, data: np.ndarray) -> None: ...

    def close(self) -> None: ...
