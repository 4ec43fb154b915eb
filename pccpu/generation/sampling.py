"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p, min-p and a
repeat penalty, reproducible with a seed. Pure numpy: testable without a model.

Order of operations (as in llama.cpp's common sampler chain): repeat penalty -> top-k -> top-p -> min-p ->
temperature -> draw. ``temperature == 0`` means greedy (argmax after the repeat penalty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pccpu.errors import ConfigError


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick tokens. The defaults are greedy decoding.

    >>> SamplingSettings(temperature=0.7, top_p=0.9, seed=1).greedy
    False
    """

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ConfigError(f"repeat_penalty must be > 0 (1 turns it off), got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ConfigError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Stateful token picker for one generation (holds the random generator)."""

    def __init__(self, settings: SamplingSettings) -> None:
        self.settings = settings
        self._rng = np.random.default_rng(settings.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        s = self.settings
        scores = np.asarray(logits, dtype=np.float32)
        if s.repeat_penalty != 1.0 and history and s.repeat_last_n:
            scores = scores.copy()
            recent = np.unique(np.asarray(history[-s.repeat_last_n :], dtype=np.int64))
            picked = scores[recent]
            # llama.cpp's rule: divide positive logits, multiply negative ones.
            scores[recent] = np.where(picked > 0, picked / s.repeat_penalty, picked * s.repeat_penalty)
        if s.greedy:
            return int(np.argmax(scores))

        candidates = np.arange(scores.size)
        if s.top_k and s.top_k < scores.size:
            candidates = np.argpartition(scores, -s.top_k)[-s.top_k :]
        cand_scores = scores[candidates].astype(np.float64)
        order = np.argsort(-cand_scores)
        candidates, cand_scores = candidates[order], cand_scores[order]
        probs = np.exp(cand_scores - cand_scores[0])
        probs /= probs.sum()
        if s.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), s.top_p) + 1)
            candidates, cand_scores, probs = candidates[:keep], cand_scores[:keep], probs[:keep]
        if s.min_p > 0.0:
            keep_mask = probs >= s.min_p * probs[0]
            candidates, cand_scores = candidates[keep_mask], cand_scores[keep_mask]
        scaled = (cand_scores - cand_scores[0]) / s.temperature
        final = np.exp(scaled)
        final /= final.sum()
        return int(candidates[self._rng.choice(final.size, p=final)])
