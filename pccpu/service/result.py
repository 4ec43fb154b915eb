"""What a prompt's answer reports: text, time to first token, and where each prompt token's KV came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pccpu.generation.logprobs import TokenLogprob

__all__ = ["ModuleUse", "Result", "Source", "Timings", "TokenLogprob"]

Source = Literal["ram", "disk", "remote", "encoded", "uncached"]


@dataclass(frozen=True)
class ModuleUse:
    """How one included module was served."""

    module: str  # path in the schema ("" is the schema's own text)
    source: Source  # ram / disk / remote: a stored state; encoded: encoded for this prompt; uncached: cache="false"
    tokens: int
    state_bytes: int = 0
    shifted: bool = False  # found at another start position and moved
    # placed after other cells than it was encoded after (or shifted): close to full prefill, not equal to it
    composed: bool = False
    repaired_tokens: int = 0  # of ``tokens``, decoded in place by boundary repair (see service/repair.py)


@dataclass(frozen=True)
class Timings:
    """Where the time to the first token went, in milliseconds (0 for steps that did not run)."""

    plan_ms: float = 0.0  # parse the prompt and place its pieces
    switch_ms: float = 0.0  # park the previous session's cells and bring this session's back
    lookup_ms: float = 0.0  # find module states in the store (disk reads included)
    encode_ms: float = 0.0  # encode modules that were not stored
    restore_ms: float = 0.0  # copy stored states into the KV cache (and shift them)
    decode_ms: float = 0.0  # decode the uncached tokens
    generate_ms: float = 0.0  # decode the generated tokens (after the first)


@dataclass(frozen=True)
class Result:
    """One answer. Prompt tokens = ``session_tokens`` (held from the session's previous request) +
    ``cached_tokens`` (restored from stored module states) + ``uncached_tokens`` (decoded for this request)."""

    text: str
    ttft_ms: float  # from the start of the request to the first sampled token
    session_tokens: int
    cached_tokens: int
    uncached_tokens: int
    generated_tokens: int
    finish_reason: str  # eog | stop | length | context | cancelled
    modules: tuple[ModuleUse, ...] = ()
    timings: Timings = field(default_factory=Timings)
    cached: bool = True  # False for a full-prefill (baseline) answer
    warnings: tuple[str, ...] = ()  # things the caller may want to fix (modules referenced out of schema order)
    # every reused cell holds what a full prefill computes (no module composed after other text than it was
    # computed after); False: close to full prefill, not equal to it
    exact: bool = True
    # the next-token logits after the prompt (float32 over the vocabulary), kept when asked (keep_logits=True)
    first_logits: Any = field(default=None, repr=False, compare=False)
    # each generated token's log-probability and the most likely tokens there, when asked (top_logprobs=k)
    logprobs: tuple[TokenLogprob, ...] | None = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return self.session_tokens + self.cached_tokens + self.uncached_tokens

    @property
    def hits(self) -> int:
        return sum(1 for m in self.modules if m.source in ("ram", "disk", "remote"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("first_logits")
        out["logprobs"] = None if self.logprobs is None else [lp.to_dict() for lp in self.logprobs]  # no bytes
        out["prompt_tokens"] = self.prompt_tokens
        return out
