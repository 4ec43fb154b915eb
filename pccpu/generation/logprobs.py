"""Log-probabilities of generated tokens, as OpenAI's ``logprobs`` / ``top_logprobs`` report them.

A token's log-probability is taken from the model's logits at its position (a log-softmax over the vocabulary),
before the repeat penalty and the temperature change them: what the model thinks, whichever way the token was
picked. Pure numpy: testable without a model.

    >>> import numpy as np
    >>> lp = token_logprob(np.log(np.array([0.5, 0.25, 0.25], dtype=np.float32)), 0, top=2,
    ...                    piece=lambda t: b"abc"[t:t + 1])
    >>> round(lp.logprob, 4), [(t.piece, round(t.logprob, 4)) for t in lp.top]
    (-0.6931, [(b'a', -0.6931), (b'b', -1.3863)])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pccpu.errors import ConfigError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token (id and the bytes it stands for), its log-probability, and the ``top`` most likely tokens
    at its position, most likely first (each with an empty ``top``)."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the piece as text (invalid UTF-8 replaced) and as its bytes."""
        return {"token": self.token, "piece": self.piece.decode("utf-8", errors="replace"),
                "bytes": list(self.piece), "logprob": self.logprob, "top": [t.to_dict() for t in self.top]}


def check_top_logprobs(value: object) -> None:
    """``top_logprobs`` is None (no log-probabilities) or an integer from 0 to MAX_TOP_LOGPROBS."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ConfigError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (None: no log-probabilities), "
                          f"got {value!r}")


def token_logprob(logits: np.ndarray, token: int, *, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` and the ``top`` most likely tokens (ties: lower id first)."""
    scores = np.asarray(logits, dtype=np.float64)
    peak = float(scores.max())
    log_total = peak + float(np.log(np.exp(scores - peak).sum()))  # log of the softmax's denominator
    best: tuple[TokenLogprob, ...] = ()
    if top:
        ids = np.argpartition(-scores, top - 1)[:top] if top < scores.size else np.arange(scores.size)
        ids = ids[np.lexsort((ids, -scores[ids]))]  # most likely first
        best = tuple(TokenLogprob(int(t), piece(int(t)), float(scores[t]) - log_total) for t in ids)
    return TokenLogprob(token, piece(token), float(scores[token]) - log_total, best)
