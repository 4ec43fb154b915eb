"""The generation loop: sample a token, decode it at the next position, stream text, stop on end-of-generation,
a stop string or max_tokens. The caller can stop early by closing the iterator.

Text is streamed as soon as it is certain: bytes of an incomplete UTF-8 character and text that could still
become a stop string are held back until the next token decides.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pccpu.engine.protocols import Context, Model
from pccpu.errors import ConfigError, InternalError
from pccpu.generation.sampling import Sampler, SamplingSettings


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0 (0 only prefills the prompt), got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


@dataclass
class GenerationOutcome:
    """Filled in while the stream runs; complete once it ends."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "eog" | "stop" | "length" | "context" | "cancelled"
    decode_ms: float = 0.0


def generate(
    context: Context,
    model: Model,
    first_logits: np.ndarray,
    *,
    seq_id: int,
    next_position: int,
    settings: GenerationSettings,
    history: Sequence[int] = (),
    outcome: GenerationOutcome | None = None,
    n_ctx: int | None = None,
) -> Generator[str, None, None]:
    """Yield text pieces. ``first_logits`` are the logits after the last prompt token; generation stops at position
    ``n_ctx`` (default: the context's size; less when part of the context is reserved for resident modules)."""
    limit = context.n_ctx if n_ctx is None else min(n_ctx, context.n_ctx)
    outcome = outcome if outcome is not None else GenerationOutcome()
    sampler = Sampler(settings.sampling)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    recent = list(history[-settings.sampling.repeat_last_n :]) if settings.sampling.repeat_last_n else []
    pending = ""  # text held back because it may start a stop string
    logits = first_logits
    position = next_position
    outcome.finish_reason = "cancelled"
    if settings.max_tokens == 0:
        outcome.finish_reason = "length"
        return
    try:
        for _ in range(settings.max_tokens):
            token = sampler.sample(logits, recent)
            if model.is_end_of_generation(token):
                outcome.finish_reason = "eog"
                break
            outcome.tokens.append(token)
            recent.append(token)
            pending += decoder.decode(model.token_to_piece(token))
            cut = _find_stop(pending, settings.stop)
            if cut is not None:
                pending = pending[:cut]
                outcome.finish_reason = "stop"
                break
            emit, pending = _split_safe(pending, settings.stop)
            if emit:
                outcome.text += emit
                yield emit
            if len(outcome.tokens) == settings.max_tokens:
                outcome.finish_reason = "length"
                break
            if position >= limit:
                outcome.finish_reason = "context"
                break
            started = time.perf_counter()
            decoded = context.decode([token], seq_id=seq_id, start=position)
            if decoded is None:
                raise InternalError("a decode asked for the last logits returned none")
            logits = decoded
            outcome.decode_ms += (time.perf_counter() - started) * 1000
            position += 1
        else:
            outcome.finish_reason = "length"
        pending += decoder.decode(b"", final=True)
        if pending:
            outcome.text += pending
            yield pending
    except GeneratorExit:
        outcome.finish_reason = "cancelled"
        raise


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _split_safe(text: str, stops: tuple[str, ...]) -> tuple[str, str]:
    """Split text into what can be emitted now and a tail that might still grow into a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return (text[: len(text) - hold], text[len(text) - hold :]) if hold else (text, "")
