"""What a prompt's answer reports: text, time to first token, what came from where."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Source = Literal["ram", "disk", "encoded", "uncached"]


@dataclass(frozen=True)
class ModuleUse:
    """How one included module was served."""

    module: str  # path in the schema ("" is the schema's own text)
    source: Source  # ram / disk: a stored state; encoded: encoded for this prompt; uncached: cache="false"
    tokens: int
    state_bytes: int = 0
    shifted: bool = False  # found at another start position and moved


@dataclass
class Result:
    text: str
    ttft_ms: float  # from the call to the first sampled token: parse, lookup, restore, decode, first sample
    cached_tokens: int  # prompt tokens whose KV came from stored states
    uncached_tokens: int  # prompt tokens decoded for this prompt
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    modules: list[ModuleUse] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # parse/lookup/encode/restore/decode/... in ms
    cached: bool = True  # False for a full-prefill (baseline) answer
    # the next-token logits after the prompt (float32 over the vocabulary), kept when asked (ask(keep_logits=True))
    first_logits: Any = field(default=None, repr=False, compare=False)
    # prompt cells still held from the previous answer (its prompt began the same way): neither restored nor decoded
    reused_tokens: int = 0

    @property
    def hits(self) -> int:
        return sum(1 for m in self.modules if m.source in ("ram", "disk"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("first_logits")
        return out
