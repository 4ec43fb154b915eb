"""The public API: what ``import pccpu`` and ``pccpu.service`` offer. Changing it is a decision; this test pins it."""

from __future__ import annotations

import inspect

import pccpu
import pccpu.service

PUBLIC = [
    "Answer", "Batch", "BusyError", "CacheStats", "ConfigError", "Draft", "EngineError", "GenerationOptions",
    "ModelError",
    "ModuleArgs", "ModuleUse", "OptionError", "PccpuError", "PmlError", "PromptCache", "Request", "Result", "Session",
    "SessionError", "StoreError", "Timings", "TokenLogprob", "TypingStats", "__version__", "build_prompt_xml",
]

PROMPT_CACHE_METHODS = [
    "add_schema", "ask", "ask_parts", "batch", "chat", "complete", "clear_residents", "clear_store", "close",
    "detokenize", "draft",
    "encode", "kv_bytes_per_token", "model_info", "model_path", "n_ctx", "n_seq_max_for", "pin", "plan", "schemas",
    "session", "stats",
    "tokenize", "warm_up", "mode",
]


def test_top_level_names_are_pinned_and_importable() -> None:
    assert sorted(pccpu.__all__) == sorted(PUBLIC)
    for name in pccpu.__all__:
        assert getattr(pccpu, name) is not None
    assert pccpu.PromptCache is pccpu.service.PromptCache
    assert pccpu.BusyError is pccpu.service.BusyError


def test_service_all_is_importable() -> None:
    for name in pccpu.service.__all__:
        assert hasattr(pccpu.service, name), name


def test_prompt_cache_exposes_no_public_internals() -> None:
    public = sorted(n for n, _ in inspect.getmembers(pccpu.PromptCache) if not n.startswith("_"))
    assert public == sorted(set(PROMPT_CACHE_METHODS) - {"n_ctx", "mode"})  # n_ctx, mode: instance attributes


def test_ask_documents_its_options() -> None:
    fields = [f for f in pccpu.GenerationOptions.__dataclass_fields__]
    doc = pccpu.service.GenerationKwargs.__annotations__
    assert sorted(fields) == sorted(doc)
