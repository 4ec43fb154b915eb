"""The prompt-cache service: schemas in, answers out (``PromptCache``), in sessions (``Session``)."""

from __future__ import annotations

from pccpu.errors import BusyError, OptionError, SessionError
from pccpu.service.answer import Answer
from pccpu.service.batching import Batch, Ticket
from pccpu.service.options import GenerationKwargs, GenerationOptions
from pccpu.service.prompt_builder import ModuleArgs, build_prompt_xml
from pccpu.service.prompt_cache import CacheStats, PromptCache
from pccpu.service.request import Request
from pccpu.service.result import ModuleUse, Result, Timings, TokenLogprob
from pccpu.service.session import Session
from pccpu.service.typeahead import Draft, TypingStats

__all__ = ["Answer", "Batch", "BusyError", "CacheStats", "Draft", "GenerationKwargs", "GenerationOptions", "ModuleArgs",
           "ModuleUse", "OptionError", "PromptCache", "Request", "Result", "Session", "SessionError", "Ticket",
           "Timings", "TokenLogprob", "TypingStats", "build_prompt_xml"]
