"""pccpu: Prompt Cache (modular attention reuse) for GGUF models on llama.cpp, CPU first.

    from pccpu import PromptCache

    with PromptCache("smollm2") as pc:
        pc.add_schema("schemas/travel.xml")
        print(pc.ask(open("schemas/travel.domestic.prompt.xml").read()).text())

The names below are the public API (``tests/test_public_api.py`` pins them). They are imported on first use, so
``import pccpu`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PromptCache": "pccpu.service",
    "Session": "pccpu.service",
    "Draft": "pccpu.service",
    "TypingStats": "pccpu.service",
    "Answer": "pccpu.service",
    "Batch": "pccpu.service",
    "Result": "pccpu.service",
    "ModuleUse": "pccpu.service",
    "Timings": "pccpu.service",
    "TokenLogprob": "pccpu.service",
    "CacheStats": "pccpu.service",
    "Request": "pccpu.service",
    "GenerationOptions": "pccpu.service",
    "ModuleArgs": "pccpu.service",
    "build_prompt_xml": "pccpu.service",
    "PccpuError": "pccpu.errors",
    "ConfigError": "pccpu.errors",
    "OptionError": "pccpu.errors",
    "ModelError": "pccpu.errors",
    "EngineError": "pccpu.errors",
    "PmlError": "pccpu.errors",
    "BusyError": "pccpu.errors",
    "SessionError": "pccpu.errors",
    "StoreError": "pccpu.errors",
}

__all__ = [
    "Answer", "Batch", "BusyError", "CacheStats", "ConfigError", "Draft", "EngineError", "GenerationOptions",
    "ModelError",
    "ModuleArgs", "ModuleUse", "OptionError", "PccpuError", "PmlError", "PromptCache", "Request", "Result", "Session",
    "SessionError", "StoreError", "Timings", "TokenLogprob", "TypingStats", "__version__", "build_prompt_xml",
]

if TYPE_CHECKING:
    from pccpu.errors import (
        BusyError,
        ConfigError,
        EngineError,
        ModelError,
        OptionError,
        PccpuError,
        PmlError,
        SessionError,
        StoreError,
    )
    from pccpu.service import (
        Answer,
        Batch,
        CacheStats,
        Draft,
        GenerationOptions,
        ModuleArgs,
        ModuleUse,
        PromptCache,
        Request,
        Result,
        Session,
        Timings,
        TokenLogprob,
        TypingStats,
        build_prompt_xml,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pccpu' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
