"""The options of one request, as one typed, frozen set.

    >>> GenerationOptions.from_kwargs({"max_tokens": 8, "temperature": 0.7, "seed": 1}).max_tokens
    8
    >>> GenerationOptions.from_kwargs({"max_token": 8})
    Traceback (most recent call last):
    ...
    pccpu.errors.OptionError: unknown option 'max_token' (did you mean 'max_tokens'?); valid options: ...

``PromptCache.ask(prompt, max_tokens=8)`` and ``ask(prompt, options=GenerationOptions(max_tokens=8))`` are the same
request. Keyword options are typed for checkers (``GenerationKwargs``) and checked at run time, so a misspelt option
is a :class:`~pccpu.errors.OptionError` naming the valid ones, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from pccpu.errors import ConfigError, OptionError
from pccpu.generation.sampling import SamplingSettings
from pccpu.generation.stream import GenerationSettings


class GenerationKwargs(TypedDict, total=False):
    """The keyword options of ``ask`` (for type checkers; the same names as :class:`GenerationOptions`)."""

    max_tokens: int
    stop: Sequence[str]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int | None
    add_generation_prompt: bool | None
    keep_logits: bool
    top_logprobs: int | None
    repair_tokens: int | None


@dataclass(frozen=True)
class GenerationOptions:
    """How to answer one prompt. The defaults are greedy decoding of at most 128 tokens.

    ``max_tokens=0`` only prefills the prompt (with ``keep_logits``, for fidelity checks). ``add_generation_prompt``:
    open the assistant's turn after the prompt (None: when the prompt ends a user turn). ``keep_logits``: keep the
    next-token logits after the prompt in ``Result.first_logits``. ``top_logprobs``: report each generated token's
    log-probability and the ``top_logprobs`` most likely tokens at its position in ``Result.logprobs`` (None: not
    computed; see ``generation/logprobs.py``). ``repair_tokens``: boundary repair, how many first
    tokens of each composed module (placed after other text than it was encoded after) to decode in place (None: the
    PromptCache's default; 0: none, every cached cell restored as stored; see ``service/repair.py``).
    """

    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    add_generation_prompt: bool | None = None
    keep_logits: bool = False
    top_logprobs: int | None = None
    repair_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise OptionError(f"stop must be a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("max_tokens", "top_k", "repeat_last_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise OptionError(f"{name} must be an integer, got {value!r}")
        check_repair_tokens(self.repair_tokens, optional=True)
        if self.max_tokens < 0:
            raise OptionError(f"max_tokens must be >= 0 (0 only prefills the prompt), got {self.max_tokens}")
        try:
            self.generation()  # the sampling and stop checks live with the code that uses them
        except ConfigError as exc:
            raise OptionError(str(exc)) from None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], base: GenerationOptions | None = None) -> GenerationOptions:
        """``base`` (or the defaults) with ``kwargs`` applied; an unknown name is an :class:`OptionError`."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for name in kwargs:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise OptionError(f"unknown option {name!r}{hint}; valid options: {', '.join(valid)}")
        return dataclasses.replace(base or cls(), **kwargs)

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                                repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n, seed=self.seed)

    def generation(self) -> GenerationSettings:
        return GenerationSettings(max_tokens=self.max_tokens, stop=self.stop, sampling=self.sampling,
                                  top_logprobs=self.top_logprobs)


def check_repair_tokens(value: object, *, optional: bool = False) -> None:
    """``repair_tokens`` is an integer >= 0 (or None where the default applies)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OptionError(f"repair_tokens must be an integer >= 0 (0 turns boundary repair off), got {value!r}")
