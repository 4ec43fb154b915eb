"""The prompt-cache service: schemas in, answers out (``PromptCache``)."""

from __future__ import annotations

from pccpu.service.prompt_builder import ModuleArgs, build_prompt_xml
from pccpu.service.prompt_cache import PromptCache
from pccpu.service.result import ModuleUse, Result

__all__ = ["ModuleArgs", "ModuleUse", "PromptCache", "Result", "build_prompt_xml"]
