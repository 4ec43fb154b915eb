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
from pccpu.generation.logprobs import TokenLogprob, check_top_logprobs, token_logprob
from pccpu.generation.sampling import Sampler, SamplingSettings


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    # None: no log-probabilities; k: each generated token's and the k most likely at its position (logprobs.py)
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        check_top_logprobs(self.top_logprobs)
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0 (0 only prefills the prompt), got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


@dataclass
class GenerationOutcome:
    """Filled in while the stream runs; complete once it ends."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token when top_logprobs is set, else None
    text: str = ""
    finish_reason: str = ""  # "eog" | "stop" | "length" | "context" | "cancelled"
    decode_ms: float = 0.0


class Generation:
    """One answer's generation driven from outside, a token at a time: ``choose(logits)`` samples a token from the
    logits after the previous one and returns it when it must be decoded next (at ``position``), or None once the
    answer is over; ``take_text()`` gives the text that became certain meanwhile. ``generate`` drives one of these
    with one decode per token; a batching scheduler drives several with one ``decode_step`` for all."""

    def __init__(self, model: Model, settings: GenerationSettings, *, next_position: int, limit: int,
                 history: Sequence[int] = (), outcome: GenerationOutcome | None = None) -> None:
        self.model = model
        self.settings = settings
        self.outcome = outcome if outcome is not None else GenerationOutcome()
        self.position = next_position  # where the token ``choose`` returns is decoded
        self._limit = limit
        self._sampler = Sampler(settings.sampling)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        n_recent = settings.sampling.repeat_last_n
        self._recent = list(history[-n_recent:]) if n_recent else []
        self._pending = ""  # text held back because it may start a stop string
        self._out: list[str] = []
        self.finished = settings.max_tokens == 0
        self.outcome.finish_reason = "length" if self.finished else "cancelled"
        if settings.top_logprobs is not None:
            self.outcome.logprobs = []

    def choose(self, logits: np.ndarray) -> int | None:
        if self.finished:
            return None
        token = self._sampler.sample(logits, self._recent)
        if self.model.is_end_of_generation(token):
            self._finish("eog")
            return None
        outcome = self.outcome
        outcome.tokens.append(token)
        if outcome.logprobs is not None and self.settings.top_logprobs is not None:
            outcome.logprobs.append(token_logprob(logits, token, top=self.settings.top_logprobs,
                                                  piece=self.model.token_to_piece))
        self._recent.append(token)
        self._pending += self._decoder.decode(self.model.token_to_piece(token))
        cut = _find_stop(self._pending, self.settings.stop)
        if cut is not None:
            self._pending = self._pending[:cut]
            self._finish("stop")
            return None
        emit, self._pending = _split_safe(self._pending, self.settings.stop)
        if emit:
            outcome.text += emit
            self._out.append(emit)
        if len(outcome.tokens) == self.settings.max_tokens:
            self._finish("length")
            return None
        if self.position >= self._limit:
            self._finish("context")
            return None
        return token

    def decoded(self, ms: float) -> None:
        """The token ``choose`` returned was decoded at ``position`` (taking ``ms``)."""
        self.position += 1
        self.outcome.decode_ms += ms

    def take_text(self) -> str:
        text, self._out = "".join(self._out), []
        return text

    def cancel(self) -> None:
        """Stopped from outside: text held back is dropped, as a closed stream drops it."""
        if not self.finished:
            self.finished = True
            self.outcome.finish_reason = "cancelled"

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.outcome.finish_reason = reason
        self._pending += self._decoder.decode(b"", final=True)
        if self._pending:
            self.outcome.text += self._pending
            self._out.append(self._pending)
            self._pending = ""


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
    run = Generation(model, settings, next_position=next_position, limit=limit, history=history, outcome=outcome)
    logits = first_logits
    try:
        while True:
            token = run.choose(logits)
            text = run.take_text()
            if text:
                yield text
            if token is None:
                return
            started = time.perf_counter()
            decoded = context.decode([token], seq_id=seq_id, start=run.position)
            if decoded is None:
                raise InternalError("a decode asked for the last logits returned none")
            logits = decoded
            run.decoded((time.perf_counter() - started) * 1000)
    except GeneratorExit:
        run.cancel()
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
